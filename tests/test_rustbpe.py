"""Tests of the rustbpe extension: its merges against a plain Python BPE (tests/reference_bpe.py) and HF
`tokenizers`, its encoding against tiktoken built from the exported ranks, determinism across thread counts and
batch sizes, and the errors it raises for bad input. Trained on real FineWeb-Edu text from ../shared/data."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import reference_bpe
import rustbpe
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_tokenizer import HuggingFaceTokenizer

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["Hello world! It's 2025: 12345 apples, 3.14 pies.", "\tcafé naïve 你好世界 안녕하세요 🌍🚀👍🏽\n\n  x",
         "def f(x):\n    return x ** 2  # square\n", "   leading and trailing spaces   ", ""]


@pytest.fixture(scope="module")
def docs():
    path = SHARED_DATA / "pretrain" / "fineweb_edu_150.parquet"
    if not path.is_file():
        pytest.skip(f"real test data not found at {path}")
    return pq.read_table(path).column("text").to_pylist()


@pytest.fixture(scope="module")
def sample(docs):
    return [doc[:1500] for doc in docs[:20]]  # ~30 KB: small enough for the slow reference


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def merged_pairs(tok):
    """The (left bytes, right bytes) of each merge, recovered from the exported ranks."""
    ranks = tok.get_mergeable_ranks()
    tokens = [token for token, _ in ranks]
    assert [rank for _, rank in ranks] == list(range(len(ranks)))
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    pairs = []
    for token in tokens[256:]:
        # the left part is the longest earlier token that leaves a known token as the right part
        known = set(tokens[:256 + len(pairs)])
        split = next(i for i in range(len(token) - 1, 0, -1) if token[:i] in known and token[i:] in known)
        pairs.append((token[:split], token[split:]))
    return pairs


def test_merges_match_the_reference_bpe(sample):
    vocab_size = 256 + 200
    expected = reference_bpe.train(sample, vocab_size, SPLIT_PATTERN)
    tok = train(sample, vocab_size, pattern=SPLIT_PATTERN)
    ref_tokens = reference_bpe.token_bytes([pair for pair, _, _ in expected])
    ours = [token for token, _ in tok.get_mergeable_ranks()]
    assert len(expected) == 200
    assert ours == ref_tokens  # same merges in the same order, ties included


def test_default_pattern_is_nanochats_split_pattern():
    assert rustbpe.Tokenizer().get_pattern() == SPLIT_PATTERN
    tok = train(["some text"], 300, pattern=r"\w+|\s+")
    assert tok.get_pattern() == r"\w+|\s+"


def gpt2_bytes_to_unicode():
    """HF's ByteLevel alphabet: printable bytes stand for themselves, the others are shifted to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def test_merges_match_hf_tokenizers_until_the_first_tie(sample):
    vocab_size = 256 + 200
    # nanochat's HF comparison tokenizer: the same split and byte-level BPE, plus the special tokens in its vocab
    hf = HuggingFaceTokenizer.train_from_iterator(sample, vocab_size + len(SPECIAL_TOKENS)).tokenizer
    decode = {char: b for b, char in gpt2_bytes_to_unicode().items()}
    hf_merges = []
    for merge in json.loads(hf.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        hf_merges.append((bytes(decode[c] for c in left), bytes(decode[c] for c in right)))

    reference = reference_bpe.train(sample, vocab_size, SPLIT_PATTERN)
    # HF numbers bytes in a different order (its alphabet is sorted by the characters above), so it breaks ties
    # differently; until the first tie both must pick exactly the same pairs.
    first_tie = next((i for i, (_, _, tied) in enumerate(reference) if tied), len(reference))
    assert first_tie >= 20, "the sample should give a meaningful tie-free prefix"
    ours = merged_pairs(train(sample, vocab_size))
    assert ours[:first_tie] == hf_merges[:first_tie]
    assert len(hf_merges) == len(ours) == 200


def test_tiktoken_from_the_exported_ranks_encodes_identically(docs, sample):
    tok = train(docs, 256 + 1000)
    enc = tiktoken.Encoding("test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()),
                            special_tokens={})
    texts = TEXTS + [doc[:3000] for doc in docs[-10:]]
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.batch_encode(texts) == [enc.encode_ordinary(t) for t in texts]
    # and the reference encoder agrees too (small vocab keeps it fast)
    small = train(sample, 256 + 100)
    merges = reference_bpe.train(sample, 256 + 100, SPLIT_PATTERN)
    for text in TEXTS:
        assert small.encode(text) == reference_bpe.encode(text, [pair for pair, _, _ in merges], SPLIT_PATTERN)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokens_concatenate_back_to_the_text(text):
    tok = _small_tokenizer()
    tokens = [token for token, _ in tok.get_mergeable_ranks()]
    assert b"".join(tokens[i] for i in tok.encode(text)) == text.encode("utf-8")


_SMALL = []

# Texts built from the characters where the split pattern has corner cases: whitespace runs before words, numbers
# and punctuation, newlines inside runs, Unicode spaces, contractions.
SPLIT_ALPHABET = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "a", "Zé", "世", "7", "42", "'s", "'LL", "!", ".",
                  "\u2028", "🌍"]


def chunks_via_saturated_training(text, pattern):
    """The chunks rustbpe splits `text` into: trained on the text alone until no pair is left, every chunk
    becomes one token, so encoding the text yields exactly its chunks."""
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator([text], 256 + 10 * len(text.encode("utf-8")) + 10, pattern=pattern)
    tokens = [token for token, _ in tok.get_mergeable_ranks()]
    return [tokens[i] for i in tok.encode(text)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(SPLIT_ALPHABET), max_size=30).map("".join))
def test_fast_split_of_the_default_pattern_matches_the_regex(text):
    # rustbpe runs the default pattern without its look-ahead on a faster engine and fixes whitespace by hand;
    # any other pattern (here the same one in a group) goes through fancy-regex. Both must split like `regex`.
    expected = [chunk.encode("utf-8") for chunk in reference_bpe.regex.findall(SPLIT_PATTERN, text)]
    assert chunks_via_saturated_training(text, SPLIT_PATTERN) == expected
    assert chunks_via_saturated_training(text, f"(?:{SPLIT_PATTERN})") == expected


def test_fast_and_general_split_give_the_same_merges_on_real_text(docs):
    fast = train(docs[:40], 256 + 1500, pattern=SPLIT_PATTERN)
    general = train(docs[:40], 256 + 1500, pattern=f"(?:{SPLIT_PATTERN})")
    assert fast.get_mergeable_ranks() == general.get_mergeable_ranks()


def _small_tokenizer():
    if not _SMALL:  # hypothesis tests cannot take function-scoped fixtures; train once
        _SMALL.append(train(TEXTS * 20 + ["🌍🚀 你好 ñ" * 50], 256 + 120))
    return _SMALL[0]


def ranks_digest(env_threads, vocab_size=256 + 2000):
    code = ("import hashlib, sys, pyarrow.parquet as pq, rustbpe\n"
            f"docs = pq.read_table({str(SHARED_DATA / 'pretrain' / 'fineweb_edu_150.parquet')!r}).column('text').to_pylist()\n"
            "tok = rustbpe.Tokenizer()\n"
            f"tok.train_from_iterator(iter(docs), {vocab_size}, buffer_size=16)\n"
            "h = hashlib.sha256(b''.join(t + b'|' for t, _ in tok.get_mergeable_ranks()))\n"
            "print(h.hexdigest())\n")
    env = {**os.environ, "RAYON_NUM_THREADS": str(env_threads)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                            check=True)
    return result.stdout.strip()


def test_same_merges_on_one_and_two_threads(docs):
    one, two = ranks_digest(1), ranks_digest(2)
    assert one == two
    tok = train(docs, 256 + 2000, buffer_size=16)
    assert one == hashlib.sha256(b"".join(t + b"|" for t, _ in tok.get_mergeable_ranks())).hexdigest()


def test_buffer_size_does_not_change_the_merges(docs):
    a = train(docs[:50], 256 + 500, buffer_size=1)
    b = train(docs[:50], 256 + 500, buffer_size=8192)
    assert a.get_mergeable_ranks() == b.get_mergeable_ranks()


def test_training_stops_when_pairs_run_out():
    tok = train(["ab"], 1000)
    assert [t for t, _ in tok.get_mergeable_ranks()][256:] == [b"ab"]
    assert len(train([], 1000).get_mergeable_ranks()) == 256


def test_any_iterable_of_str_works_and_ties_go_to_the_smallest_pair():
    tok = train(("x" * 5 for _ in range(3)), 258)
    # after xx (id 256), "xxxxx" is [256, 256, 120]: (256, 256) and (256, 120) both occur 3 times; the smaller wins
    assert [t for t, _ in tok.get_mergeable_ranks()][256:] == [b"xx", b"xxx"]


@pytest.mark.parametrize("vocab_size", [255, 0, -1])
def test_too_small_vocab_is_a_value_error(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size must be at least 256.*got {vocab_size}"):
        train(["text"], vocab_size)


def test_bad_regex_is_a_value_error():
    with pytest.raises(ValueError, match=r'invalid split pattern "\(unclosed": .*parenthesis'):
        train(["text"], 300, pattern="(unclosed")


def test_non_str_item_is_a_type_error_naming_the_item():
    with pytest.raises(TypeError, match="item 2 is of type bytes"):
        train(["a", "b", b"c"], 300)
    with pytest.raises(TypeError, match="item 0 is of type int"):
        train([1], 300)


def test_non_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="expects an iterable of str, got int"):
        rustbpe.Tokenizer().train_from_iterator(5, 300)


def test_bad_buffer_size_is_a_value_error():
    with pytest.raises(ValueError, match="buffer_size must be at least 1, got 0"):
        train(["text"], 300, buffer_size=0)


def test_an_error_inside_the_iterator_propagates():
    def texts():
        yield "fine"
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(texts(), 300)


def test_lone_surrogates_are_a_value_error():
    with pytest.raises(ValueError, match="item 1 is not valid Unicode"):
        train(["ok", "bad \ud800 text"], 300)
