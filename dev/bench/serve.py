"""
chat_web under load: for 1, 4, 16 and 32 concurrent clients, aggregate reply tokens/s, p50/p99 time to the first
reply token and errors, against the real server (`python -m scripts.chat_web` in a subprocess) on CPU. Prints one
JSON object; `speedup_16_vs_1` is the aggregate tokens/s of 16 clients over that of one (target >= 4: the rows
of a batch share each decode step).

The model is a random d<depth> GPT with a byte-level tokenizer (265 tokens), saved as an sft checkpoint in a
throwaway base dir: most replies run to max_tokens. Each client sends streaming OpenAI requests back to back for
`seconds`; clients and server share the CPU, so on a small shared machine compare levels of one run.

Usage:
    python -m dev.bench.serve
    python -m dev.bench.serve --depth=2 --clients=1,4 --seconds=5 --max_tokens=32
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

from dev.bench import REPO_ROOT, log, settings
from nanochat.common import cpu_name

# Settings
depth = 4
sequence_len = 1024
clients = "1,4,16,32"  # concurrency levels
seconds = 15.0  # per level: clients start requests until then, and the level ends when the last one finishes
max_tokens = 64  # per reply
max_batch = 32  # the server's --max_batch (rows decoded together)
server_threads = 1  # OMP/torch threads of the server process
user_config = settings(globals())
levels = [int(n) for n in clients.split(",")]


# -----------------------------------------------------------------------------
# A throwaway base dir with a byte-level tokenizer and a random sft checkpoint

base_dir = tempfile.mkdtemp(prefix="nanochat_bench_serve_")
os.environ["NANOCHAT_BASE_DIR"] = base_dir
from nanochat.checkpoint_manager import CHECKPOINT_DIRS, save_checkpoint  # noqa: E402
from nanochat.gpt import GPT, GPTConfig, dims_for_depth  # noqa: E402
from nanochat.tokenizer import SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes  # noqa: E402

tokenizer = RustBPETokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
tokenizer.save(os.path.join(base_dir, "tokenizer"))
torch.save(compute_token_bytes(tokenizer), os.path.join(base_dir, "tokenizer", "token_bytes.pt"))
config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), **dims_for_depth(depth))
model = GPT.create(config, "cpu")
model_tag = f"d{depth}"
save_checkpoint(os.path.join(base_dir, CHECKPOINT_DIRS["sft"], model_tag), 0, model.state_dict(), None,
                {"step": 0, "model_config": vars(config), "user_config": {}, "world_size": 1})
num_parameters = sum(p.numel() for p in model.parameters())
del model

# -----------------------------------------------------------------------------
# The server

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
url = f"http://127.0.0.1:{port}"
env = {**os.environ, "OMP_NUM_THREADS": str(server_threads)}
server_log = open(os.path.join(base_dir, "server.log"), "w")
server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-p", str(port), "--host", "127.0.0.1",
                           "--device_type=cpu", f"-g={model_tag}", f"--max_batch={max_batch}",
                           f"--max_queue={4 * max(levels)}", "--request_timeout=120"],
                          cwd=REPO_ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
try:
    deadline = time.time() + 120
    while True:
        if server.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start; see {server_log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)

    # -------------------------------------------------------------------------
    # Clients

    async def one_request(client, client_id, request_id):
        """(completion tokens, seconds to the first reply token) of one streaming request; raises on any error."""
        body = {"model": model_tag, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Client {client_id}, request {request_id}: tell me a story."}]}
        started, first, usage = time.perf_counter(), None, None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter() - started
                elif line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line[len("data: "):])["usage"]
        if usage is None:
            raise RuntimeError("the stream ended without its usage chunk")
        return usage["completion_tokens"], first

    async def run_level(num_clients):
        tokens, ttfts, errors, requests = 0, [], 0, 0
        limits = httpx.Limits(max_connections=num_clients + 4, max_keepalive_connections=num_clients + 4)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            start = time.perf_counter()

            async def client_loop(client_id):
                nonlocal tokens, errors, requests
                request_id = 0
                while time.perf_counter() - start < seconds:
                    request_id += 1
                    requests += 1
                    try:
                        n, first = await one_request(client, client_id, request_id)
                    except Exception as e:  # counted, and shown once
                        errors += 1
                        if errors == 1:
                            log(f"  error: {e!r}")
                        continue
                    tokens += n
                    if first is not None:
                        ttfts.append(first)

            await asyncio.gather(*[client_loop(i) for i in range(num_clients)])
            elapsed = time.perf_counter() - start
        ttfts.sort()
        return {"clients": num_clients, "requests": requests, "errors": errors, "tokens": tokens,
                "seconds": round(elapsed, 2), "tokens_per_second": round(tokens / elapsed, 1),
                "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
                "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1) if ttfts else None}

    async def warm_up():  # the first requests pay one-time costs (allocations, lazy imports)
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*[one_request(client, -1, i) for i in range(2)])

    asyncio.run(warm_up())
    results = {}
    for num_clients in levels:
        log(f"{num_clients} clients for {seconds:g} s ...")
        results[str(num_clients)] = asyncio.run(run_level(num_clients))
        log(f"  {results[str(num_clients)]}")
    server_stats = httpx.get(f"{url}/stats", timeout=10).json()
finally:
    server.terminate()
    server.wait(timeout=30)
    server_log.close()

one = results.get("1", {}).get("tokens_per_second")
sixteen = results.get("16", {}).get("tokens_per_second")
print(json.dumps({
    "settings": user_config,
    "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
    "model": {"depth": depth, "n_embd": config.n_embd, "vocab_size": config.vocab_size, "parameters": num_parameters},
    "levels": results,
    "speedup_16_vs_1": round(sixteen / one, 2) if one and sixteen else None,
    "server_total_requests": server_stats["total_requests"],
}, indent=2))
