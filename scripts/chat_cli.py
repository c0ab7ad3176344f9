"""
Talk to a chat model in the terminal: multi-turn, replies streamed as they are sampled, calculator calls shown as
<<expression=result>>. Type `clear` to start a new conversation, `quit` or `exit` (or Ctrl-D) to leave. With
-p "prompt" it answers that one prompt and exits. The conversation is rendered for every turn exactly as in
training, the reply's tool calls kept as python / python_output parts. Not a server: see scripts/chat_web.py.

Usage:
    python -m scripts.chat_cli                       # sft model, largest tag, last step
    python -m scripts.chat_cli -i rl -t 0.8 -k 50
    python -m scripts.chat_cli -p "Why is the sky blue?" --temperature=0 --device_type=cpu
"""

import argparse

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, compute_init
from nanochat.engine import Engine
from nanochat.tokenizer import ReplyText

parser = argparse.ArgumentParser(description="Chat with a model in the terminal.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which checkpoints")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint directory, e.g. d20 (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
parser.add_argument("-k", "--top_k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
parser.add_argument("-m", "--max_tokens", type=int, default=256, help="most tokens per reply")
parser.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (+1 per reply)")
parser.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"], help="'' = autodetect")
args = parser.parse_args()
if args.temperature < 0:
    raise UserError(f"--temperature={args.temperature}: must be >= 0 (0 = greedy)")
if args.top_k < 0:
    raise UserError(f"--top_k={args.top_k}: must be >= 0 (0 = the whole vocabulary)")
if args.max_tokens < 1:
    raise UserError(f"--max_tokens={args.max_tokens}: must be at least 1")

_, _, _, _, device = compute_init(args.device_type)
model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
engine = Engine(model, tokenizer)


def reply(messages, seed):
    """Stream the assistant's reply to the conversation `messages` (ending with a user turn); return its parts."""
    conversation = {"messages": messages + [{"role": "assistant", "content": ""}]}
    prompt = tokenizer.render_for_completion(conversation)
    if len(prompt) + args.max_tokens > model.config.sequence_len:
        print(f"(the conversation is {len(prompt)} tokens, near the model's context of {model.config.sequence_len}; "
              f"type 'clear' to start over)")
    text = ReplyText(tokenizer)
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=seed):
        print(text.inline(text.feed(column[0])), end="", flush=True)  # the stop token at the end is not text
    print(text.inline(text.flush(), end=True))
    # stopped by max_tokens or by <|assistant_end|>: either way the history closes the turn with
    # <|assistant_end|>, which rendering the assistant message adds
    return text.parts or [{"type": "text", "text": ""}]


seed = args.seed
if args.prompt:
    print("Assistant: ", end="", flush=True)
    reply([{"role": "user", "content": args.prompt}], seed)
    raise SystemExit(0)

print(f"nanochat {args.source} model (step {meta['step']}). Commands: 'clear' starts over, 'quit' or 'exit' leaves.")
messages = []
while True:
    try:
        user_text = input("\nUser: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if user_text.lower() in ("quit", "exit"):
        break
    if user_text.lower() == "clear":
        messages = []
        print("(new conversation)")
        continue
    if not user_text:
        continue
    messages.append({"role": "user", "content": user_text})
    print("Assistant: ", end="", flush=True)
    try:
        parts = reply(messages, seed)
    except KeyboardInterrupt:  # stop this reply, keep the session
        print("\n(interrupted)")
        messages.pop()
        continue
    messages.append({"role": "assistant", "content": parts})
    seed += 1
