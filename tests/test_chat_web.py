"""The chat server (nanochat/server.py): scripts/chat_web.py run as a user runs it (uvicorn in a subprocess) on a
tiny random checkpoint for the native stream, the OpenAI API through the official client, the limits and
concurrency; an in-process server whose decoder replays scripted replies for what needs exact control (queue full,
timeouts, disconnects, tool calls) and for the schemathesis run against /openapi.json. Also home of the helpers
tests/test_ui.py uses: ScriptedDecoder and serve_in_thread."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import httpx
import pytest

from nanochat.server import WorkerPool, conversation, create_app
from nanochat.tokenizer import ReplyText

from model_setup import make_chat_checkpoint
from pretraining_setup import install_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
RowEvent = namedtuple("RowEvent", "row_id token mask finished finish_reason")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, process=None, timeout=300):
    # the timeout only ends a test whose server never comes up (a loaded machine may take a minute to start it)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no answer from {url}/health within {timeout} s")


def wait_for(condition, what, timeout=60):
    """Poll until condition() holds. The timeout only ends a test whose condition never comes: not a speed bound."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"not the case after {timeout} s: {what}")
        time.sleep(0.02)


def stats(url):
    return httpx.get(f"{url}/stats", timeout=30).json()


def sse_events(lines):
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def stream_native(url, body):
    """POST /chat/completions; returns the list of decoded JSON events."""
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(data) for data in sse_events(response.iter_lines())]


def native_text(events):
    return "".join(event["token"] for event in events if "token" in event and "part" not in event)


# -----------------------------------------------------------------------------
# An in-process server with a scripted decoder


class ScriptedDecoder:
    """Stands in for engine.BatchDecoder: a row replays the tokens script(prompt_tokens) returns, one per step
    (each step sleeps step_seconds), then <|assistant_end|>. max_tokens is not enforced, so a row with an endless
    script only ends when its client goes away (the engine's own "length" finish is tested on the real server)."""

    def __init__(self, tokenizer, script, max_batch=4, step_seconds=0.0):
        self.tokenizer, self.script, self.step_seconds = tokenizer, script, step_seconds
        self.rows = [None] * max_batch
        self.removed = []
        self.end = tokenizer.encode_special("<|assistant_end|>")

    @property
    def num_active(self):
        return sum(row is not None for row in self.rows)

    @property
    def num_free(self):
        return len(self.rows) - self.num_active

    def add(self, tokens, max_tokens, temperature, top_k, seed):
        if None not in self.rows:
            raise RuntimeError("no free row")
        row_id = self.rows.index(None)
        self.rows[row_id] = iter(self.script(tokens))
        return row_id

    def step(self):
        time.sleep(self.step_seconds)
        events = []
        for row_id, tokens in enumerate(self.rows):
            if tokens is None:
                continue
            token = next(tokens, None)
            events.append(RowEvent(row_id, self.end, 1, True, "stop") if token is None
                          else RowEvent(row_id, token, 1, False, None))
            if token is None:
                self.rows[row_id] = None
        return events

    def remove(self, row_id):
        self.removed.append(row_id)
        self.rows[row_id] = None


@contextlib.contextmanager
def serve_in_thread(app):
    """Run an app under a real uvicorn server in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def scripted_app(tokenizer, script, max_batch=4, step_seconds=0.0, max_queue=8, request_timeout=5.0, context_len=4096,
                 num_workers=1):
    """(app, decoder of worker 0) over num_workers workers with scripted decoders."""
    pool = WorkerPool(max_queue=max_queue, request_timeout=request_timeout)
    decoders = [ScriptedDecoder(tokenizer, script, max_batch, step_seconds) for _ in range(num_workers)]
    for decoder in decoders:
        pool.add_worker("cpu", decoder)
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 512}
    return create_app(pool, tokenizer, "nanochat-test", defaults, context_len), decoders[0]


@pytest.fixture
def byte_tokenizer(tmp_path):
    return install_tokenizer(tmp_path / "tok")


def forever(token):
    def script(prompt):
        while True:
            yield token
    return script


# -----------------------------------------------------------------------------
# Text of a reply: UTF-8 safe, calculator calls readable


def test_reply_text_never_emits_half_a_character(byte_tokenizer):
    text = "héllo wörld 🙂 ok"
    reply = ReplyText(byte_tokenizer)
    pieces = [piece for token in byte_tokenizer.encode(text) for piece in reply.feed(token)] + reply.flush()
    assert all("\ufffd" not in piece for _, piece in pieces)
    assert "".join(piece for _, piece in pieces) == text
    assert len(pieces) == len(text)  # one piece per character: multi-byte ones wait for their last byte


def test_calculator_call_is_a_python_part_and_reads_as_an_annotation_inline(byte_tokenizer):
    special = byte_tokenizer.encode_special
    tokens = (byte_tokenizer.encode("It is ") + [special("<|python_start|>")] + byte_tokenizer.encode("12*7")
              + [special("<|python_end|>"), special("<|output_start|>")] + byte_tokenizer.encode("84")
              + [special("<|output_end|>")] + byte_tokenizer.encode(".") + [special("<|assistant_end|>")])
    reply = ReplyText(byte_tokenizer)
    pieces = [piece for token in tokens for piece in reply.feed(token)] + reply.flush()
    assert reply.parts == [{"type": "text", "text": "It is "}, {"type": "python", "text": "12*7"},
                           {"type": "python_output", "text": "84"}, {"type": "text", "text": "."}]
    assert ReplyText(byte_tokenizer).inline(pieces, end=True) == "It is <<12*7=84>>."


def test_a_call_the_reply_ends_in_is_closed_inline_and_two_calls_stay_two_parts(byte_tokenizer):
    special = byte_tokenizer.encode_special
    call = [special("<|python_start|>"), *byte_tokenizer.encode("1+1"), special("<|python_end|>")]
    reply = ReplyText(byte_tokenizer)
    pieces = [piece for token in call + call[:-1] for piece in reply.feed(token)] + reply.flush()
    assert reply.parts == [{"type": "python", "text": "1+1"}, {"type": "python", "text": "1+1"}]
    assert reply.inline(pieces, end=True) == "<<1+11+1>>"


def test_messages_in_any_order_are_rendered_in_the_turns_the_model_was_trained_on():
    parts = [{"type": "text", "text": "So "}, {"type": "python", "text": "1+1"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "user", "content": parts}, {"role": "assistant", "content": parts},
                {"role": "assistant", "content": "again"}]
    assert conversation(messages)["messages"] == [
        {"role": "user", "content": "Be brief.\n\nHi\n\nSo 1+1"}, {"role": "assistant", "content": parts},
        {"role": "user", "content": ""}, {"role": "assistant", "content": "again"},
        {"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    assert conversation([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": ""}])["messages"] == [
        {"role": "user", "content": ""}, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": ""},
        {"role": "assistant", "content": ""}]


# -----------------------------------------------------------------------------
# The real server on a tiny checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("chat_web") / "base"
    model, tokenizer = make_chat_checkpoint(base_dir, source="sft", model_tag="d2")
    return base_dir, model, tokenizer


@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("nanochat.engine", reason="nanochat.engine (BatchDecoder) is not there yet")
    base_dir, _, _ = checkpoint
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    log = open(base_dir / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-p", str(port), "--host", "127.0.0.1",
                                "--device_type=cpu", "--max_batch=8", "--max_queue=64", "-m", "32"],
                               cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def greedy_reference(model, tokenizer, messages, max_tokens):
    """What the model says greedily after the training render of `messages`, cut at its stop token."""
    prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    tokens = []
    for token in model.generate(prompt, max_tokens=max_tokens, temperature=0):
        if token in stops:
            break
        tokens.append(token)
    return tokens


def test_native_stream_is_the_greedy_reply_to_the_training_render(server, checkpoint):
    _, model, tokenizer = checkpoint
    messages = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Rayleigh."},
                {"role": "user", "content": "Say more, ünïcode 🙂"}]
    events = stream_native(server, {"messages": messages, "temperature": 0, "max_tokens": 24})
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    assert all(event["gpu"] == 0 for event in events[:-1])
    expected = greedy_reference(model, tokenizer, messages, 24)
    if not set(expected) & {tokenizer.encode_special(f"<|{name}|>") for name in ("python_start", "output_start")}:
        assert native_text(events) == tokenizer.decode(expected)


def test_a_leading_system_message_is_folded_into_the_first_user_turn(server):
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    folded = [{"role": "user", "content": "Be brief.\n\nHi"}]
    replies = [native_text(stream_native(server, {"messages": m, "temperature": 0, "max_tokens": 16}))
               for m in (system, folded)]
    assert replies[0] == replies[1]


def test_openai_client_non_streaming_and_streaming_agree(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    model_id = client.models.list().data[0].id
    assert model_id.startswith("nanochat-sft")
    messages = [{"role": "system", "content": "You are nanochat."}, {"role": "user", "content": "What is 2+2?"}]
    completion = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20, seed=1)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 1 <= usage.completion_tokens <= 20
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 20)

    chunks = list(client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert streamed == choice.message.content
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens


def test_openai_errors_come_back_as_openai_errors(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


LIMIT_CASES = [  # (body fields, the param the error must name)
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 501}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "x" * 8000}] * 2
      + [{"role": "user", "content": "x" * 8000}]}, "messages"),  # longer than the model's context
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 201}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4097}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_every_limit_is_a_400_json_error_naming_the_field(server, path):
    for body, param in LIMIT_CASES:
        response = httpx.post(f"{server}{path}", json=body, timeout=30)
        assert response.status_code == 400, (body if len(str(body)) < 200 else param, response.text)
        error = response.json()["error"]
        assert error["param"] is not None and error["param"].startswith(param), (param, error)
        assert error["message"] and error["type"] == "invalid_request_error"


def test_unsupported_openai_fields_are_refused_and_harmless_ones_accepted(server):
    hi = [{"role": "user", "content": "hi"}]
    for field, value in [("stop", ["\n"]), ("top_p", 0.5), ("presence_penalty", 1.0), ("logprobs", True),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "json_object"}), ("unknown_field", 1)]:
        response = httpx.post(f"{server}/v1/chat/completions", json={"messages": hi, field: value}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"].startswith(field), response.text
    response = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "model": "gpt-4o", "messages": [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], "n": 1, "top_p": 1, "user": "u1", "stream_options": None,
        "max_completion_tokens": 4, "metadata": {"a": "b"}, "presence_penalty": 0, "tool_choice": "none"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4
    tool = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]
    response = httpx.post(f"{server}/v1/chat/completions", json={"messages": tool}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[1].role"


def test_bad_json_and_unknown_paths_are_json_errors(server):
    response = httpx.post(f"{server}/chat/completions", content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{server}/nowhere", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_page_health_and_stats(server):
    page = httpx.get(server, timeout=10)
    assert page.status_code == 200 and "<title>nanochat</title>" in page.text
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    stats = httpx.get(f"{server}/stats", timeout=10).json()
    assert stats["total_workers"] == 1 and stats["workers"][0]["max_batch"] == 8
    assert {"active_requests", "queue_length", "tokens_per_second"} <= set(stats)


def test_32_concurrent_streams_all_complete(server):
    async def one(client, i):
        body = {"messages": [{"role": "user", "content": f"Tell me about {i}"}], "max_tokens": 12, "temperature": 1.0}
        async with client.stream("POST", f"{server}/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [json.loads(data) async for data in _aiter_events(response)]
        return events

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[one(client, i) for i in range(32)])

    before = httpx.get(f"{server}/stats", timeout=10).json()["total_requests"]
    results = asyncio.run(main())
    assert all(events[-1].get("done") for events in results)
    stats = httpx.get(f"{server}/stats", timeout=10).json()
    assert stats["total_requests"] - before == 32
    assert stats["active_requests"] == 0 and stats["queue_length"] == 0


async def _aiter_events(response):
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


# -----------------------------------------------------------------------------
# Scheduling, on the in-process server with scripted replies


def test_calculator_parts_in_the_native_stream(byte_tokenizer):
    special = byte_tokenizer.encode_special
    reply = (byte_tokenizer.encode("So ") + [special("<|python_start|>")] + byte_tokenizer.encode("6*7")
             + [special("<|python_end|>"), special("<|output_start|>")] + byte_tokenizer.encode("42")
             + [special("<|output_end|>")] + byte_tokenizer.encode("!"))
    app, _ = scripted_app(byte_tokenizer, lambda prompt: reply)
    with serve_in_thread(app) as url:
        events = stream_native(url, {"messages": [{"role": "user", "content": "6*7?"}]})
        content = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "6*7?"}]},
                             timeout=10).json()["choices"][0]["message"]["content"]
    joined = {}
    for event in events[:-1]:
        joined[event.get("part", "text")] = joined.get(event.get("part", "text"), "") + event["token"]
    assert joined == {"text": "So !", "python": "6*7", "python_output": "42"}
    assert content == "So <<6*7=42>>!"


def test_a_client_that_disconnects_mid_stream_frees_its_row(byte_tokenizer):
    app, decoder = scripted_app(byte_tokenizer, forever(ord("a")), max_batch=2, step_seconds=0.01)
    with serve_in_thread(app) as url:
        body = {"messages": [{"role": "user", "content": "go on forever"}]}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            assert stats(url)["active_requests"] == 1
        wait_for(lambda: stats(url)["active_requests"] == 0, "the row of the client that left is free")
        assert stats(url)["workers"][0]["free_rows"] == 2
    assert decoder.removed == [0] and decoder.num_active == 0  # the endless reply could only end this way


def test_a_request_that_finds_the_queue_full_gets_503_at_once(byte_tokenizer):
    # one row and one place in the queue: the first request decodes forever, the second waits (as long as it
    # takes: request_timeout is 10 minutes), the third is refused without waiting for anything
    app, _ = scripted_app(byte_tokenizer, forever(ord("a")), max_batch=1, step_seconds=0.01, max_queue=1,
                          request_timeout=600)
    body = {"messages": [{"role": "user", "content": "hi"}]}

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{url}/chat/completions", json=body) as running:  # takes the one row
                assert running.status_code == 200
                waiting = asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json=body))
                while (await client.get(f"{url}/stats")).json()["queue_length"] != 1:
                    await asyncio.sleep(0.02)
                full = await client.post(f"{url}/chat/completions", json=body)
                assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
                assert full.headers["retry-after"] == "1"
                assert (await client.get(f"{url}/stats")).json()["queue_length"] == 1
                waiting.cancel()  # then the row frees: the waiting request starts and sees its client gone

    with serve_in_thread(app) as url:
        asyncio.run(asyncio.wait_for(main(url), timeout=120))
        wait_for(lambda: stats(url)["queue_length"] == stats(url)["active_requests"] == 0, "every request gone")


def test_a_request_that_cannot_start_within_the_timeout_gets_503(byte_tokenizer):
    app, _ = scripted_app(byte_tokenizer, forever(ord("a")), max_batch=1, step_seconds=0.01, request_timeout=0.5)
    body = {"messages": [{"role": "user", "content": "hi"}]}

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{url}/chat/completions", json=body) as running:  # the row, forever
                assert running.status_code == 200
                timed_out = await client.post(f"{url}/v1/chat/completions", json=body)
                assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "timeout"
                assert timed_out.headers["retry-after"] == "1"

    with serve_in_thread(app) as url:
        asyncio.run(main(url))
        wait_for(lambda: stats(url)["queue_length"] == stats(url)["active_requests"] == 0, "every request gone")


def test_a_prompt_longer_than_the_context_is_a_400(byte_tokenizer):
    app, _ = scripted_app(byte_tokenizer, forever(ord("a")), context_len=32)
    with serve_in_thread(app) as url:
        response = httpx.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "x" * 100}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_requests_spread_over_the_workers(byte_tokenizer):
    app, _ = scripted_app(byte_tokenizer, forever(ord("a")), max_batch=4, step_seconds=0.01, num_workers=2)
    body = {"messages": [{"role": "user", "content": "hi"}]}

    async def main(url):
        async with httpx.AsyncClient(timeout=30) as client:
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(4):
                    stream = client.stream("POST", f"{url}/chat/completions", json=body)
                    response = await stack.enter_async_context(stream)
                    assert response.status_code == 200
                return (await client.get(f"{url}/stats")).json()

    with serve_in_thread(app) as url:
        stats = asyncio.run(main(url))
        assert [worker["active_rows"] for worker in stats["workers"]] == [2, 2]
        assert stats["total_workers"] == 2 and stats["active_requests"] == 4


# -----------------------------------------------------------------------------
# The published schema is the contract


def test_the_api_keeps_the_contract_of_its_openapi_schema(byte_tokenizer, tmp_path):
    """schemathesis as a client generator would use /openapi.json: the coverage phase (each constraint's boundary
    values, each field missing or of the wrong type, methods an endpoint does not take) and the fuzzing phase
    (random valid and invalid requests), with every check: no server error, every status and header documented,
    every request the schema allows accepted and every one it forbids refused. Derandomized: the same requests each
    run. The model's context is made large enough for any request the schema allows, and no limit on time can
    turn a slow answer on a loaded machine into a 503 or a cut stream."""
    app, _ = scripted_app(byte_tokenizer, lambda prompt: byte_tokenizer.encode("ok"), context_len=2**30,
                          request_timeout=600)
    with serve_in_thread(app) as url:
        result = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
                                 "--phases=coverage,fuzzing", "--checks=all", "--generation-deterministic",
                                 "--max-examples=40", "--workers=1", "--request-timeout=600", "--no-color"],
                                capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0 and "No issues found" in result.stdout, result.stdout[-6000:] + result.stderr
