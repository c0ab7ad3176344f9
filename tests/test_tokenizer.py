"""Tests of nanochat/tokenizer.py: training through rustbpe, encoding, the on-disk format and its errors,
token_bytes, and the chat format (ids and training masks). Tokenizers are trained in-process on a few KB of
real FineWeb-Edu text, small enough to take well under a second."""

import base64
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tiktoken
import tiktoken.load
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hf_tokenizer import HuggingFaceTokenizer

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    RustBPETokenizer,
    compute_token_bytes,
    get_token_bytes,
    get_tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB_SIZE = 256 + 100 + len(SPECIAL_TOKENS)  # the byte tokens, 100 merges, the special tokens
MIXED_TEXT = "Hello world! It's 2025: 12345 apples, 3.14 pies.\n\tcafé naïve 你好世界 안녕하세요 🌍🚀👍🏽 <|bos|>\n\n"


@pytest.fixture(scope="module")
def training_docs():
    path = SHARED_DATA / "pretrain" / "fineweb_edu_150.parquet"
    if not path.is_file():
        pytest.skip(f"real test data not found at {path}")
    docs = pq.read_table(path).column("text").to_pylist()
    return [doc[:1500] for doc in docs[:20]]  # ~30 KB


@pytest.fixture(scope="module")
def tok(training_docs):
    return RustBPETokenizer.train_from_iterator(iter(training_docs), VOCAB_SIZE)


@pytest.fixture
def saved_dir(tok, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    tok.save(str(tokenizer_dir))
    return tokenizer_dir


def special(tok, name):
    return tok.encode_special(name)


# -----------------------------------------------------------------------------
# Training and encoding


def test_vocab_size_is_bytes_plus_merges_plus_special_tokens(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE


def test_special_tokens_follow_the_mergeable_ranks_in_order(tok):
    first = VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert tok.get_special_tokens() == {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.get_bos_token_id() == first


def test_first_256_ids_are_the_single_bytes(tok):
    assert [tok.enc.decode_single_token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]


def test_vocab_too_small_for_bytes_and_specials_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=264 is too small"):
        RustBPETokenizer.train_from_iterator(iter(["some text"]), 264)


def test_too_little_text_for_the_requested_vocab_is_rejected():
    with pytest.raises(ValueError, match="train on more text"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab"]), 256 + 50 + len(SPECIAL_TOKENS))


def test_training_learns_merges_of_the_training_text(tok):
    # " the" is by far the most frequent word of English prose; after 100 merges it is one token
    assert len(tok.encode(" the")) == 1


def test_training_is_deterministic(tok, training_docs):
    again = RustBPETokenizer.train_from_iterator(iter(training_docs), VOCAB_SIZE)
    assert again.encode(MIXED_TEXT + "".join(training_docs[:3])) == tok.encode(MIXED_TEXT + "".join(training_docs[:3]))


def test_tiktoken_encoding_matches_the_rust_trainers_own_encoding(tok, training_docs):
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(training_docs), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    text = MIXED_TEXT + training_docs[0]
    assert tok.encode(text) == trainer.encode(text)


def test_round_trip_of_mixed_scripts_emoji_and_whitespace(tok):
    assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_of_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_names_in_text_are_ordinary_text(tok):
    ids = tok.encode("<|bos|>")
    assert not set(ids) & set(tok.get_special_tokens().values())
    assert tok.decode(ids) == "<|bos|>"


def test_unknown_special_token_is_rejected(tok):
    with pytest.raises(ValueError, match="unknown special token '<|eos|>'"):
        tok.encode_special("<|eos|>")


def test_prepend_and_append_take_names_or_ids(tok):
    bos, end = special(tok, "<|bos|>"), special(tok, "<|assistant_end|>")
    body = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>", append="<|assistant_end|>") == [bos, *body, end]
    assert tok.encode("hello", prepend=bos, append=end) == [bos, *body, end]
    assert tok.encode(["hello", "hello"], prepend=bos) == [[bos, *body], [bos, *body]]


def test_prepend_out_of_vocab_is_rejected(tok):
    with pytest.raises(ValueError, match=f"token id in \\[0, {VOCAB_SIZE}\\)"):
        tok.encode("hello", prepend=VOCAB_SIZE)


def test_batch_encode_equals_encoding_one_by_one(tok, training_docs):
    texts = training_docs + ["", MIXED_TEXT]
    expected = [tok.encode(text) for text in texts]
    assert tok.encode(texts) == expected
    assert tok.encode(texts, num_threads=1) == expected


def test_encode_rejects_other_types(tok):
    with pytest.raises(TypeError, match="str or a list of str, got bytes"):
        tok.encode(b"bytes")


def test_save_then_load_gives_identical_encodings(tok, saved_dir):
    loaded = RustBPETokenizer.from_directory(str(saved_dir))
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.get_special_tokens() == tok.get_special_tokens()
    assert loaded.encode(MIXED_TEXT) == tok.encode(MIXED_TEXT)


def test_saved_files_are_a_tiktoken_rank_file_and_json_without_temporaries(tok, saved_dir):
    assert sorted(p.name for p in saved_dir.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]
    lines = (saved_dir / "tokenizer.tiktoken").read_bytes().splitlines()
    assert len(lines) == VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert lines[:2] == [b"AA== 0", b"AQ== 1"]  # base64 of bytes 0 and 1
    meta = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert meta == {"format": "nanochat-tokenizer-v1", "pattern": SPLIT_PATTERN,
                    "special_tokens": tok.get_special_tokens(), "vocab_size": VOCAB_SIZE}


def test_saved_files_load_with_plain_tiktoken(tok, saved_dir, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise keep a copy of the file in /tmp
    meta = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    enc = tiktoken.Encoding("nanochat", pat_str=meta["pattern"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(saved_dir / "tokenizer.tiktoken")))
    assert enc.encode_ordinary(MIXED_TEXT) == tok.encode(MIXED_TEXT)
    assert enc.encode("<|bos|>hi", allowed_special="all") == tok.encode("hi", prepend="<|bos|>")


def test_missing_directory_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        RustBPETokenizer.from_directory(str(tmp_path / "nowhere"))


def test_missing_rank_file_is_reported(saved_dir):
    (saved_dir / "tokenizer.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken is missing"):
        RustBPETokenizer.from_directory(str(saved_dir))


def rewrite_rank_lines(saved_dir, edit):
    path = saved_dir / "tokenizer.tiktoken"
    lines = path.read_bytes().splitlines()
    edit(lines)
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("edit, problem", [
    (lambda lines: lines.__setitem__(3, b"not base64!! 3"), r"line 4: expected `<base64 token> <rank>`"),
    (lambda lines: lines.__setitem__(3, b"Aw=="), r"line 4: expected `<base64 token> <rank>`"),
    (lambda lines: lines.__setitem__(3, b"Aw== three"), r"line 4: expected `<base64 token> <rank>`"),
    (lambda lines: lines.__setitem__(3, b"Aw== 7"), r"line 4: rank 7, expected 3"),
    (lambda lines: lines.__setitem__(3, b"AA== 3"), r"line 4: token b'\\x00' already has rank 0"),
    (lambda lines: lines.__setitem__(3, base64.b64encode(b"\xff" * 9) + b" 3"), r"single-byte tokens are missing"),
    (lambda lines: lines.insert(0, b"\x80\x04\x95 pickle junk"), r"line 1: expected `<base64 token> <rank>`"),
])
def test_corrupt_rank_file_is_rejected_naming_the_file_and_problem(saved_dir, edit, problem):
    rewrite_rank_lines(saved_dir, edit)
    with pytest.raises(ValueError, match=r"tokenizer\.tiktoken.*" + problem):
        RustBPETokenizer.from_directory(str(saved_dir))


def test_rank_file_with_too_few_ranks_for_the_json_is_rejected(saved_dir):
    rewrite_rank_lines(saved_dir, lambda lines: lines.pop())
    with pytest.raises(ValueError, match="special_tokens must be"):
        RustBPETokenizer.from_directory(str(saved_dir))


def rewrite_meta(saved_dir, edit):
    path = saved_dir / "tokenizer.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    edit(meta)
    path.write_text(json.dumps(meta), encoding="utf-8")


@pytest.mark.parametrize("edit, problem", [
    (lambda meta: meta.update(format="tiktoken-pickle"), "format is 'tiktoken-pickle', expected 'nanochat-tokenizer-v1'"),
    (lambda meta: meta.pop("format"), "format is None"),
    (lambda meta: meta.update(vocab_size="365"), "'vocab_size' must be a int"),
    (lambda meta: meta.update(vocab_size=VOCAB_SIZE + 1), f"vocab_size is {VOCAB_SIZE + 1}"),
    (lambda meta: meta["special_tokens"].update({"<|bos|>": 0}), "special_tokens must be"),
    (lambda meta: meta["special_tokens"].pop("<|output_end|>"), "special_tokens must be"),
    (lambda meta: meta.update(pattern="(unclosed"), "pattern is not a valid regex"),
])
def test_bad_json_is_rejected_naming_the_file_and_problem(saved_dir, edit, problem):
    rewrite_meta(saved_dir, edit)
    with pytest.raises(ValueError, match=r"tokenizer\.json.*" + re.escape(problem)):
        RustBPETokenizer.from_directory(str(saved_dir))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary", b"[1, 2, 3]"])
def test_unparseable_json_is_rejected(saved_dir, content):
    (saved_dir / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        RustBPETokenizer.from_directory(str(saved_dir))


def test_get_tokenizer_loads_from_the_base_dir(tok, isolated_base_dir):
    tok.save(str(isolated_base_dir / "tokenizer"))
    assert get_tokenizer().encode(MIXED_TEXT) == tok.encode(MIXED_TEXT)


# -----------------------------------------------------------------------------
# token_bytes


def test_token_bytes_are_raw_byte_lengths_and_zero_for_specials(tok):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[ord("a")] == 1
    assert token_bytes[0xE4] == 1  # a lone UTF-8 lead byte: 1 byte, not the 3 of a replacement character
    assert token_bytes[tok.encode(" the")[0]] == 4
    assert token_bytes[VOCAB_SIZE - len(SPECIAL_TOKENS):].tolist() == [0] * len(SPECIAL_TOKENS)


def test_token_bytes_of_an_encoding_sum_to_the_text_bytes(tok):
    token_bytes = compute_token_bytes(tok)
    ids = tok.encode(MIXED_TEXT, prepend="<|bos|>")
    assert token_bytes[ids].sum().item() == len(MIXED_TEXT.encode("utf-8"))


def test_get_token_bytes_loads_the_saved_tensor(tok, isolated_base_dir):
    (isolated_base_dir / "tokenizer").mkdir(parents=True)
    torch.save(compute_token_bytes(tok), isolated_base_dir / "tokenizer" / "token_bytes.pt")
    assert torch.equal(get_token_bytes(), compute_token_bytes(tok))


def test_get_token_bytes_missing_says_how_to_make_it():
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()


# -----------------------------------------------------------------------------
# Chat format


def test_render_supervises_exactly_the_assistant_reply_and_its_end(tok):
    conversation = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    user, reply = tok.encode("Hi there"), tok.encode("Hello!")
    ids, mask = tok.render_conversation(conversation)
    s = tok.get_special_tokens()
    assert ids == [s["<|bos|>"], s["<|user_start|>"], *user, s["<|user_end|>"],
                   s["<|assistant_start|>"], *reply, s["<|assistant_end|>"]]
    assert mask == [0, 0] + [0] * len(user) + [0, 0] + [1] * len(reply) + [1]


def test_render_supervises_python_calls_but_not_their_outputs(tok):
    conversation = {"messages": [
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "6*7"},
            {"type": "python_output", "text": "42"},
            {"type": "text", "text": " It is 42."},
        ]},
    ]}
    s = tok.get_special_tokens()
    user, before, code, output, after = (tok.encode(t) for t in ("What is 6*7?", "Let me compute. ", "6*7", "42", " It is 42."))
    ids, mask = tok.render_conversation(conversation)
    assert ids == [s["<|bos|>"], s["<|user_start|>"], *user, s["<|user_end|>"], s["<|assistant_start|>"], *before,
                   s["<|python_start|>"], *code, s["<|python_end|>"], s["<|output_start|>"], *output,
                   s["<|output_end|>"], *after, s["<|assistant_end|>"]]
    assert mask == ([0] * (3 + len(user) + 1) + [1] * len(before) + [1] * (len(code) + 2)
                    + [0] * (len(output) + 2) + [1] * len(after) + [1])


def test_render_of_several_turns_masks_every_user_turn(tok):
    conversation = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ids, mask = tok.render_conversation(conversation)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == [*tok.encode("b"), special(tok, "<|assistant_end|>"),
                          *tok.encode("d"), special(tok, "<|assistant_end|>")]


def test_system_message_is_merged_into_the_first_user_message(tok):
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "Hi"  # the caller's conversation is left alone


def test_render_truncates_ids_and_mask_to_max_tokens(tok):
    conversation = {"messages": [{"role": "user", "content": "Tell me a story"},
                                 {"role": "assistant", "content": "Once upon a time there was a tokenizer."}]}
    ids, mask = tok.render_conversation(conversation)
    short_ids, short_mask = tok.render_conversation(conversation, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


def test_render_for_completion_is_the_prompt_ending_in_assistant_start(tok):
    conversation = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    s = tok.get_special_tokens()
    assert tok.render_for_completion(conversation) == [
        s["<|bos|>"], s["<|user_start|>"], *tok.encode("2+2?"), s["<|user_end|>"], s["<|assistant_start|>"]]
    assert len(conversation["messages"]) == 2


def test_render_for_completion_needs_a_final_assistant_message(tok):
    with pytest.raises(ValueError, match="message 0: render_for_completion needs .* ending with an assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "2+2?"}]})


def user(text="hi"):
    return {"role": "user", "content": text}


def assistant(content="hello"):
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("conversation, problem", [
    ([user()], "a conversation must be a dict with a 'messages' list"),
    ({"turns": [user()]}, "a conversation must be a dict with a 'messages' list"),
    ({"messages": []}, "the conversation has no messages"),
    ({"messages": ["hi"]}, "message 0: must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "user"}]}, "message 0: must be a dict with 'role' and 'content'"),
    ({"messages": [user(), {"role": "tool", "content": "x"}]}, "message 1: unknown role 'tool'"),
    ({"messages": [assistant()]}, "message 0: expected role 'user', got 'assistant'"),
    ({"messages": [user(), user()]}, "message 1: expected role 'assistant', got 'user'"),
    ({"messages": [user(), assistant(), assistant()]}, "message 2: expected role 'user', got 'assistant'"),
    ({"messages": [user(), assistant(), {"role": "system", "content": "x"}]},
     "message 2: a system message is only allowed as the first message"),
    ({"messages": [{"role": "system", "content": "x"}]}, "message 0: a system message must be followed by a user"),
    ({"messages": [{"role": "system", "content": "x"}, assistant()]}, "message 1: expected role 'user'"),
    ({"messages": [{"role": "system", "content": 3}, user()]}, "message 0: system content must be a str"),
    ({"messages": [user(["hi"])]}, "message 0: user content must be a str, got ['hi']"),
    ({"messages": [user(), assistant(None)]}, "message 1: assistant content must be a str or a list of parts"),
    ({"messages": [user(), assistant([{"type": "image", "text": "x"}])]}, "message 1, part 0: unknown part type 'image'"),
    ({"messages": [user(), assistant(["just text"])]}, "message 1, part 0: unknown part type 'just text'"),
    ({"messages": [user(), assistant([{"type": "text", "text": "a"}, {"type": "python"}])]},
     "message 1, part 1: 'text' must be a str, got None"),
])
def test_malformed_conversation_is_rejected_naming_message_and_problem(tok, conversation, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        tok.render_conversation(conversation)


# -----------------------------------------------------------------------------
# HuggingFace comparison tokenizer


def test_huggingface_tokenizer_trains_round_trips_and_saves(training_docs, tmp_path):
    hf = HuggingFaceTokenizer.train_from_iterator(iter(training_docs), VOCAB_SIZE)
    assert hf.get_vocab_size() == VOCAB_SIZE
    ids = hf.encode(MIXED_TEXT.replace("<|bos|>", ""), prepend="<|bos|>")
    assert ids[0] == hf.get_bos_token_id()
    assert hf.decode(ids[1:]) == MIXED_TEXT.replace("<|bos|>", "")
    hf.save(str(tmp_path))
    assert HuggingFaceTokenizer.from_directory(str(tmp_path)).encode(MIXED_TEXT) == hf.encode(MIXED_TEXT)
