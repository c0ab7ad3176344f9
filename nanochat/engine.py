"""
Inference: sampling from a GPT with a KV cache, the calculator tool, and continuous batching for a server.

- `Engine.generate` streams num_samples continuations of one prompt: the prompt is prefilled once (batch 1) and
  its cache copied into every sample row, each row then samples and stops on its own.
- `BatchDecoder` serves many independent requests from one cache of max_batch rows: a request is prefilled into a
  free row and joins the next decode step; a finished or removed request frees its row at once.
- The tool: the tokens between <|python_start|> and <|python_end|> go to `use_calculator`, and its result is forced
  into the stream as <|output_start|> str(result) <|output_end|> with mask 0 (the model did not choose them).

The engine knows token ids only; text goes through the tokenizer solely to run the calculator. Not here: the model
(nanochat/gpt.py, including KVCache), conversation rendering (nanochat/tokenizer.py), HTTP (scripts/chat_web.py).
"""

import ast
import math
import random
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import KVCache

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
# Sampling


def sample_next_token(logits, generator, temperature=1.0, top_k=None):
    """Next token ids (B, 1) long from logits (B, V): argmax when temperature is 0, else a sample from
    softmax(logits / temperature), restricted to the top_k largest logits when top_k is a positive int
    (0 or None = the whole vocabulary). generator: a torch.Generator on the logits' device (seeded by the caller)."""
    _check_sampling(temperature, top_k, None)
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k)
        probs = F.softmax(values / temperature, dim=-1)
        return indices.gather(-1, torch.multinomial(probs, num_samples=1, generator=generator))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# -----------------------------------------------------------------------------
# Per-row tool state machine, shared by Engine and BatchDecoder


class SpecialTokens:
    """The special token ids the engine acts on, and the calculator's text round-trip."""

    MAX_EXPRESSION_TOKENS = 2 * MAX_EXPRESSION_CHARS  # stop collecting a runaway python block (it is refused anyway)

    def __init__(self, tokenizer, calculator=True):
        self.tokenizer = tokenizer
        self.calculator = calculator  # False: python blocks are not run and nothing is forced
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()
        self.stops = {self.assistant_end, self.bos}
        self.tool_tokens = {self.python_start, self.python_end}

    def tool_output(self, expression_tokens):
        """Tokens to force after a python block: <|output_start|> result <|output_end|>, or [] when refused."""
        result = use_calculator(self.tokenizer.decode(expression_tokens)) if self.calculator else None
        if result is None:
            return []
        return [self.output_start, *self.tokenizer.encode(str(result)), self.output_end]


class _RowState:
    """One row's tool state: tokens queued to be forced, and the python block being collected."""

    __slots__ = ("forced", "expression", "finished")

    def __init__(self):
        self.forced = deque()
        self.expression = None  # list of tokens while inside <|python_start|> ... <|python_end|>, else None
        self.finished = False

    def next_token(self, sampled, tokens):
        """(token, mask) that this row emits given its sampled token: a queued forced token wins (mask 0)."""
        if self.forced:
            token, mask = self.forced.popleft(), 0
        else:
            token, mask = sampled, 1
        if self.expression is not None and token != tokens.python_end:
            if len(self.expression) < tokens.MAX_EXPRESSION_TOKENS:
                self.expression.append(token)
        elif token in tokens.tool_tokens:
            if token == tokens.python_start:
                self.expression = []
            elif self.expression is not None:  # python_end closes the block: run it, queue the output
                self.forced.extend(tokens.tool_output(self.expression))
                self.expression = None
        return token, mask


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


def _new_cache(model, batch_size, seq_len):
    config = model.config
    return KVCache(batch_size, config.n_kv_head, seq_len, config.n_embd // config.n_head, config.n_layer,
                   device=model.get_device(), dtype=COMPUTE_DTYPE)


# -----------------------------------------------------------------------------
# Engine: num_samples continuations of one prompt


class Engine:
    """Cached sampling with the calculator tool. Stateless between calls; one model, any number of calls."""

    def __init__(self, model, tokenizer, calculator=True):
        self.model = model
        self.tokenizer = tokenizer
        self.calculator = calculator  # False: the model's python blocks are not run; it continues on its own
        self.tokens = SpecialTokens(tokenizer, calculator)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, mask_column), lists of num_samples ints, once per generated position.

        mask 1 = sampled by the model, 0 = forced by the calculator tool. A row finishes with the token that ends
        it (<|assistant_end|> or <|bos|>, yielded); afterwards its column entries repeat that token with mask 0.
        The generator ends when every row has finished or after max_tokens positions (None = until the model's
        context, config.sequence_len, is full). Same seed, same arguments -> same output."""
        model, special = self.model, self.tokens
        _check_prompt(tokens, model.config.vocab_size)
        _check_sampling(temperature, top_k, max_tokens)
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be >= 1")
        if max_tokens is None:
            max_tokens = max(model.config.sequence_len - len(tokens), 0)
        if max_tokens == 0:
            return
        device = model.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)

        # The prompt once, batch 1; every sample row starts from a copy of its cache and samples its own first token
        prefill_cache = _new_cache(model, 1, len(tokens))
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = model(prompt, kv_cache=prefill_cache, logits_from=-1)[:, -1, :]  # (1, V)
        cache = _new_cache(model, num_samples, len(tokens) + max_tokens)
        cache.prefill(prefill_cache)
        del prefill_cache
        sampled = sample_next_token(logits.expand(num_samples, -1), generator, temperature, top_k)  # (B, 1)

        rows = [_RowState() for _ in range(num_samples)]
        column = [None] * num_samples  # a finished row repeats its terminal token, with mask 0
        live = list(range(num_samples))  # the sample row each cache row belongs to (finished rows get dropped)
        for position in range(max_tokens):
            sampled_ids = sampled.view(-1).tolist()  # the one host sync per step: the tool and the caller need ints
            masks = [0] * num_samples
            for j, i in enumerate(live):
                if not rows[i].finished:
                    column[i], masks[i] = rows[i].next_token(sampled_ids[j], special)
                    rows[i].finished = column[i] in special.stops
            yield list(column), masks
            still_running = [j for j, i in enumerate(live) if not rows[i].finished]
            if position == max_tokens - 1 or not still_running:
                return
            next_ids = [column[i] for i in live]
            if 2 * len(still_running) <= len(live):
                # at most half the rows still run: drop the finished ones from the cache rather than keep computing
                # them (a copy of the live rows, done at most log2(num_samples) times)
                keep = torch.tensor(still_running, device=device)
                cache.k, cache.v, cache.pos = cache.k[:, keep], cache.v[:, keep], cache.pos[keep]
                next_ids = [next_ids[j] for j in still_running]
                live = [live[j] for j in still_running]
            logits = model(torch.tensor(next_ids, dtype=torch.long, device=device).view(-1, 1), kv_cache=cache)[:, -1, :]
            sampled = sample_next_token(logits, generator, temperature, top_k)  # (len(live), 1)

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """(results, masks): per row, the prompt followed by its generated tokens (the terminal
        <|assistant_end|>/<|bos|> left out), and the matching masks (0 on the prompt and on forced tokens)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        stops = self.tokens.stops
        for column, mask_column in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stops:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


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


class _Request:
    __slots__ = ("row_id", "next_input", "position", "generated", "max_tokens", "temperature", "top_k", "rng",
                 "state")

    def __init__(self, row_id, next_input, position, max_tokens, temperature, top_k, seed):
        self.row_id = row_id
        self.next_input = next_input  # the token fed at the next step (the prompt's last token, at first)
        self.position = position  # tokens of this row in the cache = where next_input goes
        self.generated = 0
        self.max_tokens, self.temperature, self.top_k = max_tokens, temperature, top_k or 0
        self.rng = random.Random(seed)  # one uniform per sampled token, drawn on the host: no per-row device work
        self.state = _RowState()


def _sample_rows(logits, requests, top_k):
    """Next token ids (n,) for n rows that all sample with the same top_k (0 = whole vocabulary) but their own
    temperatures and random streams: inverse-CDF sampling with one host-drawn uniform per row, batched on device."""
    device = logits.device
    temperatures = torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device)[:, None]
    uniforms = torch.tensor([r.rng.random() for r in requests], dtype=torch.float32, device=device)[:, None]
    indices = None
    if top_k:
        logits, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (n, k)
    cdf = torch.cumsum(F.softmax(logits / temperatures, dim=-1), dim=-1)
    # side="right" and u < 1: a token whose probability underflowed to 0 (a flat stretch of the cdf) is never hit
    uniforms = uniforms.clamp_(max=1 - 2**-24)
    choice = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=cdf.size(-1) - 1)  # (n, 1)
    return (choice if indices is None else indices.gather(-1, choice)).view(-1)


def _rows_view(cache, start, stop):
    """A KVCache over rows [start, stop) of `cache`, sharing its storage: GPT.forward on it reads and writes those
    rows in place. The parent is preallocated at full length, so the view never needs to grow (reserve is a no-op)."""
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.pos = cache.k[:, start:stop], cache.v[:, start:stop], cache.pos[start:stop]
    return view


class BatchDecoder:
    """One KV cache of max_batch rows decoded together, one token per active row per step().

    add() prefills a request's prompt (all but its last token, batch 1, straight into a free row); that row joins
    the next step(), which feeds its last prompt token together with every other row's latest token. Each request
    has its own sampling settings and seeded random stream, so its output does not depend on which other requests
    share the batch (greedy results are the same alone or batched, up to float rounding of batched matmuls).
    Rows above the highest active one are not computed. Not thread-safe: call add/step/remove from one thread."""

    def __init__(self, model, tokenizer, max_batch, max_seq_len=None, calculator=True):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.model = model
        self.tokens = SpecialTokens(tokenizer, calculator)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len or model.config.sequence_len
        if self.max_seq_len > model.rotary_seq_len:
            raise ValueError(f"max_seq_len={self.max_seq_len}: the model's rotary table covers {model.rotary_seq_len}")
        self.device = model.get_device()
        self.cache = _new_cache(model, max_batch, self.max_seq_len)
        self.slots = [None] * max_batch  # _Request or None (free)
        self.slot_of = {}  # row_id -> slot
        self.next_row_id = 0
        self.views = {}  # high-water mark -> KVCache view of rows [0, mark)

    @property
    def num_active(self):
        return len(self.slot_of)

    @property
    def num_free(self):
        return self.max_batch - len(self.slot_of)

    @torch.inference_mode()
    def add(self, tokens, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Prefill a prompt into a free row; returns its row_id (unique, never reused). max_tokens None = until
        max_seq_len. RuntimeError when no row is free or the prompt leaves no room to generate."""
        _check_prompt(tokens, self.model.config.vocab_size)
        _check_sampling(temperature, top_k, max_tokens)
        if len(tokens) >= self.max_seq_len:
            raise RuntimeError(f"prompt of {len(tokens)} tokens: too long for max_seq_len={self.max_seq_len} "
                               f"(at most {self.max_seq_len - 1}, to leave room for a reply)")
        if not self.num_free:
            raise RuntimeError(f"all {self.max_batch} rows are busy; retry when a request finishes")
        slot = self.slots.index(None)
        if len(tokens) > 1:
            view = _rows_view(self.cache, slot, slot + 1)
            view.pos.zero_()
            self.model(torch.tensor([tokens[:-1]], dtype=torch.long, device=self.device), kv_cache=view, logits_from=-1)
        if max_tokens == 0:
            raise ValueError("max_tokens=0: a request must be allowed at least one token")
        max_tokens = self.max_seq_len if max_tokens is None else max_tokens
        row_id, self.next_row_id = self.next_row_id, self.next_row_id + 1
        self.slots[slot] = _Request(row_id, tokens[-1], len(tokens) - 1, max_tokens, temperature, top_k, seed)
        self.slot_of[row_id] = slot
        return row_id

    def remove(self, row_id):
        """Free a request's row at once (its client is gone). Returns False if it had already finished."""
        slot = self.slot_of.pop(row_id, None)
        if slot is None:
            return False
        self.slots[slot] = None
        return True

    @torch.inference_mode()
    def step(self):
        """Advance every active request by one token; returns their RowEvents (empty when none is active)."""
        if not self.slot_of:
            return []
        active_slots = sorted(self.slot_of.values())
        high = active_slots[-1] + 1
        requests = self.slots[:high]
        if high not in self.views:
            self.views[high] = _rows_view(self.cache, 0, high)
        view = self.views[high]
        # Free rows below the high-water mark decode a dummy token at position 0: wasted but harmless work
        inputs = [r.next_input if r else 0 for r in requests]
        view.pos.copy_(torch.tensor([r.position if r else 0 for r in requests], dtype=torch.long))
        logits = self.model(torch.tensor(inputs, dtype=torch.long, device=self.device).view(high, 1),
                            kv_cache=view)[:, -1, :]  # (high, V)

        next_ids = torch.argmax(logits, dim=-1)  # (high,) greedy rows keep this
        by_top_k = {}  # sampled rows grouped by top_k (usually one group), each group sampled in one go
        for slot in active_slots:
            if requests[slot].temperature > 0:
                by_top_k.setdefault(requests[slot].top_k, []).append(slot)
        for top_k, slots in by_top_k.items():
            rows = torch.tensor(slots, device=self.device)
            next_ids[rows] = _sample_rows(logits[rows], [requests[slot] for slot in slots], top_k)
        next_ids = next_ids.tolist()  # the one host sync per step

        events = []
        for slot in active_slots:
            request = requests[slot]
            token, mask = request.state.next_token(next_ids[slot], self.tokens)
            request.generated += 1
            request.position += 1
            request.next_input = token
            reason = None
            if token in self.tokens.stops:
                reason = "stop"
            elif request.generated >= request.max_tokens or request.position >= self.max_seq_len:
                reason = "length"
            events.append(RowEvent(request.row_id, token, mask, reason is not None, reason))
            if reason is not None:
                self.remove(request.row_id)
        return events
