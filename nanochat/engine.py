"""
Inference: sampling from a GPT with a KV cache, the calculator tool, and continuous batching.

- `BatchDecoder` decodes many independent requests in the rows of one KV cache: a request is prefilled into a free
  row (or several, for samples of one prompt) and joins the next step; a finished or removed request frees its row.
- `Engine.generate` streams num_samples continuations of one prompt in lockstep columns, over a BatchDecoder.
- `Completions` drives a BatchDecoder through a queue of (prompt, sample) pairs (evaluation, RL rollouts).
- The tool: the tokens between <|python_start|> and <|python_end|> go to `use_calculator`, and its result is forced
  into the stream as <|output_start|> str(result) <|output_end|> with mask 0 (the model did not choose them).

A decode step keeps everything on the device: the positions, the sampled tokens (fed straight back as the next
input) and the sampling itself (one uniform per row, drawn on the host from the request's own seeded stream and
uploaded without blocking). The host reads the tokens one step behind, while the next step runs: the one blocking
wait of a step. On CUDA the step is also compiled (fullgraph) at fixed shapes and replayed as CUDA graphs.

The engine knows token ids only; text goes through the tokenizer solely to run the calculator. Not here: the model
(nanochat/gpt.py, including KVCache), conversation rendering (nanochat/tokenizer.py), HTTP (nanochat/server.py).
"""

import ast
import math
import random
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import KVCache, softcap

# -----------------------------------------------------------------------------
# The calculator tool: a whitelist interpreter over Python's ast, never eval

MAX_EXPRESSION_CHARS = 1000  # GSM8K-style calls are a few dozen characters; the bound keeps parsing cheap
MAX_NESTING = 50  # deeper trees (e.g. 500 unary minus signs) are refused before Python's own recursion limit
MAX_NUMBER = 10**50  # every operand and result stays below this in magnitude, so no operation is ever slow
MAX_POWER_BITS = 512  # an integer power is computed only when its estimated size is at most this many bits


class _Refused(Exception):
    """The expression uses something outside the whitelist or leaves the bounds."""


def _number(value):
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused
    if abs(value) > MAX_NUMBER:
        raise _Refused
    return value


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # size of the result is about bit_length(base) * exponent bits: refuse before computing 2**10**10
        if max(base.bit_length(), 1) * exponent > MAX_POWER_BITS and abs(base) > 1:
            raise _Refused
        return base**exponent
    if abs(exponent) > 10_000 and abs(base) not in (0, 1):  # float powers this large overflow or underflow anyway
        raise _Refused
    result = float(base) ** float(exponent)  # OverflowError is caught by the caller; complex results refused below
    if isinstance(result, complex):
        raise _Refused
    return result


_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}


def _evaluate(node, depth=0):
    if depth > MAX_NESTING:
        raise _Refused
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            return value
        if type(value) in (int, float):  # not bool, not complex
            return _number(value)
        raise _Refused
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = _evaluate(node.operand, depth + 1)
        if isinstance(operand, str):
            raise _Refused
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left, depth + 1), _evaluate(node.right, depth + 1)
        if isinstance(left, str) or isinstance(right, str):  # no string repetition or concatenation: 'a' * 10**9
            raise _Refused
        return _number(_BINARY_OPS[type(node.op)](left, right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        text, needle = _evaluate(node.func.value, depth + 1), _evaluate(node.args[0], depth + 1)
        if isinstance(text, str) and isinstance(needle, str):
            return text.count(needle)
    raise _Refused


def use_calculator(expr):
    """The value of an arithmetic expression or a `'text'.count('x')` call, or None for anything else.

    Allowed: int/float literals, + - * / // % ** (operands and results below 10**50 in magnitude, powers bounded
    in size), unary + and -, parentheses, string literals and .count(str) on a string. Thousands separators are
    dropped from expressions without quotes ("1,200*3" -> 3600). The text is parsed with ast and walked by a
    whitelist interpreter (no eval/exec, no names, no attributes but .count), so the work is bounded by the input
    length: safe from any thread, no state, no signals, and hostile input returns None at once."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPRESSION_CHARS:
        return None
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _evaluate(tree.body)
    except (_Refused, SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, MemoryError,
            RecursionError):
        return None


# -----------------------------------------------------------------------------
# Special tokens and the per-row tool state


class SpecialTokens:
    """The special token ids the engine (and whoever shows its output) acts on."""

    def __init__(self, tokenizer):
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()
        self.stops = {self.assistant_end, self.bos}  # a row ends with either
        self.tool_tokens = {self.python_start, self.python_end}


MAX_EXPRESSION_TOKENS = 2 * MAX_EXPRESSION_CHARS  # stop collecting a runaway python block (it is refused anyway)


class _Request:
    """One row's request on the host: its settings, counts, random stream and tool state."""

    __slots__ = ("row_id", "position", "generated", "max_tokens", "temperature", "top_k", "rng", "forced",
                 "expression", "forced_now")

    def __init__(self, row_id, position, max_tokens, temperature, top_k, seed):
        self.row_id = row_id
        self.position = position  # tokens of this row in the cache = the slot its next input goes to
        self.generated = 0
        self.max_tokens, self.temperature, self.top_k = max_tokens, temperature, top_k or 0
        self.rng = random.Random(seed)  # one uniform per sampled token: the row's draws do not depend on its batch
        self.forced = deque()  # tool output still to be forced
        self.expression = None  # tokens while inside <|python_start|> ... <|python_end|>, else None
        self.forced_now = False  # the input of the current step was forced (mask 0)

    def observe(self, token, special, tokenizer):
        """Follow the tool protocol through an emitted token; a closed python block queues its output."""
        if self.expression is not None and token != special.python_end:
            if len(self.expression) < MAX_EXPRESSION_TOKENS:
                self.expression.append(token)
        elif token == special.python_start:
            self.expression = []
        elif token == special.python_end and self.expression is not None:
            result = use_calculator(tokenizer.decode(self.expression))
            if result is not None:
                self.forced.extend([special.output_start, *tokenizer.encode(str(result)), special.output_end])
            self.expression = None


def _check_prompt(tokens, vocab_size):
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"tokens must be a non-empty list of token ids, got {type(tokens).__name__} "
                         f"of length {len(tokens) if hasattr(tokens, '__len__') else '?'}")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
        bad = next(t for t in tokens if not (isinstance(t, int) and 0 <= t < vocab_size))
        raise ValueError(f"token id {bad!r} in the prompt: ids must be ints in [0, {vocab_size})")


def _check_sampling(temperature, top_k, max_tokens):
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k}: must be a positive int, or 0/None for no top-k restriction")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens}: must be >= 0 (or None = until the context is full)")


# -----------------------------------------------------------------------------
# Sampling on the device


def sample_tokens(logits, temperatures, top_ks, uniforms, max_top_k, full_vocab, cap=None):
    """Next token per row (B,) from logits (B, V), each row with its own settings, all on the device:
    temperatures (B,) (0 = argmax), top_ks (B,) (0 = the whole vocabulary), uniforms (B,) in [0, 1).
    A sampled row takes the token where its uniform falls in the cumulative softmax(logits / temperature) of its
    top_k largest logits (in descending order) or of the whole vocabulary (in id order): inverse-CDF sampling, so one
    host-drawn number per row decides it. max_top_k (the largest top_k of the sampled rows, at most V; 0 if none)
    and full_vocab (whether a sampled row has no top-k) say which of the two are computed at all. cap: a monotonic
    function still to apply to the logits (the softcap), applied only to those sampled from: argmax and top-k are the
    same before and after it. The uniforms must be below 1 in float32 (_uniform draws them so)."""
    cap = cap or (lambda values: values)
    if max_top_k:
        values, indices = torch.topk(logits, max_top_k, dim=-1)  # (B, K), largest first
        greedy = indices[:, 0]
    else:
        greedy = logits.argmax(dim=-1)
    if not max_top_k and not full_vocab:
        return greedy
    sampling = temperatures > 0
    scale = torch.where(sampling, temperatures, 1.0)[:, None]  # greedy rows are computed but not used
    uniforms = uniforms[:, None]
    sampled = None
    if max_top_k:
        beyond = (torch.arange(max_top_k, device=logits.device) >= top_ks[:, None]) & (top_ks[:, None] > 0)
        sampled = indices.gather(-1, _inverse_cdf(cap(values).masked_fill(beyond, float("-inf")) / scale, uniforms))
    if full_vocab:
        whole = _inverse_cdf(cap(logits) / scale, uniforms)
        sampled = whole if sampled is None else torch.where(top_ks[:, None] > 0, sampled, whole)
    return torch.where(sampling, sampled[:, 0], greedy)


def _inverse_cdf(logits, uniforms):
    # side="right" and u < 1: a token whose probability underflowed to 0 (a flat stretch of the cdf) is never hit
    cdf = torch.cumsum(F.softmax(logits, dim=-1), dim=-1)
    return torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)  # (B, 1)


def _uniform(rng):
    """One uniform in [0, 1 - 2**-24]: below 1 also in float32, which inverse-CDF sampling needs (see _inverse_cdf)."""
    return min(rng.random(), 1 - 2**-24)


def _sampling_shape(requests, vocab_size):
    """(max_top_k, full_vocab) of sample_tokens for these requests."""
    sampled = [r for r in requests if r.temperature > 0]
    return min(max((r.top_k for r in sampled), default=0), vocab_size), any(r.top_k == 0 for r in sampled)


# -----------------------------------------------------------------------------
# Host <-> device without blocking the host


def _upload(values, dtype, device, out=None):
    """A host list on the device without a blocking copy: staged in pinned memory on CUDA (the caching host allocator
    keeps the block until the copy is done) and copied with non_blocking. Into `out` if given."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    if out is None:
        return host.to(device, non_blocking=True)
    return out.copy_(host, non_blocking=True)


class _Readback:
    """Token ids copied to the host without blocking (pinned memory, non_blocking, an event); wait() is the one
    blocking host wait of a decode step, made after the next step has been launched."""

    def __init__(self, size, device):
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self.values = self.host.numpy()  # read through numpy: no torch call, no device sync
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.count = 0

    def start(self, tokens):
        self.count = tokens.size(0)
        self.host[:self.count].copy_(tokens, non_blocking=True)
        if self.event is not None:
            self.event.record()

    def wait(self):
        if self.event is not None:
            self.event.synchronize()
        return self.values[:self.count].tolist()


# -----------------------------------------------------------------------------
# The decode step: one token per row, on the device


def _decode_step(model, weights, view, tokens, temperatures, top_ks, uniforms, active, max_top_k, full_vocab):
    """Feed each row of `view` its token in `tokens` (B,), and put the row's next token in its place. Rows not
    active go back to position 0, so an idle row never runs past the cache. No host reads, no host data. weights:
    GPT.decode_weights() for GPT.decode_step, or None: the model's forward (any model, e.g. a stand-in in a test)."""
    if weights is None:
        logits, cap = model(tokens[:, None], kv_cache=view)[:, -1], None  # (B, V)
    else:  # the softcap only where sample_tokens needs it: on the top-k values, or the whole vocabulary
        logits, cap = model.decode_step(tokens, view, weights, capped=False), softcap
    tokens.copy_(sample_tokens(logits, temperatures, top_ks, uniforms, max_top_k, full_vocab, cap))
    view.pos.mul_(active)


def _fixed_step(model, weights, cache, tokens, temperatures, top_ks, uniforms, active, width, length, max_top_k,
                full_vocab):
    """_decode_step over rows [0, width) and slots [0, length) of the whole cache: the fixed-shape step."""
    _decode_step(model, weights, cache.rows(0, width, fixed_len=length), tokens[:width], temperatures[:width],
                 top_ks[:width], uniforms[:width], active[:width], max_top_k, full_vocab)


_compiled_fixed_step = None


class _CompiledStep:
    """_fixed_step compiled with torch.compile(fullgraph=True), which proves it free of host waits and graph breaks.
    Compiled with dynamic shapes, one graph serves every shape: torch.compile gives sizes 0 and 1 their own graphs, so
    widths and top-k start at 2 and both samplers always run (cheap next to the forward on a GPU), and a view that is
    the whole cache its own, so the cache keeps a spare row and a spare slot. On CUDA each (width, length, top-k)
    shape is also captured as a CUDA graph at its first use, which runs for real (a warm-up on a side stream), and
    replayed after: a step is then one launch instead of ~50 per layer."""

    def __init__(self, device):
        global _compiled_fixed_step
        if _compiled_fixed_step is None:
            _compiled_fixed_step = torch.compile(_fixed_step, fullgraph=True, dynamic=True)
        self.cuda = device.type == "cuda"
        self.graphs, self.weights_memory = {}, None
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None  # one memory pool: graphs run one at a time

    def __call__(self, key, *args):
        if not self.cuda:
            return _compiled_fixed_step(*args)
        weights = args[1]
        memory = None if weights is None else [w.data_ptr() for layer in weights for w in layer]
        if memory != self.weights_memory:  # the graphs read the weights where they were when captured
            self.graphs, self.weights_memory = {}, memory
        graph = self.graphs.get(key)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _compiled_fixed_step(*args)  # compiles (first shape), initializes the kernels' workspaces
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                _compiled_fixed_step(*args)  # recorded, not run
            self.graphs[key] = graph
        else:
            graph.replay()


def _bucket(size, smallest, largest):
    """The power of two >= size (and >= smallest), capped at largest."""
    return min(largest, max(smallest, 1 << (size - 1).bit_length()))


# -----------------------------------------------------------------------------
# BatchDecoder: continuous batching of independent requests


@dataclass
class RowEvent:
    """One decode step of one request. With finish_reason "stop", token is the stop token itself
    (<|assistant_end|> or <|bos|>), which is not part of the reply; with "length" it is the last reply token."""
    row_id: int
    token: int
    mask: int  # 1 = sampled, 0 = forced by the calculator tool
    finished: bool
    finish_reason: str | None  # None while running, "stop" or "length" when finished


class BatchDecoder:
    """One KV cache of max_batch rows decoded together, one token per active row per step().

    add() prefills a request's prompt into a free row (batch 1) and samples its first token from the prompt's last
    logits; the row joins the next step(). A step feeds every row its latest token and samples the next, all on the
    device, then reads the tokens it fed back to the host (one step behind: the only wait) to run the calculator and
    report RowEvents. Each request has its own sampling settings and seeded random stream, so its output does not
    depend on which other requests share the batch (greedy results are the same alone or batched, up to float
    rounding of batched matmuls). A row holds at most max_seq_len tokens, prompt and reply. Rows above the highest
    active one are not computed, and when at most half of those below are active the active ones are moved down.
    calculator=False leaves python blocks unevaluated (nothing is forced). compile_step (None = on for CUDA): decode
    with the compiled fixed-shape step (see _CompiledStep). Not thread-safe: call add/step/remove from one thread."""

    def __init__(self, model, tokenizer, max_batch, max_seq_len=None, calculator=True, compile_step=None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.special = SpecialTokens(tokenizer)
        self.calculator = calculator
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or model.config.sequence_len
        rotary_seq_len = getattr(model, "rotary_seq_len", None)  # stand-in models in tests have no rotary table
        if rotary_seq_len is not None and self.max_seq_len > rotary_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len}: the model's rotary table covers {rotary_seq_len}")
        self.device = model.get_device()
        if compile_step is None:
            compile_step = self.device.type == "cuda"
        self.compiled = _CompiledStep(self.device) if compile_step else None
        rows = max(max_batch, 2) + 1 if self.compiled else max_batch  # the spare row and slot: see _CompiledStep
        config = model.config
        self.cache = KVCache(rows, config.n_kv_head, self.max_seq_len + bool(self.compiled),
                             config.n_embd // config.n_head, config.n_layer, device=self.device, dtype=COMPUTE_DTYPE)
        # per row, on the device: the token fed at the next step, the sampling settings, a uniform, whether active
        self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.temperatures = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.top_ks = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.uniforms = torch.zeros(rows, dtype=torch.float32, device=self.device)
        self.active = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.readback = _Readback(rows, self.device)
        self.slots = [None] * max_batch  # _Request or None (free)
        self.slot_of = {}  # row_id -> slot
        self.next_row_id = 0

    @property
    def num_active(self):
        return len(self.slot_of)

    @property
    def num_free(self):
        return self.max_batch - len(self.slot_of)

    def add(self, tokens, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Prefill a prompt into a free row; returns its row_id (unique, never reused). max_tokens None = until
        the row is full (max_seq_len tokens). RuntimeError when no row is free or the prompt leaves no room."""
        return self.add_samples(tokens, 1, max_tokens, temperature, top_k, seed)[0]

    @torch.inference_mode()
    def add_samples(self, tokens, num_samples, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """add() of num_samples requests for one prompt, prefilled once and copied: their row_ids. Sample i is seeded
        with seed + i."""
        _check_prompt(tokens, self.model.config.vocab_size)
        _check_sampling(temperature, top_k, max_tokens)
        if max_tokens == 0:
            raise ValueError("max_tokens=0: a request must be allowed at least one token")
        if len(tokens) >= self.max_seq_len:
            raise RuntimeError(f"prompt of {len(tokens)} tokens: too long for max_seq_len={self.max_seq_len} "
                               f"(at most {self.max_seq_len - 1}, to leave room for a reply)")
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if num_samples > self.num_free:
            raise RuntimeError(f"rows busy: {num_samples} asked, {self.num_free} of {self.max_batch} free; retry when "
                               f"a request finishes")
        slots = [slot for slot, request in enumerate(self.slots) if request is None][:num_samples]
        view = self.cache.rows(slots[0], slots[0] + 1)
        view.reset()
        logits = self.model(_upload([tokens], torch.long, self.device), kv_cache=view, logits_from=-1)[:, -1]
        for slot in slots[1:]:
            self.cache.copy_row(slots[0], slot, len(tokens))
        max_tokens = self.max_seq_len if max_tokens is None else max_tokens
        requests = []
        for i, slot in enumerate(slots):
            request = _Request(self.next_row_id, len(tokens), max_tokens, temperature, top_k, seed + i)
            self.next_row_id += 1
            self.slots[slot], self.slot_of[request.row_id] = request, slot
            self.temperatures[slot], self.top_ks[slot], self.active[slot] = temperature, request.top_k, 1
            requests.append(request)
        # each row's first token, from the prompt's last logits (the row feeds it at its first step)
        rows = _upload(slots, torch.long, self.device)
        uniforms = [_uniform(r.rng) if temperature > 0 else 0.5 for r in requests]
        first = sample_tokens(logits.expand(num_samples, -1), self.temperatures[rows], self.top_ks[rows],
                              _upload(uniforms, torch.float32, self.device),
                              *_sampling_shape(requests, logits.size(-1)))
        self.tokens.index_copy_(0, rows, first)
        return [request.row_id for request in requests]

    def remove(self, row_id):
        """Free a request's row at once (its client is gone). Returns False if it had already finished."""
        slot = self.slot_of.pop(row_id, None)
        if slot is None:
            return False
        self.slots[slot] = None
        self.active[slot], self.cache.pos[slot] = 0, 0  # an idle row decodes at position 0: never past the cache
        return True

    @torch.inference_mode()
    def step(self):
        """Advance every active request by one token; returns their RowEvents (empty when none is active)."""
        if not self.slot_of:
            return []
        self._compact()
        active_slots = sorted(self.slot_of.values())
        high = active_slots[-1] + 1
        requests = [self.slots[slot] for slot in active_slots]
        for slot, request in zip(active_slots, requests):  # the tool's output replaces what the model sampled
            request.forced_now = bool(request.forced)
            if request.forced_now:
                self.tokens[slot] = request.forced.popleft()
        self.readback.start(self.tokens[:high])  # this step's inputs, read after the step is launched
        if any(not self._ends_by_length(r) for r in requests):  # else nothing needs the next token
            self._launch(requests, high)
        fed = self.readback.wait()

        events = []
        for slot, request in zip(active_slots, requests):
            token = fed[slot]
            if self.calculator:
                request.observe(token, self.special, self.tokenizer)
            reason = "stop" if token in self.special.stops else "length" if self._ends_by_length(request) else None
            request.generated += 1
            request.position += 1
            events.append(RowEvent(request.row_id, token, 0 if request.forced_now else 1, reason is not None, reason))
            if reason is not None:
                self.remove(request.row_id)
        return events

    def _ends_by_length(self, request):
        """Whether the token the request feeds now is its last: its max_tokens, or no slot left for another."""
        return request.generated + 1 >= request.max_tokens or request.position + 1 >= self.max_seq_len

    def _launch(self, requests, high):
        """This step on the device: every row [0, high) feeds its token and samples its next."""
        max_top_k, full_vocab = _sampling_shape(requests, self.model.config.vocab_size)
        if self.compiled:
            max_top_k, full_vocab = max(max_top_k, 2), True
        width = _bucket(high, 2, self.cache.batch_size - 1) if self.compiled else high
        if max_top_k or full_vocab:
            uniforms = [0.5] * width
            for request in requests:
                if request.temperature > 0:
                    uniforms[self.slot_of[request.row_id]] = _uniform(request.rng)
            _upload(uniforms, torch.float32, self.device, out=self.uniforms[:width])
        longest = max(request.position for request in requests) + 1  # slots the step reads
        weights = self.model.decode_weights() if hasattr(self.model, "decode_weights") else None
        if self.compiled:
            length = _bucket(longest, 16, self.max_seq_len)
            self.compiled((width, length, max_top_k, full_vocab), self.model, weights, self.cache, self.tokens,
                          self.temperatures, self.top_ks, self.uniforms, self.active, width, length, max_top_k,
                          full_vocab)
        else:
            view = self.cache.rows(0, width)
            view.max_pos = longest - 1
            _decode_step(self.model, weights, view, self.tokens[:width], self.temperatures[:width],
                         self.top_ks[:width], self.uniforms[:width], self.active[:width], max_top_k, full_vocab)

    def _compact(self):
        """When at most half the rows up to the highest active one are active, move the highest down into free
        rows: rows above the highest active one are not computed."""
        active_slots = sorted(self.slot_of.values())
        if 2 * len(active_slots) > active_slots[-1] + 1:
            return
        free = [slot for slot in range(len(active_slots)) if self.slots[slot] is None]
        for source, target in zip(reversed(active_slots), free):
            request = self.slots[source]
            self.cache.copy_row(source, target, request.position)
            self.tokens[target] = self.tokens[source]
            self.temperatures[target], self.top_ks[target], self.active[target] = self.temperatures[source], \
                self.top_ks[source], 1
            self.slots[target], self.slot_of[request.row_id] = request, target
            self.slots[source] = None
            self.active[source], self.cache.pos[source] = 0, 0


# -----------------------------------------------------------------------------
# Engine: num_samples continuations of one prompt, in lockstep


class Engine:
    """Cached sampling with the calculator tool, for one prompt at a time (chat_cli, generate_batch's callers). It
    keeps one BatchDecoder between calls while it fits (its cache and, on CUDA, its CUDA graphs)."""

    def __init__(self, model, tokenizer, calculator=True, compile_step=None):
        self.model = model
        self.tokenizer = tokenizer
        self.special = SpecialTokens(tokenizer)
        self.calculator, self.compile_step = calculator, compile_step
        self.decoder = None

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, mask_column), lists of num_samples ints, once per generated position.

        mask 1 = sampled by the model, 0 = forced by the calculator tool. A row finishes with the token that ends
        it (<|assistant_end|> or <|bos|>, yielded); afterwards its column entries repeat that token with mask 0.
        The generator ends when every row has finished or after max_tokens positions (None = until the model's
        context, config.sequence_len, is full). Row i samples with seed + i: same seed, same arguments -> same
        output."""
        _check_prompt(tokens, self.model.config.vocab_size)
        _check_sampling(temperature, top_k, max_tokens)
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if max_tokens is None:
            max_tokens = max(self.model.config.sequence_len - len(tokens), 0)
        if max_tokens == 0:
            return
        decoder = self._decoder(num_samples, len(tokens) + max_tokens)
        row_ids = decoder.add_samples(tokens, num_samples, max_tokens, temperature, top_k, seed)
        sample_of = {row_id: i for i, row_id in enumerate(row_ids)}
        column = [None] * num_samples  # a finished row repeats its terminal token, with mask 0
        try:
            while any(row_id in decoder.slot_of for row_id in row_ids):
                masks = [0] * num_samples
                for event in decoder.step():
                    column[sample_of[event.row_id]] = event.token
                    masks[sample_of[event.row_id]] = event.mask
                yield list(column), masks
        finally:  # also when the caller stops early: the rows are free for the next call
            for row_id in row_ids:
                decoder.remove(row_id)

    def _decoder(self, rows, seq_len):
        """The kept decoder if it is idle and large enough, else a new one (kept for the next calls)."""
        kept = self.decoder
        if kept is None or kept.num_active or kept.max_batch < rows or kept.max_seq_len < seq_len:
            self.decoder = BatchDecoder(self.model, self.tokenizer, rows, seq_len, self.calculator, self.compile_step)
        return self.decoder

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """(results, masks): per row, the prompt followed by its generated tokens (the terminal
        <|assistant_end|>/<|bos|> left out), and the matching masks (0 on the prompt and on forced tokens)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in self.special.stops:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


# -----------------------------------------------------------------------------
# Completions: a work queue of (prompt, sample) pairs through one BatchDecoder


@dataclass
class Completion:
    """One finished (prompt, sample) pair: the generated tokens (the calculator's forced ones included, the stop
    token left out), their masks (1 sampled, 0 forced), and whether it ended on a stop token (else on a length)."""
    prompt: int
    sample: int
    tokens: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    stopped: bool = False


class Completions:
    """num_samples completions of each prompt, decoded together in the rows of one BatchDecoder (max_batch at a
    time, a finished row taking the next pair at once). Iterating yields each Completion as it finishes; drop(prompt)
    gives up the prompt's other samples (queued ones never start, running ones stop), e.g. once one is correct.
    Sample j of prompt i is seeded with seed_of(i, j), so it does not depend on the batching or the other prompts.
    The decoder's rows hold the longest prompt plus max_tokens (as far as the model's rotary table allows)."""

    def __init__(self, model, tokenizer, prompts, num_samples=1, max_tokens=512, temperature=0.0, top_k=None,
                 seed_of=lambda prompt, sample: 42 + sample, max_batch=32, calculator=True, compile_step=None):
        self.prompts, self.num_samples, self.seed_of = prompts, num_samples, seed_of
        self.settings = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k)
        longest = max((len(prompt) for prompt in prompts), default=1) + max_tokens
        max_seq_len = min(longest, getattr(model, "rotary_seq_len", longest))
        self.decoder = BatchDecoder(model, tokenizer, max(1, min(max_batch, len(prompts) * num_samples)),
                                    max_seq_len, calculator, compile_step)
        self.dropped = set()
        self.running = {}  # row_id -> Completion

    def drop(self, prompt):
        self.dropped.add(prompt)
        for row_id in [row_id for row_id, c in self.running.items() if c.prompt == prompt]:
            self.decoder.remove(row_id)
            del self.running[row_id]

    def __iter__(self):
        waiting = deque((prompt, sample) for prompt in range(len(self.prompts)) for sample in range(self.num_samples))
        try:
            while waiting or self.running:
                while waiting and self.decoder.num_free:
                    prompt, sample = waiting.popleft()
                    if prompt not in self.dropped:
                        row_id = self.decoder.add(self.prompts[prompt], seed=self.seed_of(prompt, sample),
                                                  **self.settings)
                        self.running[row_id] = Completion(prompt, sample)
                for event in self.decoder.step():
                    completion = self.running.get(event.row_id)
                    if completion is None:  # its prompt was dropped earlier in this step
                        continue
                    if event.finish_reason == "stop":  # the stop token ends the reply but is not part of it
                        completion.stopped = True
                    else:
                        completion.tokens.append(event.token)
                        completion.masks.append(event.mask)
                    if event.finished:
                        del self.running[event.row_id]
                        yield completion
        finally:  # also when the caller stops early
            for row_id in list(self.running):
                self.decoder.remove(row_id)
            self.running.clear()
