#!/usr/bin/env bash
# The $1000 tier: speedrun.sh's pipeline at depth 32 (1.88B parameters, 37.6B tokens) on one 8xH100 node, ~33 hours
# of base training plus the rest (~$800-1000 at ~$24/h). Run it in a screen session:
#
#     screen -L -Logfile run1000.log -S run1000 bash run1000.sh
#
# Same environment settings and argument as speedrun.sh (NPROC_PER_NODE, WANDB_RUN, NANOCHAT_BASE_DIR, RUN_RL=1,
# --device_type=cpu). Only the tier's numbers differ, and why:
#   - depth 32: 2048 wide, 16 heads of 128, 1.88B parameters (+2.15B in value-embedding tables, not counted), 20
#     tokens per parameter = 37.6B tokens, 71,680 steps;
#   - data: 37.6B tokens at ~4.8 characters per token is ~180B characters, ~722 shards of ~250M characters: 800
#     leave a margin (~80 GB);
#   - the tokenizer on 4B characters (twice the speedrun's: a model this size rewards a better vocab), so the first
#     16 shards download before it;
#   - 8 rows per GPU in base_train, base_loss and mid_train: 32 rows of 2048 tokens at d32 run out of an H100's
#     80 GB (16 as well, just: ~78 of 80 GB used). 8 x 2048 x 8 GPUs = 131,072 tokens a micro-step, so each step
#     of 524,288 tokens accumulates 4 micro-steps: the same math, ~1.6 s a step. (Those 78 GB were the seed
#     architecture's; v2's value-embedding tables add ~17 GB of fp32 weights and gradients per GPU, and 8 rows use
#     about half of 16's activations: not yet measured on a GPU, lower DEVICE_BATCH_SIZE if it runs out);
#   - chat_rl at 4 rows per forward/backward (its default 8 is sized for d20).
export DEPTH=32 SHARDS=800 TOKENIZER_SHARDS=16 TOKENIZER_CHARS=4000000000 DEVICE_BATCH_SIZE=8 RL_DEVICE_BATCH_SIZE=4
export PIPELINE=run1000.sh
exec bash "$(dirname "$0")/speedrun.sh" "$@"
