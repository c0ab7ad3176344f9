"""
Chat with a trained model over HTTP: a ChatGPT-style page at / (nanochat/ui.html), the original's streaming
endpoint POST /chat/completions, and an OpenAI-compatible API under /v1 (chat completions streaming or not,
the model list), so the official `openai` client and tools built on it work with base_url=http://host:port/v1.

Many people at once: each worker (one per GPU with -n, one on CPU/MPS) holds a model and an engine BatchDecoder
of --max_batch rows and runs ONE decode loop in its own thread. A request is prefilled into a free row and
decodes alongside the others from the next step; a finished request, or a client that went away, frees its row
at once. Requests that find every row busy wait in one queue of at most --max_queue; a request that cannot
start within --request_timeout seconds gets HTTP 503 with a JSON error, never a hung connection.

Native stream (POST /chat/completions), Server-Sent Events, one JSON object per `data:` line:
    {"token": "Hello", "gpu": 0}                          reply text
    {"token": "12*7", "gpu": 0, "part": "python"}          a calculator call as the model writes it
    {"token": "84", "gpu": 0, "part": "python_output"}     the calculator's result, forced in by the engine
    {"done": true, "finish_reason": "stop" | "length"}
The tool's delimiter tokens are not sent as text: a change of "part" marks them. Assistant messages sent back
may carry these parts as content [{"type": "text" | "python" | "python_output", "text": ...}], so the next
prompt is rendered exactly as in training. OpenAI responses are plain strings, in which a calculator call
reads `<<12*7=84>>` (GSM8K's annotation). A leading system message is folded into the first user turn, as
the tokenizer's training render does. Text is streamed UTF-8 safe: never half a character.

Not for: authentication, per-user rate limits or several models at once (put a proxy in front for those).

Usage:
    python -m scripts.chat_web                                  # sft model, http://localhost:8000
    python -m scripts.chat_web -n 8                             # 8 GPUs, one worker (and model copy) each
    python -m scripts.chat_web -i mid -g d4 --device_type=cpu --max_batch=8 -p 8001
Then open the page, or: OpenAI(base_url="http://localhost:8000/v1", api_key="none").chat.completions.create(...)
"""

import argparse
import asyncio
import collections
import contextlib
import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.common import UserError, logger

UI_PATH = Path(__file__).resolve().parents[1] / "nanochat" / "ui.html"

# Request limits (as the original server): keep one request from holding a worker for long or flooding memory.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096

# -----------------------------------------------------------------------------
# Errors: every failure is {"error": {"message", "type", "param", "code"}} with an HTTP status, as OpenAI's API


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self):
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def bad_request(param, message, code="invalid_value"):
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def field_name(loc):
    """('body', 'messages', 0, 'content', 'constrained-str') -> 'messages[0].content'. Pydantic puts the member type
    of a union (str, list[Part], ...) into the location; it is not a field and is dropped."""
    name = ""
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, str) and (not item.isidentifier() or item in UNION_TAGS):
            continue
        name += f"[{item}]" if isinstance(item, int) else (f".{item}" if name else str(item))
    return name or None


UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


# -----------------------------------------------------------------------------
# Request schemas. The limits live in the schema (so /openapi.json documents them); what a schema cannot say
# (total length, role order) is checked in conversation_from().


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "python", "python_output"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | Annotated[list[Part], Field(max_length=64)]


class ChatRequest(BaseModel):
    """The native endpoint's request, as the original's plus an optional seed."""
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="0 = no top-k cut")
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class OpenAIContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url etc. are rejected below with a clear message
    type: str
    text: str | None = Field(None, max_length=MAX_MESSAGE_CHARS)


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, refusal, ... are accepted and ignored; tool_calls rejected
    role: str = Field(max_length=32)
    content: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | Annotated[list[OpenAIContentPart], Field(max_length=64)] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class OpenAIChatRequest(BaseModel):
    """OpenAI's chat completion request. Fields that change nothing here (user, metadata, store, ...) are accepted
    and ignored; fields asking for what this server cannot do (n > 1, stop, penalties, logprobs, tools, JSON
    mode) are rejected with a 400 naming them; unknown fields are rejected, as OpenAI's API does."""
    model_config = ConfigDict(extra="forbid")
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str | None = Field(None, max_length=256, description="any name: this server serves one model")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=0, le=1, description="only 1 (no nucleus cut) is supported")
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="nanochat extension; 0 = off")
    n: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="not supported: only null or []")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only null or {}")
    logprobs: bool | None = Field(None, description="not supported: only false")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="not supported: only 0")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: only null or []")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none" or "auto" without tools')
    functions: list[dict[str, Any]] | None = Field(None, description="not supported: only null or []")
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None


def unsupported_openai_fields(body):
    """Raise a 400 for the first field that asks for something this server does not do."""
    checks = [
        ("n", body.n not in (None, 1), "only n=1 is supported (send n requests for n samples)"),
        ("top_p", body.top_p not in (None, 1), "only top_p=1 is supported; use temperature or top_k"),
        ("stop", body.stop not in (None, []), "stop sequences are not supported"),
        ("presence_penalty", body.presence_penalty not in (None, 0), "only 0 is supported"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0), "only 0 is supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
        ("logprobs", bool(body.logprobs), "logprobs are not supported"),
        ("top_logprobs", bool(body.top_logprobs), "logprobs are not supported"),
        ("tools", bool(body.tools) or bool(body.functions), "function calling is not supported by this model"),
        ("tool_choice", body.tool_choice not in (None, "none", "auto"), "function calling is not supported"),
        ("function_call", body.function_call not in (None, "none", "auto"), "function calling is not supported"),
        ("response_format", body.response_format not in (None, {"type": "text"}),
         'only {"type": "text"} is supported (no JSON mode)'),
        ("modalities", body.modalities not in (None, ["text"]), 'only ["text"] is supported'),
    ]
    for param, failed, message in checks:
        if failed:
            raise bad_request(param, message, code="unsupported_parameter")


def openai_messages(messages):
    """OpenAI messages -> native ones: content parts joined, 'developer' read as 'system', tools refused."""
    converted = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role", f"role {message.role!r} is not supported (this model has no "
                              f"function calling); allowed: 'system' or 'developer' (first message), 'user', 'assistant'")
        if (message.model_extra or {}).get("tool_calls") or (message.model_extra or {}).get("function_call"):
            raise bad_request(f"messages[{i}].tool_calls", "function calling is not supported by this model")
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}].type", f"content part type {part.type!r} is not "
                                      f"supported; only {{'type': 'text', 'text': ...}}")
            content = "".join(part.text for part in content)
        converted.append(Message(role=role, content=content or ""))
    return converted


def conversation_from(messages):
    """Check what the schema cannot (lengths of part lists and in total, roles in order, non-empty user turns) and
    return the tokenizer's conversation dict. Raises APIError 400 naming the field."""
    total = 0
    for i, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else [part.text for part in message.content]
        chars = sum(len(text) for text in parts)
        if chars > MAX_MESSAGE_CHARS:
            raise bad_request(f"messages[{i}].content", f"{chars:,} characters; at most {MAX_MESSAGE_CHARS:,} per message")
        total += chars
        if message.role != "assistant" and not isinstance(message.content, str):
            raise bad_request(f"messages[{i}].content", f"{message.role} content must be a string; only assistant "
                              f"messages may be a list of parts")
        if message.role != "assistant" and not message.content.strip():
            raise bad_request(f"messages[{i}].content", f"the {message.role} message is empty")
        has_system = messages[0].role == "system"
        expected = "user" if (i - has_system) % 2 == 0 else "assistant"
        if message.role == "system" and i > 0:
            raise bad_request(f"messages[{i}].role", "a system message is only allowed as the first message")
        if message.role != "system" and message.role != expected:
            raise bad_request(f"messages[{i}].role", f"expected {expected!r}, got {message.role!r}: after an optional "
                              f"system message, roles alternate user, assistant, user, ... ending with user")
    if total > MAX_TOTAL_CHARS:
        raise bad_request("messages", f"{total:,} characters in all; at most {MAX_TOTAL_CHARS:,}")
    if messages[-1].role != "user":
        raise bad_request(f"messages[{len(messages) - 1}].role", f"the last message must be from the user, got "
                          f"{messages[-1].role!r}")
    return {"messages": [message.model_dump() for message in messages]}


# -----------------------------------------------------------------------------
# Reply text: tokens -> (part, text) pieces, UTF-8 safe


class ReplyText:
    """Turns a reply's tokens into (part, text) pieces; part is "text", "python" (a calculator call) or
    "python_output" (its result). Tokens are decoded in a pending window that is only emitted when it does not end
    in U+FFFD, i.e. when no character is cut between two tokens (a window of 8 tokens still ending in U+FFFD is
    emitted anyway: those bytes are not UTF-8 at all)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.switch = {special("<|python_start|>"): "python", special("<|python_end|>"): "text",
                       special("<|output_start|>"): "python_output", special("<|output_end|>"): "text"}
        self.silent = {special("<|assistant_end|>"), tokenizer.get_bos_token_id(), special("<|assistant_start|>"),
                       special("<|user_start|>"), special("<|user_end|>")}
        self.part, self.pending = "text", []

    def feed(self, token):
        if token in self.switch or token in self.silent:
            pieces = self.flush()
            self.part = self.switch.get(token, self.part)
            return pieces
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return []
        return self._emit(text)

    def flush(self):
        return self._emit(self.tokenizer.decode(self.pending)) if self.pending else []

    def _emit(self, text):
        self.pending = []
        return [(self.part, text)] if text else []


def openai_content(pieces, state):
    """(part, text) pieces -> plain content: a calculator call reads <<expr=result>>. state: the last part seen."""
    out = ""
    for part, text in pieces:
        if part != state["part"]:
            out += {("text", "python"): "<<", ("python", "python_output"): "=", ("python_output", "text"): ">>",
                    ("python", "text"): ">>", ("python_output", "python"): ">><<", ("text", "python_output"): "<<="}[
                (state["part"], part)]
            state["part"] = part
        out += text
    return out


# -----------------------------------------------------------------------------
# Workers: one decode loop per device, fed from one shared queue


class QueueFull(Exception):
    pass


class Generation:
    """One request's decoding: its settings, its state, and the path its token events take back to the asyncio
    loop (the decode thread hands them over with call_soon_threadsafe)."""

    def __init__(self, prompt, max_tokens, temperature, top_k, seed, loop):
        self.prompt, self.max_tokens, self.temperature, self.top_k, self.seed = prompt, max_tokens, temperature, top_k, seed
        self.loop = loop
        self.events = asyncio.Queue()  # RowEvents, or an Exception if the decode loop failed
        self.started = asyncio.Event()  # set once prefilled into a row, or when the engine refused it (error)
        self.error = None
        self.state = "waiting"  # waiting -> running -> done; or cancelled. Written under the pool's lock.
        self.cancelled = False  # set by the request side: client gone or timed out; the worker frees the row
        self.worker = None
        self.row_id = None
        self.created = time.time()

    def cancel(self):
        self.cancelled = True
        if self.worker is not None:
            self.worker.wake.set()


class Worker:
    """One device: a BatchDecoder and the thread that runs its decode loop. Only that thread touches the decoder."""

    def __init__(self, worker_id, device, decoder, pool):
        self.worker_id, self.device, self.decoder, self.pool = worker_id, str(device), decoder, pool
        self.max_batch = decoder.num_free + decoder.num_active
        self.running = {}  # row_id -> Generation
        self.wake = threading.Event()
        self.stopping = False
        self.recent = collections.deque()  # (time, tokens) of the last steps, for tokens/s
        self.total_tokens = 0
        self.thread = threading.Thread(target=self.loop, name=f"decode-{worker_id}", daemon=True)

    def loop(self):
        with torch.inference_mode():  # grad mode is per thread: the decode thread sets its own
            while not self.stopping:
                try:
                    self.loop_once()
                except Exception as e:  # a bug must not kill the worker silently: fail its requests, go on
                    logger.exception(f"worker {self.worker_id}: decode loop failed")
                    for row_id, generation in list(self.running.items()):
                        with contextlib.suppress(Exception):
                            self.decoder.remove(row_id)
                        self._finish(row_id, generation, e)

    def loop_once(self):
        for generation in self.pool.take(self):
            try:
                row_id = self.decoder.add(generation.prompt, generation.max_tokens, generation.temperature,
                                          generation.top_k, generation.seed)
            except Exception as e:  # e.g. a prompt longer than the rows hold
                self.pool.release(self, 1)
                generation.state, generation.error = "done", e
                generation.loop.call_soon_threadsafe(generation.started.set)
                continue
            generation.row_id = row_id
            self.running[row_id] = generation
            generation.loop.call_soon_threadsafe(generation.started.set)
        for row_id, generation in list(self.running.items()):
            if generation.cancelled:
                self.decoder.remove(row_id)
                self._finish(row_id, generation, None)
        if not self.running:
            self.wake.wait(timeout=1.0)
            self.wake.clear()
            return
        events = self.decoder.step()
        now = time.time()
        self.recent.append((now, len(events)))
        self.total_tokens += len(events)
        while self.recent and self.recent[0][0] < now - 10:
            self.recent.popleft()
        by_generation = {}
        for event in events:
            generation = self.running.get(event.row_id)
            if generation is None:
                continue
            by_generation.setdefault(generation, []).append(event)
            if event.finished:
                self._finish(event.row_id, generation, None, deliver=False)
        self._deliver(list(by_generation.items()))

    def _finish(self, row_id, generation, error, deliver=True):
        del self.running[row_id]
        self.pool.release(self, 1)
        generation.state = "done"
        if error is not None and deliver:
            self._deliver([(generation, [error])])

    def _deliver(self, batch):
        # one hand-over per step for all requests of this worker (they share the server's event loop)
        if batch:
            batch[0][0].loop.call_soon_threadsafe(_put_events, batch)

    def tokens_per_second(self, window=10.0):
        """Tokens decoded in the last `window` seconds, per second (0 when idle)."""
        since = time.time() - window
        return sum(n for t, n in list(self.recent) if t > since) / window


def _put_events(batch):
    for generation, events in batch:
        for event in events:
            generation.events.put_nowait(event)


class WorkerPool:
    """The workers and the one queue of requests waiting for a free row. The lock guards the queue, each
    Generation's state and the per-worker count of rows in use."""

    def __init__(self, max_queue, request_timeout):
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.workers = []
        self.lock = threading.Lock()
        self.waiting = collections.deque()
        self.rows_in_use = {}
        self.total_requests = 0

    def add_worker(self, device, decoder):
        worker = Worker(len(self.workers), device, decoder, self)
        self.workers.append(worker)
        self.rows_in_use[worker.worker_id] = 0
        return worker

    def start(self):
        for worker in self.workers:
            worker.thread.start()

    def stop(self):
        for worker in self.workers:
            worker.stopping = True
            worker.wake.set()
        for worker in self.workers:
            worker.thread.join(timeout=5)

    def free_rows(self):
        return sum(worker.max_batch - self.rows_in_use[worker.worker_id] for worker in self.workers)

    def submit(self, generation):
        with self.lock:
            if len(self.waiting) >= self.max_queue + self.free_rows():
                raise QueueFull()
            self.waiting.append(generation)
            self.total_requests += 1
        for worker in self.workers:
            worker.wake.set()

    def take(self, worker):
        """Called by a worker's thread: the waiting requests it now owns. A worker takes one only while it is among
        the least loaded, so that with several GPUs the requests spread out instead of piling onto whichever
        worker wakes first."""
        taken = []
        with self.lock:
            while (self.waiting and self.rows_in_use[worker.worker_id] < worker.max_batch
                   and self.rows_in_use[worker.worker_id] <= min(self.rows_in_use.values())):
                generation = self.waiting.popleft()
                if generation.state != "waiting":
                    continue
                generation.state, generation.worker = "running", worker
                self.rows_in_use[worker.worker_id] += 1
                taken.append(generation)
        return taken

    def release(self, worker, rows):
        with self.lock:
            self.rows_in_use[worker.worker_id] -= rows

    def withdraw(self, generation):
        """Take a request back from the queue; False when a worker already took it."""
        with self.lock:
            if generation.state != "waiting":
                return False
            generation.state = "cancelled"
            try:
                self.waiting.remove(generation)
            except ValueError:
                pass
            return True

    async def run(self, generation):
        """Queue a generation and wait until a worker has prefilled it; APIError 503 when the queue is full or it
        cannot start within request_timeout, APIError 400 when the engine refuses the prompt."""
        try:
            self.submit(generation)
        except QueueFull:
            raise APIError(503, f"the server is busy: all {self.free_rows() + sum(self.rows_in_use.values())} rows "
                           f"are decoding and {len(self.waiting)} requests are waiting (--max_queue="
                           f"{self.max_queue}); retry later", code="queue_full", type="server_error",
                           headers={"Retry-After": "1"})
        try:
            await asyncio.wait_for(generation.started.wait(), timeout=self.request_timeout)
        except asyncio.TimeoutError:
            if self.withdraw(generation):
                raise APIError(503, f"the request could not start within {self.request_timeout:g} s (every row "
                               f"busy); retry later", code="timeout", type="server_error", headers={"Retry-After": "1"})
            await generation.started.wait()  # a worker took it in the same instant: it starts now
        except BaseException:  # the client went away while queued
            self.withdraw(generation) or generation.cancel()
            raise
        if generation.error is not None:
            raise APIError(400, f"messages: the engine refused the prompt: {generation.error}", param="messages",
                           code="prompt_rejected")

    def stats(self):
        with self.lock:
            queue_length = sum(1 for generation in self.waiting if generation.state == "waiting")
            rows_in_use = dict(self.rows_in_use)
        workers = [{"gpu_id": worker.worker_id, "device": worker.device, "max_batch": worker.max_batch,
                    "active_rows": rows_in_use[worker.worker_id],
                    "free_rows": worker.max_batch - rows_in_use[worker.worker_id],
                    "tokens_per_second": round(worker.tokens_per_second(), 1), "total_tokens": worker.total_tokens}
                   for worker in self.workers]
        busy = sum(1 for w in workers if w["free_rows"] == 0)
        return {"total_workers": len(workers), "available_workers": len(workers) - busy, "busy_workers": busy,
                "active_requests": sum(rows_in_use.values()), "queue_length": queue_length,
                "tokens_per_second": round(sum(w["tokens_per_second"] for w in workers), 1),
                "total_tokens": sum(w["total_tokens"] for w in workers), "total_requests": self.total_requests,
                "max_queue": self.max_queue, "request_timeout": self.request_timeout, "workers": workers}


async def next_events(generation):
    """All events waiting for this generation (at least one): a step's worth at a time keeps the stream cheap."""
    events = [await generation.events.get()]
    while not generation.events.empty():
        events.append(generation.events.get_nowait())
    for event in events:
        if isinstance(event, Exception):
            raise event
    return events


# -----------------------------------------------------------------------------
# The app


class ReplyStream(StreamingResponse):
    """A streaming response that always runs on_close, also when the client leaves before the first byte (the body
    generator's own `finally` would not run then)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(pool, tokenizer, model_id, defaults, context_len):
    """The FastAPI app over a WorkerPool. defaults: temperature, top_k, max_tokens for requests that leave them out;
    context_len: the most tokens (prompt + reply) a row holds."""

    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="nanochat", version="1.0", lifespan=lifespan,
                  description="Chat with a nanochat model: the original streaming endpoint and an OpenAI-compatible API.")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error):
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                            code="invalid_json").response()
        param = field_name(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter").response()
        value = first.get("input")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        message = f"{param}={shown}: {first['msg']}" if first.get("type") != "missing" else f"{param}: {first['msg']}"
        return APIError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None,
                        type="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def server_error(request, error):
        logger.exception("request failed")
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    async def start(conversation, temperature, top_k, max_tokens, seed):
        try:
            prompt = tokenizer.render_for_completion({"messages": conversation["messages"] +
                                                      [{"role": "assistant", "content": ""}]})
        except ValueError as e:
            raise bad_request("messages", str(e))
        room = context_len - len(prompt)
        if room < 1:
            raise bad_request("messages", f"the conversation is {len(prompt):,} tokens and the model holds "
                              f"{context_len:,} (prompt + reply); start a new chat or shorten it", code="context_length_exceeded")
        generation = Generation(prompt, min(max_tokens or defaults["max_tokens"], room),
                                defaults["temperature"] if temperature is None else temperature,
                                defaults["top_k"] if top_k is None else top_k,
                                random.getrandbits(63) if seed is None else seed, asyncio.get_running_loop())
        await pool.run(generation)
        return generation

    async def replies(generation):
        """Yield (pieces, finish_reason or None, completion tokens so far) as the worker decodes."""
        text, completion_tokens = ReplyText(tokenizer), 0
        while True:
            pieces, finish = [], None
            for event in await next_events(generation):
                if not (event.finished and event.token in stop_tokens):
                    completion_tokens += 1
                pieces += text.feed(event.token)
                if event.finished:
                    finish = event.finish_reason or "stop"
            if finish:
                pieces += text.flush()
            yield pieces, finish, completion_tokens
            if finish:
                return

    def log_done(generation, finish, completion_tokens):
        seconds = time.time() - generation.created
        logger.info(f"worker {generation.worker.worker_id if generation.worker else '-'}: {len(generation.prompt)} "
                    f"prompt + {completion_tokens} reply tokens in {seconds:.2f} s ({finish})")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(UI_PATH.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        stats = pool.stats()
        return {"status": "ok", "ready": True, "num_gpus": stats["total_workers"], "model": model_id,
                "available_workers": stats["available_workers"]}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    @app.post("/chat/completions", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
    async def chat_completions(body: ChatRequest):
        """The original's streaming endpoint (see the module docstring for the events)."""
        generation = await start(conversation_from(body.messages), body.temperature, body.top_k, body.max_tokens, body.seed)
        gpu = generation.worker.worker_id

        async def stream():
            async for pieces, finish, completion_tokens in replies(generation):
                for part, text in pieces:
                    yield sse({"token": text, "gpu": gpu} | ({"part": part} if part != "text" else {}))
                if finish:
                    log_done(generation, finish, completion_tokens)
                    yield sse({"done": True, "finish_reason": finish})

        return ReplyStream(stream(), generation.cancel, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}", param="model",
                           code="model_not_found")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "nanochat"}

    @app.post("/v1/chat/completions", responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
    async def openai_chat_completions(body: OpenAIChatRequest, request: Request):
        """OpenAI-compatible chat completion; `stream: true` sends chat.completion.chunk events then [DONE]."""
        unsupported_openai_fields(body)
        conversation = conversation_from(openai_messages(body.messages))
        max_tokens = body.max_completion_tokens or body.max_tokens
        generation = await start(conversation, body.temperature, body.top_k, max_tokens, body.seed)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": completion_id, "created": created, "model": model_id, "system_fingerprint": None}

        def usage(completion_tokens):
            return {"prompt_tokens": len(generation.prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(generation.prompt) + completion_tokens}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(delta, finish=None):
                return sse(head | {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                state = {"part": "text"}
                async for pieces, finish, completion_tokens in replies(generation):
                    content = openai_content(pieces + ([("text", "")] if finish else []), state)
                    if content:
                        yield chunk({"content": content})
                    if finish:
                        log_done(generation, finish, completion_tokens)
                        yield chunk({}, finish)
                        if include_usage:
                            yield sse(head | {"object": "chat.completion.chunk", "choices": [],
                                              "usage": usage(completion_tokens)})
                        yield "data: [DONE]\n\n"

            return ReplyStream(stream(), generation.cancel, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # Not streaming: collect, but stop decoding if the client hangs up while it waits.
        content, state = "", {"part": "text"}
        try:
            async for pieces, finish, completion_tokens in replies(generation):
                content += openai_content(pieces + ([("text", "")] if finish else []), state)
                if not finish and await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
        finally:
            generation.cancel()
        log_done(generation, finish, completion_tokens)
        return head | {"object": "chat.completion", "usage": usage(completion_tokens), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None}, "logprobs": None,
             "finish_reason": finish}]}

    return app


# -----------------------------------------------------------------------------
# Settings and start-up

if __name__ == "__main__":
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
    parser.add_argument("--max_batch", type=int, default=0, help="rows decoded together per worker (0 = 32 on CUDA, 8 else)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests that may wait for a free row")
    parser.add_argument("--request_timeout", type=float, default=30.0, help="seconds a request may wait to start")
    args = parser.parse_args()

    import uvicorn

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import autodetect_device_type
    from nanochat.engine import BatchDecoder

    checks = [("temperature", 0 <= args.temperature <= MAX_TEMPERATURE, f"0..{MAX_TEMPERATURE}"),
              ("top_k", 0 <= args.top_k <= MAX_TOP_K, f"0..{MAX_TOP_K}"),
              ("max_tokens", 1 <= args.max_tokens <= MAX_MAX_TOKENS, f"1..{MAX_MAX_TOKENS}"),
              ("num_gpus", args.num_gpus >= 1, ">= 1"), ("max_batch", args.max_batch >= 0, ">= 0"),
              ("max_queue", args.max_queue >= 0, ">= 0"), ("request_timeout", args.request_timeout > 0, "> 0")]
    for name, ok, allowed in checks:
        if not ok:
            raise UserError(f"--{name}={getattr(args, name)}: allowed {allowed}")
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            raise UserError(f"--num_gpus={args.num_gpus} but torch sees {torch.cuda.device_count()} GPUs")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        if args.num_gpus != 1:
            raise UserError(f"--num_gpus={args.num_gpus}: {device_type} runs exactly one worker; leave -n out")
        devices = [torch.device(device_type)]
    max_batch = args.max_batch or (32 if device_type == "cuda" else 8)

    pool = WorkerPool(args.max_queue, args.request_timeout)
    for device in devices:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        pool.add_worker(device, BatchDecoder(model, tokenizer, max_batch))
        logger.info(f"worker {len(pool.workers) - 1}: {device}, {max_batch} rows")
    model_id = f"nanochat-{args.source}-{args.model_tag or 'd' + str(model.config.n_layer)}"
    context_len = getattr(pool.workers[0].decoder, "max_seq_len", None) or model.config.sequence_len
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    app = create_app(pool, tokenizer, model_id, defaults, context_len)
    logger.info(f"serving {model_id} on http://{args.host}:{args.port} (OpenAI API at /v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
