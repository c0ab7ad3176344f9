"""
The chat server: one model served to many people at once over HTTP, as a FastAPI app (scripts/chat_web.py loads
the model and runs it). Endpoints: the chat page at / (nanochat/ui.html); POST /chat/completions, the original's
streaming endpoint; an OpenAI-compatible API under /v1 (chat completions, streaming or not, and the model list);
GET /health and /stats.

/openapi.json is the contract: every rule a request must follow is a constraint in the request models below, from
which FastAPI both validates and writes the schema, and every error status is documented. An error is
{"error": {"message", "type", "param", "code"}}, as from OpenAI's API.

Native stream, Server-Sent Events, one JSON object per `data:` line:
    {"token": "Hello", "gpu": 0}                          reply text
    {"token": "12*7", "gpu": 0, "part": "python"}          a calculator call as the model writes it
    {"token": "84", "gpu": 0, "part": "python_output"}     the calculator's result, forced in by the engine
    {"done": true, "finish_reason": "stop" | "length"}
The tool's delimiter tokens are not sent as text: a change of "part" marks them. Assistant messages sent back may
carry these parts as content (Part below), so that the next prompt is rendered exactly as in training. OpenAI
replies are plain strings in which a calculator call reads <<12*7=84>>.

Scheduling: a Worker (one per GPU, or one on CPU/MPS) runs ONE decode loop over an engine BatchDecoder in its own
thread. A request is prefilled into a free row and decodes alongside the others from the next step; a finished
request, or a client that went away, frees its row at once. Requests that find every row busy wait in one queue of
at most max_queue, and get a 503 if they cannot start within request_timeout seconds.
Not for: authentication, per-user rate limits or several models at once (put a proxy in front for those).
"""

import asyncio
import collections
import contextlib
import json
import os
import random
import threading
import time
import uuid
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.common import logger
from nanochat.tokenizer import ReplyText

UI_PATH = os.path.join(os.path.dirname(__file__), "ui.html")

# Request limits (as the original server's): one request may not hold a worker for long or flood its memory
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_PARTS = 64
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 200
MAX_MAX_TOKENS = 4096
MAX_SEED = 2**53 - 1  # the largest integer that every JSON parser (IEEE doubles in JavaScript) reads exactly

# -----------------------------------------------------------------------------
# Requests. FastAPI validates them with these models and documents them in /openapi.json from the same models.
# Strict: a value is taken only in the JSON type the schema gives (no "5" for 5, no 0 for false).

STRICT, OPEN = ConfigDict(extra="forbid", strict=True), ConfigDict(extra="allow", strict=True)
Text = Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
NO_TOOLS = "not supported, this model has no function calling: only null or empty"
MESSAGES = ("The conversation, rendered in the turns the model was trained on: system text is read as user text, "
            "consecutive user messages are joined with a blank line, and an assistant message (or the reply) that "
            "does not follow a user message gets an empty user turn before it. It must fit the model's context with "
            "room for a reply.")


def integer(low, high):
    """An int in [low, high]. JSON Schema's integers include 3.0, which strict mode alone would refuse."""
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(
        lambda value: int(value) if isinstance(value, float) and value.is_integer() else value)]


def _boolean(value):  # strict mode does not stop a Literal[False] from taking 0
    if not isinstance(value, bool):
        raise ValueError("Input should be a valid boolean")
    return value


class Part(BaseModel):
    model_config = STRICT
    type: Literal["text", "python", "python_output"]
    text: Text


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[Part], Field(max_length=MAX_PARTS)] = Field(
        description="a string, or parts as the stream sent them (a user's or system's parts are read as text)")


class ChatRequest(BaseModel):
    """The native endpoint's request: the original's, plus an optional seed."""
    model_config = STRICT
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES, description=MESSAGES)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: integer(0, MAX_TOP_K) | None = Field(None, description="0 = no top-k cut")
    max_tokens: integer(1, MAX_MAX_TOKENS) | None = None
    seed: integer(0, MAX_SEED) | None = None


class OpenAITextPart(BaseModel):
    model_config = OPEN
    type: Literal["text"] = Field(description="only text: this model reads no images, audio or files")
    text: Text


class OpenAIMessage(BaseModel):
    model_config = OPEN  # name, refusal, ... are accepted and ignored
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is read as 'system'; no 'tool' or 'function': this model has no function calling")
    content: Text | Annotated[list[OpenAITextPart], Field(max_length=MAX_PARTS)] | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description=NO_TOOLS)
    function_call: None = Field(None, description=NO_TOOLS)


class StreamOptions(BaseModel):
    model_config = OPEN
    include_usage: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text"] = Field(description="only text: no JSON mode")


class OpenAIChatRequest(BaseModel):
    """OpenAI's chat completion request. Fields that change nothing here (user, metadata, store, ...) are accepted
    and ignored; fields asking for what this server cannot do (n > 1, stop, penalties, logprobs, tools, JSON mode)
    allow only the value that asks for nothing; unknown fields are refused, as by OpenAI's API."""
    model_config = STRICT
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES, description=MESSAGES)
    model: str | None = Field(None, max_length=256, description="any name: this server serves one model")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, ge=1, le=1, description="only 1 (no nucleus cut): use temperature or top_k")
    top_k: integer(0, MAX_TOP_K) | None = Field(None, description="nanochat's extension; 0 = no top-k cut")
    n: integer(1, 1) | None = Field(None, description="only 1: send n requests for n samples")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: integer(1, MAX_MAX_TOKENS) | None = None
    max_completion_tokens: integer(1, MAX_MAX_TOKENS) | None = None
    seed: integer(0, MAX_SEED) | None = None
    stop: Annotated[list[str], Field(max_length=0)] | None = Field(None, description="not supported: only null or []")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="only 0")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="only 0")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="only null or {}")
    logprobs: Annotated[Literal[False], BeforeValidator(_boolean)] | None = Field(None, description="only false")
    top_logprobs: integer(0, 0) | None = Field(None, description="not supported: only 0")
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description=NO_TOOLS)
    tool_choice: Literal["none", "auto"] | None = Field(None, description=NO_TOOLS)
    functions: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description=NO_TOOLS)
    function_call: Literal["none", "auto"] | None = Field(None, description=NO_TOOLS)
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)] | None = Field(
        None, description='only ["text"]')


def conversation(messages):
    """[{"role", "content"}] -> the tokenizer's conversation in the turns the model was trained on (see MESSAGES),
    ending with the assistant's turn to write."""
    turns = []
    for message in messages + [{"role": "assistant", "content": ""}]:
        role, content = message["role"], message["content"]
        if role != "assistant":
            role, content = "user", content if isinstance(content, str) else "".join(p["text"] for p in content)
            if turns and turns[-1]["role"] == "user":
                turns[-1]["content"] += "\n\n" + content
                continue
        elif not turns or turns[-1]["role"] == "assistant":
            turns.append({"role": "user", "content": ""})
        turns.append({"role": role, "content": content})
    return {"messages": turns}


# -----------------------------------------------------------------------------
# Errors: every failure is {"error": {...}} with an HTTP status, as from OpenAI's API


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}

    def response(self):
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def bad_request(param, message, code="invalid_value"):
    return APIError(400, f"{param}: {message}", param=param, code=code)


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error or server_error")
    param: str | None = Field(description="the request field at fault, e.g. messages[0].content")
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {
    400: "Invalid request (the message and `param` name the field), or a conversation longer than the model's "
         "context (code context_length_exceeded).",
    404: "No such model (code model_not_found).",
    500: "A bug in the server.",
    503: "Every row is busy and the queue is full (code queue_full), or the request could not start within the "
         "server's timeout (code timeout): retry after Retry-After seconds.",
}


def documented(*statuses):
    """The OpenAPI `responses` entries of these error statuses."""
    return {status: {"model": ErrorBody, "description": ERRORS[status]} |
            ({"headers": {"Retry-After": {"schema": {"type": "integer"}}}} if status == 503 else {})
            for status in statuses}


def field_name(loc):
    """('body', 'messages', 0, 'content', 'list[Part]', 1) -> 'messages[0].content[1]'. Pydantic puts the member of
    a union that failed (constrained-str, list[Part]) into the location; it is not a field and is dropped."""
    name = ""
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            name += f"[{item}]"
        elif item.isidentifier():
            name += f".{item}" if name else item
    return name or None


def validation_error(error):
    """The APIError for a request the models refuse: the most specific of pydantic's errors (in a union, the
    member that got furthest), naming the field and the value seen."""
    first = max(error.errors(), key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return APIError(400, message, code="invalid_json")
    param = field_name(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    shown = "" if first.get("type") == "missing" else "=" + repr(first.get("input"))
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    return APIError(400, f"{param or 'the request body'}{shown}: {first['msg']}", param=param, code=first.get("type"))


# -----------------------------------------------------------------------------
# Workers: one decode loop per device, fed from one shared queue


class Generation:
    """One request's decoding: its settings, its state, and the path its token events take back to the asyncio
    loop (the decode thread hands them over with call_soon_threadsafe)."""

    def __init__(self, prompt, max_tokens, temperature, top_k, seed, loop):
        self.prompt, self.max_tokens, self.temperature, self.top_k = prompt, max_tokens, temperature, top_k
        self.seed, self.loop = seed, loop
        self.events = asyncio.Queue()  # RowEvents, or an Exception if the decode loop failed
        self.started = asyncio.Event()  # set once prefilled into a row, or when the engine refused it (error)
        self.error = None
        self.state = "waiting"  # -> "running" once a worker takes it, or "cancelled"; written under the pool's lock
        self.cancelled = False  # set by the request side: client gone or timed out; the worker frees the row
        self.worker = None
        self.created = time.time()

    def cancel(self):
        self.cancelled = True
        if self.worker is not None:
            self.worker.wake.set()


class Worker:
    """One device: a BatchDecoder and the thread that runs its decode loop. Only that thread touches the decoder
    and `running`, whose size is the worker's load."""

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
                        del self.running[row_id]
                        generation.loop.call_soon_threadsafe(_put_events, [(generation, [e])])

    def loop_once(self):
        while (generation := self.pool.take(self)) is not None:
            try:
                row_id = self.decoder.add(generation.prompt, generation.max_tokens, generation.temperature,
                                          generation.top_k, generation.seed)
                self.running[row_id] = generation
            except Exception as e:  # e.g. a prompt longer than the rows hold
                generation.error = e
            generation.loop.call_soon_threadsafe(generation.started.set)
        for row_id, generation in list(self.running.items()):
            if generation.cancelled:
                self.decoder.remove(row_id)
                del self.running[row_id]
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
            if generation is not None:
                by_generation.setdefault(generation, []).append(event)
                if event.finished:
                    del self.running[event.row_id]
        if by_generation:  # one hand-over per step for all requests of this worker (they share one event loop)
            next(iter(by_generation)).loop.call_soon_threadsafe(_put_events, list(by_generation.items()))

    def tokens_per_second(self, window=10.0):
        """Tokens decoded in the last `window` seconds, per second (0 when idle)."""
        since = time.time() - window
        return sum(n for t, n in list(self.recent) if t > since) / window


def _put_events(batch):
    for generation, events in batch:
        for event in events:
            generation.events.put_nowait(event)


class WorkerPool:
    """The workers and the one queue of requests waiting for a free row. The lock guards the queue and each
    Generation's state."""

    def __init__(self, max_queue, request_timeout):
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.workers = []
        self.lock = threading.Lock()
        self.waiting = collections.deque()
        self.total_requests = 0

    def add_worker(self, device, decoder):
        self.workers.append(Worker(len(self.workers), device, decoder, self))

    def start(self):
        for worker in self.workers:
            worker.thread.start()

    def stop(self):
        for worker in self.workers:
            worker.stopping = True
            worker.wake.set()
        for worker in self.workers:
            worker.thread.join(timeout=5)

    def take(self, worker):
        """Called by a worker's thread: a waiting request it now owns, or None. A worker takes one only while it is
        among the least loaded, so that with several GPUs the requests spread out instead of piling onto whichever
        worker wakes first."""
        load = len(worker.running)
        if load >= worker.max_batch or load > min(len(other.running) for other in self.workers):
            return None
        with self.lock:
            while self.waiting:
                generation = self.waiting.popleft()
                if generation.state == "waiting":
                    generation.state, generation.worker = "running", worker
                    return generation
        return None

    def withdraw(self, generation):
        """Take a request back from the queue; False when a worker already took it."""
        with self.lock:
            if generation.state != "waiting":
                return False
            generation.state = "cancelled"
            with contextlib.suppress(ValueError):
                self.waiting.remove(generation)
            return True

    async def run(self, generation):
        """Queue a generation and wait until a worker has prefilled it; APIError 503 when the queue is full or it
        cannot start within request_timeout, APIError 400 when the engine refuses the prompt."""
        with self.lock:
            if len(self.waiting) >= self.max_queue + sum(w.max_batch - len(w.running) for w in self.workers):
                raise APIError(503, f"the server is busy: all {sum(w.max_batch for w in self.workers)} rows are "
                               f"decoding and {len(self.waiting)} requests are waiting (--max_queue={self.max_queue}); "
                               f"retry later", code="queue_full", type="server_error", headers={"Retry-After": "1"})
            self.waiting.append(generation)
            self.total_requests += 1
        for worker in self.workers:
            worker.wake.set()
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
            raise bad_request("messages", f"the engine refused the prompt: {generation.error}", code="prompt_rejected")

    def stats(self):
        with self.lock:
            queue_length = sum(1 for generation in self.waiting if generation.state == "waiting")
        workers = [{"gpu_id": worker.worker_id, "device": worker.device, "max_batch": worker.max_batch,
                    "active_rows": len(worker.running), "free_rows": worker.max_batch - len(worker.running),
                    "tokens_per_second": round(worker.tokens_per_second(), 1), "total_tokens": worker.total_tokens}
                   for worker in self.workers]
        busy = sum(1 for w in workers if w["free_rows"] == 0)
        return {"total_workers": len(workers), "available_workers": len(workers) - busy, "busy_workers": busy,
                "active_requests": sum(w["active_rows"] for w in workers), "queue_length": queue_length,
                "tokens_per_second": round(sum(w["tokens_per_second"] for w in workers), 1),
                "total_tokens": sum(w["total_tokens"] for w in workers), "total_requests": self.total_requests,
                "max_queue": self.max_queue, "request_timeout": self.request_timeout, "workers": workers}


async def replies(generation, text):
    """Yield (pieces, finish_reason or None, completion tokens so far) as the worker decodes; text: a ReplyText.
    Each turn takes all the events waiting (a step's worth or more), which keeps the stream cheap."""
    completion_tokens, finish = 0, None
    while not finish:
        events = [await generation.events.get()]
        while not generation.events.empty():
            events.append(generation.events.get_nowait())
        pieces = []
        for event in events:
            if isinstance(event, Exception):
                raise event
            completion_tokens += event.finish_reason != "stop"  # a stop token is not part of the reply
            pieces += text.feed(event.token)
            finish = finish or event.finish_reason
        if finish:
            logger.info(f"worker {generation.worker.worker_id}: {len(generation.prompt)} prompt + {completion_tokens} "
                        f"reply tokens in {time.time() - generation.created:.2f} s ({finish})")
        yield pieces + (text.flush() if finish else []), finish, completion_tokens


# -----------------------------------------------------------------------------
# The app


class ReplyStream(StreamingResponse):
    """A Server-Sent Events response that always runs on_close, also when the client leaves before the first byte
    (the body generator's own `finally` would not run then)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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

    app = FastAPI(title="nanochat", version="1.0", lifespan=lifespan, responses=documented(500),
                  description="Chat with a nanochat model: the original's streaming endpoint and an OpenAI-compatible "
                              "API. Every error is {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    model_card = {"id": model_id, "object": "model", "created": 0, "owned_by": "nanochat"}

    def openapi():  # FastAPI documents a 422 for every request model; this server answers 400 (documented) instead
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema["components"]["schemas"].pop(name, None)
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(request, error):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        return validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):  # 404 for an unknown path; 405 (with its Allow header) for a wrong method
        return APIError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None,
                        headers=error.headers).response()

    @app.exception_handler(Exception)
    async def server_error(request, error):
        logger.exception("request failed")
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    async def start(messages, body, max_tokens):
        # tokenizing up to MAX_MESSAGES * MAX_MESSAGE_CHARS characters takes a while: not on the event loop
        prompt = await asyncio.to_thread(tokenizer.render_for_completion, conversation(messages))
        room = context_len - len(prompt)
        if room < 1:
            raise bad_request("messages", f"the conversation is {len(prompt):,} tokens and the model holds "
                              f"{context_len:,} (prompt + reply); start a new chat or shorten it",
                              code="context_length_exceeded")
        generation = Generation(prompt, min(max_tokens or defaults["max_tokens"], room),
                                defaults["temperature"] if body.temperature is None else body.temperature,
                                defaults["top_k"] if body.top_k is None else body.top_k,
                                random.getrandbits(63) if body.seed is None else body.seed, asyncio.get_running_loop())
        await pool.run(generation)
        return generation

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        with open(UI_PATH, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        stats = pool.stats()
        return {"status": "ok", "ready": True, "num_gpus": stats["total_workers"], "model": model_id,
                "available_workers": stats["available_workers"]}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    @app.post("/chat/completions", response_class=StreamingResponse, responses=documented(400, 503) | {
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events (see the API's description)"}})
    async def chat_completions(body: ChatRequest):
        """The original's streaming endpoint: reply text and calculator parts as Server-Sent Events."""
        generation = await start(body.model_dump()["messages"], body, body.max_tokens)
        gpu = generation.worker.worker_id

        async def stream():
            async for pieces, finish, completion_tokens in replies(generation, ReplyText(tokenizer)):
                for part, text in pieces:
                    yield sse({"token": text, "gpu": gpu} | ({"part": part} if part != "text" else {}))
                if finish:
                    yield sse({"done": True, "finish_reason": finish})

        return ReplyStream(stream(), generation.cancel)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name}", responses=documented(404))
    async def get_model(name: str = Path(examples=[model_id])):
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}", param="model",
                           code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions", responses=documented(400, 503) | {
        200: {"content": {"application/json": {}, "text/event-stream": {}}}})
    async def openai_chat_completions(body: OpenAIChatRequest, request: Request):
        """OpenAI-compatible chat completion; `stream: true` sends chat.completion.chunk events then [DONE]."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content
                     if isinstance(m.content, str) else "".join(part.text for part in m.content or [])}
                    for m in body.messages]
        generation = await start(messages, body, body.max_completion_tokens or body.max_tokens)
        text = ReplyText(tokenizer)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_id,
                "system_fingerprint": None}

        def usage(completion_tokens):
            return {"prompt_tokens": len(generation.prompt), "completion_tokens": completion_tokens,
                    "total_tokens": len(generation.prompt) + completion_tokens}

        if body.stream:
            def chunk(delta, finish=None):
                return sse(head | {"object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                async for pieces, finish, completion_tokens in replies(generation, text):
                    content = text.inline(pieces, end=bool(finish))
                    if content:
                        yield chunk({"content": content})
                    if finish:
                        yield chunk({}, finish)
                        if body.stream_options and body.stream_options.include_usage:
                            yield sse(head | {"object": "chat.completion.chunk", "choices": [],
                                              "usage": usage(completion_tokens)})
                        yield "data: [DONE]\n\n"

            return ReplyStream(stream(), generation.cancel)

        # Not streaming: collect, but stop decoding if the client hangs up while it waits.
        content = ""
        try:
            async for pieces, finish, completion_tokens in replies(generation, text):
                content += text.inline(pieces, end=bool(finish))
                if not finish and await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
        finally:
            generation.cancel()
        return head | {"object": "chat.completion", "usage": usage(completion_tokens), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None}, "logprobs": None,
             "finish_reason": finish}]}

    return app
