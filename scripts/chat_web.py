"""
Chat with a trained model over HTTP: a ChatGPT-style page at /, the original's streaming endpoint and an
OpenAI-compatible API under /v1 (nanochat/server.py describes them and how requests are scheduled; /openapi.json is
their contract). Each worker (one per GPU with -n, one on CPU/MPS) holds a copy of the model and decodes up to
--max_batch requests together.

Usage:
    python -m scripts.chat_web                                  # sft model, http://localhost:8000
    python -m scripts.chat_web -n 8                             # 8 GPUs, one worker (and model copy) each
    python -m scripts.chat_web -i mid -g d4 --device_type=cpu --max_batch=8 -p 8001
Then open the page, or: OpenAI(base_url="http://localhost:8000/v1", api_key="none").chat.completions.create(...)
"""

import argparse

import torch
import uvicorn

from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, autodetect_device_type, logger
from nanochat.engine import BatchDecoder
from nanochat.server import MAX_MAX_TOKENS, MAX_TEMPERATURE, MAX_TOP_K, WorkerPool, create_app

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("-n", "--num_gpus", type=int, default=1, help="workers, one per GPU (CPU/MPS: 1)")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint source")
parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
parser.add_argument("-k", "--top_k", type=int, default=50, help="default top-k (0 = off)")
parser.add_argument("-m", "--max_tokens", type=int, default=512, help="default reply length in tokens")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint directory (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-p", "--port", type=int, default=8000)
parser.add_argument("--host", default="0.0.0.0")
parser.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"], help="'' = autodetect")
parser.add_argument("--max_batch", type=int, default=0, help="rows decoded together per worker (0: 32 on CUDA, else 8)")
parser.add_argument("--max_queue", type=int, default=64, help="requests that may wait for a free row")
parser.add_argument("--request_timeout", type=float, default=30.0, help="seconds a request may wait to start")
args = parser.parse_args()
checks = [("temperature", 0 <= args.temperature <= MAX_TEMPERATURE, f"0..{MAX_TEMPERATURE}"),
          ("top_k", 0 <= args.top_k <= MAX_TOP_K, f"0..{MAX_TOP_K}"),
          ("max_tokens", 1 <= args.max_tokens <= MAX_MAX_TOKENS, f"1..{MAX_MAX_TOKENS}"),
          ("num_gpus", args.num_gpus >= 1, ">= 1"), ("max_batch", args.max_batch >= 0, ">= 0"),
          ("max_queue", args.max_queue >= 0, ">= 0"), ("request_timeout", args.request_timeout > 0, "> 0")]
for name, ok, allowed in checks:
    if not ok:
        raise UserError(f"--{name}={getattr(args, name)}: allowed {allowed}")

# One worker per device, each with its own copy of the model
device_type = args.device_type or autodetect_device_type()
if device_type == "cuda":
    if args.num_gpus > torch.cuda.device_count():
        raise UserError(f"--num_gpus={args.num_gpus} but torch sees {torch.cuda.device_count()} GPUs")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
elif args.num_gpus != 1:
    raise UserError(f"--num_gpus={args.num_gpus}: {device_type} runs exactly one worker; leave -n out")
else:
    devices = [torch.device(device_type)]
max_batch = args.max_batch or (32 if device_type == "cuda" else 8)
pool = WorkerPool(args.max_queue, args.request_timeout)
for device in devices:
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    pool.add_worker(device, BatchDecoder(model, tokenizer, max_batch))
    logger.info(f"worker {len(pool.workers) - 1}: {device}, {max_batch} rows")

# Serve
model_id = f"nanochat-{args.source}-{args.model_tag or 'd' + str(model.config.n_layer)}"
defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
app = create_app(pool, tokenizer, model_id, defaults, context_len=pool.workers[0].decoder.max_seq_len)
logger.info(f"serving {model_id} on http://{args.host}:{args.port} (OpenAI API at /v1)")
uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
