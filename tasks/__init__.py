"""Chat tasks: datasets of conversations for mid-training, SFT and RL, and the evaluations of scripts/chat_eval.py.
See tasks/common.py for the Task interface and the table of which split each task trains and evaluates on."""
