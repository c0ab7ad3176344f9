"""The inference engine: cached sampling equal to the uncached reference, per-row sampling, seeds, max_tokens,
the calculator tool (forced and masked output, or off; hostile input refused with bounded work, from many threads),
continuous batching (a request's greedy tokens do not depend on who shares the batch; rows are freed; finish
reasons), the work queue of (prompt, sample) pairs, and the GPU path tested on the CPU: a decode step makes one
blocking host wait (the readback one step behind) and none inside the fixed-shape step, and the compiled
fixed-shape step gives the eager path's tokens.

Exactness tests run the model in fp32: the compute dtype is fixed at import (bf16 on CPUs with native bf16), so
the `fp32` fixture (tests/conftest.py) switches the modules' COMPUTE_DTYPE before the model is built."""

import ast
import math
import threading

import pytest
import torch

import nanochat.engine as engine_module
import nanochat.gpt as gpt_module
from nanochat.engine import (BatchDecoder, Completions, Engine, RowEvent, SpecialTokens, sample_tokens,
                             use_calculator)
from nanochat.gpt import arch_config, softcap

from model_setup import make_chat_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def chat_model(fp32, isolated_base_dir, device):
    """(model, tokenizer): a random 2-layer GPT over the byte-level tokenizer (265 ids), on the test device."""
    model, tokenizer = make_chat_checkpoint(isolated_base_dir)
    return model.to(device), tokenizer


def prompt_of(tokenizer, text):
    return tokenizer.encode(text, prepend="<|bos|>") + [tokenizer.encode_special("<|assistant_start|>")]


def until_stop(tokens, tokenizer):
    """The tokens up to (without) the first <|assistant_end|> or <|bos|>."""
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    return tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


# -----------------------------------------------------------------------------
# Engine


def test_greedy_generation_equals_the_uncached_reference(chat_model):
    model, tokenizer = chat_model
    prompt = prompt_of(tokenizer, "What is the capital of France?")
    reference = until_stop(list(model.generate(prompt, 48, temperature=0)), tokenizer)
    columns = list(Engine(model, tokenizer).generate(prompt, num_samples=1, max_tokens=48, temperature=0))
    generated = until_stop([column[0] for column, _ in columns], tokenizer)
    assert len(reference) >= 10  # the comparison covers a real stretch of text
    assert generated == reference


def test_greedy_rows_are_identical_and_match_generate_batch(chat_model):
    model, tokenizer = chat_model
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "Hello")
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=24, temperature=0)
    single = [column[0] for column, _ in engine.generate(prompt, max_tokens=24, temperature=0)]
    assert results[0] == results[1] == results[2] == prompt + until_stop(single, tokenizer)
    assert masks[0] == [0] * len(prompt) + [1] * (len(results[0]) - len(prompt))


def test_sample_rows_differ_from_their_first_token_and_repeat_with_the_same_seed(chat_model):
    model, tokenizer = chat_model
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "Tell me a story")
    results, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=16, temperature=1.0, seed=7)
    first_tokens = {row[len(prompt)] for row in results}
    assert len(first_tokens) > 1  # each row samples its own first token (the original once broadcast one)
    assert len({tuple(row) for row in results}) == 8
    again, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=16, temperature=1.0, seed=7)
    assert again == results
    other_seed, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=16, temperature=1.0, seed=8)
    assert other_seed != results


class ChainModel:
    """Stands in for GPT: the prompt's next token is uniform over 10..17; after token t, t + 1 with probability 0.8
    or <|assistant_end|> with 0.2. Every row is then a run of consecutive ids of its own length."""

    def __init__(self, tokenizer):
        self.config = gpt_module.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1,
                                           n_head=1, n_kv_head=1, n_embd=4)
        self.end = tokenizer.encode_special("<|assistant_end|>")

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, idx, kv_cache, logits_from=0):
        B, T = idx.shape
        kv_cache.advance(T)
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        if T > 1:  # the prompt
            logits[:, -1, 10:18] = 0.0
            return logits[:, logits_from:]
        logits[torch.arange(B), -1, idx[:, -1] + 1] = math.log(0.8)
        logits[:, -1, self.end] = math.log(0.2)
        return logits[:, logits_from:]


def test_rows_finishing_at_different_times_keep_their_own_tokens(isolated_base_dir):
    # rows that finish are dropped from the batch as it shrinks; the others must keep their own tokens
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    prompt = prompt_of(tokenizer, "go")
    results, masks = Engine(ChainModel(tokenizer), tokenizer).generate_batch(
        prompt, num_samples=16, max_tokens=60, temperature=1.0, seed=0)
    replies = [row[len(prompt):] for row in results]
    assert len({len(reply) for reply in replies}) > 3
    for reply, mask in zip(replies, masks):
        assert 10 <= reply[0] < 18 and reply == list(range(reply[0], reply[0] + len(reply)))
        assert mask == [0] * len(prompt) + [1] * len(reply)


def test_top_k_one_is_greedy(chat_model):
    model, tokenizer = chat_model
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "Hi")
    greedy, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0)
    top1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert top1 == greedy


def test_max_tokens_bounds_the_stream(chat_model):
    model, tokenizer = chat_model
    engine = Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, "Count to ten")
    columns = list(engine.generate(prompt, num_samples=4, max_tokens=5, temperature=1.0))
    assert 1 <= len(columns) <= 5 and all(len(c) == 4 and len(m) == 4 for c, m in columns)
    results, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=5, temperature=1.0)
    assert all(len(prompt) <= len(row) <= len(prompt) + 5 for row in results)
    assert list(engine.generate(prompt, max_tokens=0)) == []


def test_bad_arguments_are_refused_with_the_value(chat_model):
    model, tokenizer = chat_model
    engine = Engine(model, tokenizer)
    with pytest.raises(ValueError, match="temperature=-1"):
        next(engine.generate([1, 2], temperature=-1))
    with pytest.raises(ValueError, match="top_k=-5"):
        next(engine.generate([1, 2], top_k=-5))
    with pytest.raises(ValueError, match="token id 99999"):
        next(engine.generate([1, 99999]))
    with pytest.raises(ValueError, match="non-empty"):
        next(engine.generate([]))


def test_sample_tokens_per_row_greedy_top_k_and_whole_vocabulary():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    temperatures, top_ks = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([2, 0, 0])

    def sample(uniform, max_top_k=2, full_vocab=True):
        return sample_tokens(logits, temperatures, top_ks, torch.full((3,), uniform), max_top_k, full_vocab).tolist()

    # row 0: top-2 of its logits, largest first: token 1 (p = 0.525), then token 3; row 1: greedy; row 2: the
    # whole vocabulary in id order, token 2 holding p = e^2 / (e^2 + 3) = 0.711 between cdf 0.193 and 0.904
    assert sample(0.0) == [1, 0, 0]
    assert sample(0.5) == [1, 0, 2]
    assert sample(0.6) == [3, 0, 2]
    assert sample(0.95) == [3, 0, 3]
    assert sample(1 - 2**-24) == [3, 0, 3]  # the largest uniform the engine draws: the last token of the cdf
    assert sample_tokens(logits, torch.zeros(3), top_ks, torch.zeros(3), 0, False).tolist() == [1, 0, 2]
    # the softcap applied by the sampler to what it samples from = sampling the capped logits
    raw = 4 * torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for uniform in (0.1, 0.5, 0.9):
        uniforms = torch.full((3,), uniform)
        assert torch.equal(sample_tokens(raw, temperatures, top_ks, uniforms, 2, True, cap=softcap),
                           sample_tokens(softcap(raw), temperatures, top_ks, uniforms, 2, True))


def test_special_tokens_are_the_tokenizers_ids(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    special = SpecialTokens(tokenizer)
    ids = {name: tokenizer.encode_special(f"<|{name}|>") for name in
           ("python_start", "python_end", "output_start", "output_end", "assistant_end")}
    assert {name: getattr(special, name) for name in ids} == ids and special.bos == tokenizer.get_bos_token_id()
    assert special.stops == {ids["assistant_end"], special.bos}
    assert special.tool_tokens == {ids["python_start"], ids["python_end"]}


# -----------------------------------------------------------------------------
# The calculator tool inside generation: a scripted model


class ScriptedModel:
    """Stands in for GPT: at cache position p it puts all probability on script[p - prompt_len] (then on
    <|assistant_end|>), whatever the input; so what the engine emits shows exactly what it forced."""

    def __init__(self, tokenizer, prompt_len, script):
        self.config = gpt_module.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1,
                                           n_head=1, n_kv_head=1, n_embd=4)
        self.rotary_seq_len = 1280
        self.prompt_len, self.script = prompt_len, script
        self.end = tokenizer.encode_special("<|assistant_end|>")

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, idx, kv_cache, logits_from=0):
        B, T = idx.shape
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for row, position in enumerate(kv_cache.pos.tolist()):  # position = tokens seen, incl. this one
            index = position - self.prompt_len
            logits[row, -1, self.script[index] if 0 <= index < len(self.script) else self.end] = 10.0
        return logits[:, logits_from:]


def tool_script(tokenizer, expression):
    """python_start <expression> python_end, three positions the tool fills, then 'ok'."""
    special = tokenizer.encode_special
    placeholder = tokenizer.encode("x")[0]  # what the model "wants" while the tool's output is forced
    return ([special("<|python_start|>"), *tokenizer.encode(expression), special("<|python_end|>")]
            + [placeholder] * 3 + tokenizer.encode("ok"))


def test_calculator_result_is_forced_with_mask_zero(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    special = tokenizer.encode_special
    prompt = prompt_of(tokenizer, "1+2?")
    model = ScriptedModel(tokenizer, len(prompt), tool_script(tokenizer, "1+2"))
    columns = list(Engine(model, tokenizer).generate(prompt, num_samples=2, max_tokens=32, temperature=0))
    tokens = [column[0] for column, _ in columns]
    masks = [mask[0] for _, mask in columns]
    call = [special("<|python_start|>"), *tokenizer.encode("1+2"), special("<|python_end|>")]
    output = [special("<|output_start|>"), *tokenizer.encode("3"), special("<|output_end|>")]
    assert tokens == call + output + tokenizer.encode("ok") + [special("<|assistant_end|>")]
    assert masks == [1] * len(call) + [0] * len(output) + [1, 1, 1]
    assert [column[1] for column, _ in columns] == tokens  # every row runs its own tool


def test_refused_expression_forces_nothing(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    prompt = prompt_of(tokenizer, "hack")
    script = tool_script(tokenizer, "__import__('os')")
    model = ScriptedModel(tokenizer, len(prompt), script)
    results, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=64, temperature=0)
    assert results[0][len(prompt):] == script
    assert set(masks[0][len(prompt):]) == {1}


def test_batch_decoder_forces_the_calculator_result_per_row(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    special = tokenizer.encode_special
    prompt = prompt_of(tokenizer, "6*7?")
    decoder = BatchDecoder(ScriptedModel(tokenizer, len(prompt), tool_script(tokenizer, "6*7")), tokenizer, 2)
    row = decoder.add(prompt, max_tokens=64, temperature=0)
    events = run_to_completion(decoder)[row]
    forced = [e.token for e in events if e.mask == 0]
    assert forced == [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert events[-1].token == special("<|assistant_end|>")


# -----------------------------------------------------------------------------
# use_calculator


@pytest.mark.parametrize("expression, value", [
    ("1+2", 3), ("2*3+4", 10), ("(2+3)*4", 20), ("10/4", 2.5), ("7//2", 3), ("7%3", 1), ("2**10", 1024),
    ("-3 + +5", 2), ("1,200*3", 3600), ("0.5*4", 2.0), ("2**-1", 0.5), ("'strawberry'.count('r')", 3),
    ("\"banana\".count('an')", 2), ("'hello'", "hello"), (" 48 / 2 ", 24.0),
])
def test_calculator_values(expression, value):
    result = use_calculator(expression)
    assert result == value and type(result) is type(value)


HOSTILE = [
    "__import__('os')", "__import__('os').system('true')", "().__class__", "().__class__.__bases__[0].__subclasses__()",
    "(1).__class__", "'a'.__class__", "'abc'.upper()", "'a'.count.__self__", "open('/etc/passwd')", "eval('1')",
    "exec('x=1')", "x", "x + 1", "lambda: 1", "(lambda: 1)()", "[1, 2]", "{}", "len('abc')", "print(1)",
    "2**10**10", "9**9**9**9", "10**10**10 % 7", "'a'*10**9", "'a'*10", "10**9*'a'", "[1]*10**9", "'ab'+'cd'",
    "'x'.count('x', 0, 10**9)", "'x'.count(sub='x')", "True+1", "1j*2", "1e308*10", "(-8)**0.5", "1/0", "1%0",
    "1" * 5000, "1+" * 3000 + "1", "-" * 999 + "1", "(" * 400 + "1" + ")" * 400, "9" * 900, "[" * 300,
    "f'{1}'", "b'x'.count(b'x')", "1 if 1 else 2", "a := 1", "1; 2", "import os",
]


@pytest.fixture
def calculator_work(monkeypatch):
    """What use_calculator does inside, counted: the expressions it parses, the nodes its interpreter visits, the
    operands of every arithmetic operation and the bit sizes of the integer powers it computes."""
    work = {"parsed": [], "visits": 0, "operands": [], "power_bits": []}
    parse, evaluate = ast.parse, engine_module._evaluate

    def counting_parse(source, *args, **kwargs):
        work["parsed"].append(source)
        return parse(source, *args, **kwargs)

    def counting_evaluate(node, depth=0):
        work["visits"] += 1
        return evaluate(node, depth)  # its recursive calls come back through this module attribute

    def recording(operation):
        def run(a, b):
            work["operands"] += [a, b]
            result = operation(a, b)
            if operation is engine_module._power and isinstance(result, int):
                work["power_bits"].append(result.bit_length())
            return result
        return run

    monkeypatch.setattr(ast, "parse", counting_parse)
    monkeypatch.setattr(engine_module, "_evaluate", counting_evaluate)
    for op, operation in list(engine_module._BINARY_OPS.items()):
        monkeypatch.setitem(engine_module._BINARY_OPS, op, recording(operation))
    return work


@pytest.mark.parametrize("expression", HOSTILE + ["1+2", "2**10*3", "'strawberry'.count('r')", "-(5 // 2) % 3"],
                         ids=lambda e: repr(e[:30]))
def test_calculator_work_is_bounded_by_its_input(expression, calculator_work):
    # "never slow", as the code enforces it (no timing): nothing over MAX_EXPRESSION_CHARS is parsed, the interpreter
    # visits at most one node per character (each node takes one), every operand stays within MAX_NUMBER (each result
    # is checked before use) and an integer power is computed only when its result fits MAX_POWER_BITS
    result = use_calculator(expression)
    assert (result is None) == (expression in HOSTILE)
    if len(expression) > engine_module.MAX_EXPRESSION_CHARS:
        assert calculator_work["parsed"] == []
    assert calculator_work["visits"] <= len(expression)
    assert all(isinstance(x, str) or abs(x) <= engine_module.MAX_NUMBER for x in calculator_work["operands"])
    assert all(bits <= engine_module.MAX_POWER_BITS for bits in calculator_work["power_bits"])


def test_calculator_gives_the_same_answers_from_16_threads_at_once():
    # no shared state, no signals: every thread gets every answer right, hostile input included
    expected = {expression: None for expression in HOSTILE} | {"6*7": 42, "2**10": 1024, "'banana'.count('a')": 3}
    start, answers = threading.Barrier(16), []

    def worker():
        start.wait()
        answers.append({expression: use_calculator(expression) for expression in expected})

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [expected] * 16


# -----------------------------------------------------------------------------
# BatchDecoder


def run_to_completion(decoder, joins=None):
    """Step until no row is active; joins {step: callable} adds requests mid-flight. {row_id: [RowEvent]}."""
    events, step = {}, 0
    while decoder.num_active or (joins and any(s >= step for s in joins)):
        if joins and step in joins:
            joins[step]()
        for event in decoder.step():
            events.setdefault(event.row_id, []).append(event)
        step += 1
    return events


def test_greedy_tokens_are_the_same_alone_or_joining_mid_flight(chat_model):
    model, tokenizer = chat_model
    prompts = [prompt_of(tokenizer, text) for text in ("The sky is", "Once upon a time", "2+2=")]
    alone = []
    for prompt in prompts:
        decoder = BatchDecoder(model, tokenizer, max_batch=1)
        row = decoder.add(prompt, max_tokens=30, temperature=0)
        alone.append([e.token for e in run_to_completion(decoder)[row]])
        reference = list(model.generate(prompt, 30, temperature=0))
        assert until_stop(alone[-1], tokenizer) == until_stop(reference, tokenizer)

    decoder = BatchDecoder(model, tokenizer, max_batch=4)
    rows = {}
    filler = decoder.add(prompt_of(tokenizer, "filler that leaves early"), max_tokens=4, temperature=0.9, seed=1)
    rows[1] = decoder.add(prompts[1], max_tokens=30, temperature=0)
    joins = {3: lambda: rows.__setitem__(0, decoder.add(prompts[0], max_tokens=30, temperature=0)),
             9: lambda: rows.__setitem__(2, decoder.add(prompts[2], max_tokens=30, temperature=0))}
    events = run_to_completion(decoder, joins)
    assert len(events[filler]) == 4
    for i in range(3):
        assert [e.token for e in events[rows[i]]] == alone[i]


@pytest.mark.parametrize("arch", ["v2", "seed,smear=True,window_pattern=SL", "v2,value_embeds_every_layer=True"])
def test_a_recipe_model_decodes_in_batches_like_the_uncached_reference(fp32, isolated_base_dir, arch):
    # value embeddings and smear read the token (smear also the one before it, from the cache); windows of 16
    # (sequence_len 64) that prompt + 30 tokens run past; requests join mid-flight and share prefilled prompts
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, n_layer=3, sequence_len=64, **arch_config(arch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the recipe's gates and scalars start at values that hide them
        for stop in (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()):
            model.lm_head.weight[stop] = 0  # logit 0, never the largest: the whole 30 tokens are compared
    prompts = [prompt_of(tokenizer, text) for text in ("The sky is", "Once upon a time")]
    references = [list(model.generate(prompt, 30, temperature=0)) for prompt in prompts]
    decoder = BatchDecoder(model, tokenizer, max_batch=3)
    rows = [decoder.add(prompts[0], max_tokens=30, temperature=0)]
    events = run_to_completion(decoder, {4: lambda: rows.append(decoder.add(prompts[1], max_tokens=30, temperature=0))})
    for row, reference in zip(rows, references):
        assert until_stop([e.token for e in events[row]], tokenizer) == until_stop(reference, tokenizer)
    results, _ = Engine(model, tokenizer).generate_batch(prompts[1], num_samples=2, max_tokens=30, temperature=0)
    assert results[0] == results[1] == prompts[1] + until_stop(references[1], tokenizer)
    assert [len(until_stop(reference, tokenizer)) for reference in references] == [30, 30]


def test_sampled_request_repeats_with_its_seed_whoever_shares_the_batch(chat_model):
    model, tokenizer = chat_model
    prompt = prompt_of(tokenizer, "Pick a word")
    decoder = BatchDecoder(model, tokenizer, max_batch=3)
    row = decoder.add(prompt, max_tokens=20, temperature=1.0, top_k=20, seed=11)
    alone = [e.token for e in run_to_completion(decoder)[row]]
    decoder.add(prompt_of(tokenizer, "someone else"), max_tokens=20, temperature=1.0, seed=3)
    row = decoder.add(prompt, max_tokens=20, temperature=1.0, top_k=20, seed=11)
    assert [e.token for e in run_to_completion(decoder)[row]] == alone


def test_remove_frees_the_row_at_once(chat_model):
    model, tokenizer = chat_model
    decoder = BatchDecoder(model, tokenizer, max_batch=2)
    first = decoder.add(prompt_of(tokenizer, "a"), max_tokens=50, temperature=0)
    second = decoder.add(prompt_of(tokenizer, "b"), max_tokens=50, temperature=0)
    assert (decoder.num_active, decoder.num_free) == (2, 0)
    with pytest.raises(RuntimeError, match="busy"):
        decoder.add(prompt_of(tokenizer, "c"), max_tokens=5)
    decoder.step()
    assert decoder.remove(first) is True
    assert (decoder.num_active, decoder.num_free) == (1, 1)
    assert {e.row_id for e in decoder.step()} == {second}
    third = decoder.add(prompt_of(tokenizer, "c"), max_tokens=5, temperature=0)
    assert third not in (first, second)  # row ids are never reused, so a late remove() cannot hit a new request
    assert decoder.remove(first) is False
    assert {e.row_id for e in decoder.step()} == {second, third}


def test_finish_reasons_length_and_stop(chat_model, isolated_base_dir):
    model, tokenizer = chat_model
    decoder = BatchDecoder(model, tokenizer, max_batch=2)
    row = decoder.add(prompt_of(tokenizer, "go"), max_tokens=7, temperature=0)
    events = run_to_completion(decoder)[row]
    assert [(e.finished, e.finish_reason) for e in events] == [(False, None)] * 6 + [(True, "length")]
    assert decoder.num_free == 2

    prompt = prompt_of(tokenizer, "say ok")
    scripted = BatchDecoder(ScriptedModel(tokenizer, len(prompt), tokenizer.encode("ok")), tokenizer, max_batch=2)
    row = scripted.add(prompt, max_tokens=10, temperature=0)
    events = run_to_completion(scripted)[row]
    assert events[-1] == RowEvent(row, tokenizer.encode_special("<|assistant_end|>"), 1, True, "stop")
    assert [e.token for e in events[:-1]] == tokenizer.encode("ok")
    row = scripted.add(prompt, max_tokens=1, temperature=0)
    assert run_to_completion(scripted)[row] == [RowEvent(row, tokenizer.encode("o")[0], 1, True, "length")]


def test_context_limit_ends_a_request_with_length(chat_model):
    model, tokenizer = chat_model
    decoder = BatchDecoder(model, tokenizer, max_batch=1, max_seq_len=24)
    prompt = prompt_of(tokenizer, "0123456789")  # 12 tokens
    with pytest.raises(RuntimeError, match="too long"):
        decoder.add(prompt * 2)
    row = decoder.add(prompt, max_tokens=None, temperature=0)
    events = run_to_completion(decoder)[row]
    # a row holds at most max_seq_len tokens: the 12 of the prompt and 12 of the reply
    assert len(events) == 12 and events[-1].finish_reason == "length"


def test_rows_left_alone_high_up_move_down_and_keep_their_tokens(chat_model):
    # once at most half the rows up to the highest active one are active, the active ones move down (their cache
    # rows copied), so that the rows above are not computed; the moved request goes on as it would have
    model, tokenizer = chat_model
    prompt = prompt_of(tokenizer, "Once upon a time")
    alone = BatchDecoder(model, tokenizer, max_batch=1)
    row = alone.add(prompt, max_tokens=20, temperature=0)
    expected = [e.token for e in run_to_completion(alone)[row]]

    decoder = BatchDecoder(model, tokenizer, max_batch=4)
    for text in ("a", "b", "c"):
        decoder.add(prompt_of(tokenizer, text), max_tokens=3, temperature=0)
    row = decoder.add(prompt, max_tokens=20, temperature=0)
    assert decoder.slot_of[row] == 3
    events = run_to_completion(decoder)
    assert decoder.slot_of == {} and [e.token for e in events[row]] == expected
    decoder.add(prompt, max_tokens=20, temperature=0)  # the same check with the move observed
    for _ in range(3):
        decoder.add(prompt_of(tokenizer, "x"), max_tokens=2, temperature=0)
    decoder.step(), decoder.step(), decoder.step()
    assert list(decoder.slot_of.values()) == [0]


def test_calculator_off_leaves_python_blocks_to_the_model(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    prompt = prompt_of(tokenizer, "1+2?")
    script = tool_script(tokenizer, "1+2")
    model = ScriptedModel(tokenizer, len(prompt), script)
    results, masks = Engine(model, tokenizer, calculator=False).generate_batch(prompt, max_tokens=64, temperature=0)
    assert results[0][len(prompt):] == script and set(masks[0][len(prompt):]) == {1}
    decoder = BatchDecoder(model, tokenizer, max_batch=1, calculator=False)
    row = decoder.add(prompt, max_tokens=64, temperature=0)
    assert [(e.token, e.mask) for e in run_to_completion(decoder)[row]][:-1] == [(t, 1) for t in script]


# -----------------------------------------------------------------------------
# Completions: the work queue of (prompt, sample) pairs


def test_completions_do_not_depend_on_the_batch_and_match_the_engine(chat_model):
    model, tokenizer = chat_model
    prompts = [prompt_of(tokenizer, text) for text in ("The sky is", "2+2=", "Once upon a time", "Hi")]  # lengths differ

    def complete(max_batch, prompts=prompts, temperature=1.0):
        completions = Completions(model, tokenizer, prompts, num_samples=3, max_tokens=10, temperature=temperature,
                                  top_k=20, seed_of=lambda prompt, sample: 100 + sample, max_batch=max_batch)
        return {(c.prompt, c.sample): (c.tokens, c.masks, c.stopped) for c in completions}

    one_row = complete(1)  # a finished row takes the next pair at once: one row does them all, in order
    assert len(one_row) == 12 and complete(5) == one_row and complete(12) == one_row
    assert complete(5, prompts[2:]) == {(p - 2, s): c for (p, s), c in one_row.items() if p >= 2}
    assert one_row[0, 0] != one_row[0, 1]  # the samples of a prompt differ
    greedy = complete(4, temperature=0.0)
    engine = Engine(model, tokenizer)
    for i, prompt in enumerate(prompts):
        results, masks = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
        assert greedy[i, 0][:2] == (results[0][len(prompt):], masks[0][len(prompt):])


def test_completions_report_stops_masks_and_drop_the_rest_of_a_prompt(isolated_base_dir):
    _, tokenizer = make_chat_checkpoint(isolated_base_dir)
    special = tokenizer.encode_special
    prompt = prompt_of(tokenizer, "6*7?")
    model = ScriptedModel(tokenizer, len(prompt), tool_script(tokenizer, "6*7"))
    completions = Completions(model, tokenizer, [prompt, prompt], num_samples=3, max_tokens=64, max_batch=2)
    seen = []
    for completion in completions:
        seen.append((completion.prompt, completion.sample))
        if completion.prompt == 0:
            completions.drop(0)  # as pass@k does once a sample is right
    # prompt 0's first two samples ran together and finished in the same step: the second was dropped with the
    # rest; its third never started; prompt 1 ran all three
    assert seen == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert completion.stopped and completion.tokens[-1] == tokenizer.encode("k")[0]
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    start = completion.tokens.index(forced[0])
    assert completion.tokens[start:start + len(forced)] == forced
    assert completion.masks == [0 if start <= i < start + len(forced) else 1 for i in range(len(completion.tokens))]
    short = list(Completions(model, tokenizer, [prompt], max_tokens=2))
    assert [(c.tokens, c.stopped) for c in short] == [([special("<|python_start|>"), tokenizer.encode("6")[0]], False)]


# -----------------------------------------------------------------------------
# The GPU path, on the CPU: host waits and the compiled fixed-shape step


class SteeredModel(torch.nn.Module):
    """A real GPT steered along a chain of tokens (after one, the next gets +1e4 and every other -1e4, before the
    softcap or after), so that every reply starts with a calculator call (<|python_start|> 1+2 <|python_end|>, then
    the tool's forced output) and goes on as the model likes. The steering is looked up by the input token on the
    device: it adds no host wait. With fast=False the engine decodes through forward instead of GPT.decode_step (as
    for any model without decode weights)."""

    def __init__(self, model, tokenizer, fast=True):
        super().__init__()
        special = tokenizer.encode_special
        chain = [special("<|assistant_start|>"), special("<|python_start|>"), *tokenizer.encode("1+2"),
                 special("<|python_end|>")]
        bonus = torch.zeros(model.config.vocab_size, model.config.vocab_size)
        for token, next_token in zip(chain, chain[1:]):
            bonus[token] = -1e4
            bonus[token, next_token] = 1e4
        self.inner, self.config, self.rotary_seq_len, self.fast = model, model.config, model.rotary_seq_len, fast
        self.register_buffer("bonus", bonus)

    def get_device(self):
        return self.inner.get_device()

    def forward(self, idx, kv_cache=None, logits_from=0):
        return self.inner(idx, kv_cache=kv_cache, logits_from=logits_from) + self.bonus[idx[:, -1]][:, None]

    def decode_weights(self):
        return self.inner.decode_weights() if self.fast else None

    def decode_step(self, idx, kv_cache, weights, capped=True):
        return self.inner.decode_step(idx, kv_cache, weights, capped) + self.bonus[idx]


class HostWaits(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that would make the host wait for a CUDA device: reading a tensor's values (.item(),
    .tolist(), bool(), int(), float(), indexing a list with it, .cpu(), .numpy()) and host data turned into tensors
    (torch.tensor, as_tensor, from_numpy, list indices). The engine's own transfers are exempt, as `transfer()` marks
    them: _upload (pinned memory, non_blocking) and _Readback, whose wait() is counted apart: the step's one wait."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
    FROM_HOST = {torch.tensor, torch.as_tensor, torch.from_numpy}

    def __init__(self):
        super().__init__()
        self.blocking, self.waits, self.exempt = [], 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.exempt:
            host_index = func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
            if func in self.READS or func in self.FROM_HOST or host_index:
                self.blocking.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))

    def transfer(self, function, wait=False):
        def exempt(*args, **kwargs):
            self.exempt += 1
            self.waits += wait
            try:
                return function(*args, **kwargs)
            finally:
                self.exempt -= 1
        return exempt


def test_the_interposer_sees_every_kind_of_host_wait():
    t = torch.arange(4)
    with HostWaits() as counter:
        t.tolist(), t[0].item(), bool(t[1]), int(t.max()), t[[0, 1]], torch.tensor([1, 2])
        t[0] = 3  # a scalar written on the device: no wait
    assert counter.blocking == ["tolist", "item", "__bool__", "__int__", "__getitem__", "tensor"]


@pytest.fixture
def host_waits(monkeypatch):
    """A HostWaits active during every BatchDecoder.step, with the steps counted."""
    counter = HostWaits()
    counter.steps = 0
    monkeypatch.setattr(engine_module, "_upload", counter.transfer(engine_module._upload))
    monkeypatch.setattr(engine_module._Readback, "start", counter.transfer(engine_module._Readback.start))
    monkeypatch.setattr(engine_module._Readback, "wait", counter.transfer(engine_module._Readback.wait, wait=True))
    step = BatchDecoder.step

    def counted_step(decoder):
        counter.steps += 1
        with counter:
            return step(decoder)
    monkeypatch.setattr(BatchDecoder, "step", counted_step)
    return counter


@pytest.mark.parametrize("fast", [True, False], ids=["decode_step", "forward"])
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 20), (0.8, None)],
                         ids=["greedy", "top-k", "whole-vocabulary"])
def test_a_decode_step_waits_for_the_device_once(chat_model, host_waits, temperature, top_k, fast):
    model, tokenizer = chat_model
    steered = SteeredModel(model, tokenizer, fast)
    results, masks = Engine(steered, tokenizer).generate_batch(prompt_of(tokenizer, "1+2?"), num_samples=3,
                                                               max_tokens=12, temperature=temperature, top_k=top_k)
    assert all(0 in mask for mask in masks)  # the calculator fired in every row
    decoder = BatchDecoder(steered, tokenizer, max_batch=3)
    for i, text in enumerate(("a", "a longer prompt", "mid")):  # rows at different positions, finishing apart
        decoder.add(prompt_of(tokenizer, text), max_tokens=8 + 4 * i, temperature=temperature, top_k=top_k, seed=i)
    events = run_to_completion(decoder)
    assert all(any(e.mask == 0 for e in row) for row in events.values())
    assert host_waits.steps >= 20
    assert host_waits.blocking == [] and host_waits.waits == host_waits.steps


def test_the_fixed_shape_step_has_no_host_wait(chat_model, host_waits):
    model, tokenizer = chat_model
    decoder = BatchDecoder(model, tokenizer, max_batch=3, max_seq_len=32)
    decoder.add(prompt_of(tokenizer, "a"), temperature=0.0)
    decoder.add(prompt_of(tokenizer, "bb"), temperature=1.0, top_k=5)
    with host_waits, torch.inference_mode():
        engine_module._fixed_step(model, model.decode_weights(), decoder.cache, decoder.tokens, decoder.temperatures,
                                  decoder.top_ks, decoder.uniforms, decoder.active, 3, 16, 5, True)
    assert host_waits.blocking == [] and host_waits.waits == 0
    assert decoder.cache.pos.tolist() == [len(prompt_of(tokenizer, "a")) + 1, len(prompt_of(tokenizer, "bb")) + 1, 0]


def test_the_compiled_fixed_shape_step_gives_the_eager_tokens(chat_model):
    # torch.compile(fullgraph=True) would fail on any host read or graph break; on CUDA the same graph is replayed
    # as CUDA graphs. One compile covers every shape here (dynamic widths, lengths and top-k).
    model, tokenizer = chat_model
    steered = SteeredModel(model, tokenizer)
    prompts = [prompt_of(tokenizer, text) for text in ("Hi", "What is one plus two?", "ok", "Tell me", "more")]

    def scenario(compile_step):
        decoder = BatchDecoder(steered, tokenizer, max_batch=4, max_seq_len=48, compile_step=compile_step)
        rows = [decoder.add(prompts[0], 30, temperature=0.0), decoder.add(prompts[1], 12, 1.0, 5, seed=1),
                decoder.add(prompts[2], 20, 0.9, None, seed=2)]
        joins = {4: lambda: rows.append(decoder.add(prompts[3], 16, 1.0, 50, seed=3)),
                 13: lambda: rows.append(decoder.add(prompts[4], 9, 0.0))}
        events = run_to_completion(decoder, joins)
        samples = Engine(steered, tokenizer, compile_step=compile_step).generate_batch(
            prompts[1], num_samples=3, max_tokens=14, temperature=1.0, top_k=50, seed=5)
        return {row: [(e.token, e.mask, e.finish_reason) for e in events[row]] for row in rows}, samples

    eager, samples = scenario(compile_step=False)
    assert len({len(tokens) for tokens in eager.values()}) == 5  # rows finish apart
    assert all(any(mask == 0 for _, mask, _ in tokens) for tokens in eager.values())  # the calculator fired
    assert scenario(compile_step=True) == (eager, samples)
