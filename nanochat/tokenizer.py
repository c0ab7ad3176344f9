"""
Tokenization: a byte-level BPE trained by our Rust `rustbpe` and run by tiktoken; the chat format that turns a
conversation into token ids plus a training mask; and back, a reply's tokens as streamed text (ReplyText).
Not a general tokenizer library: one split pattern, one set of special tokens.

On disk (`<base>/tokenizer/`, written by `python -m scripts.tok_train`), no pickle anywhere:
    tokenizer.tiktoken  one line per mergeable token, `base64(token bytes) rank` (tiktoken's own rank format)
    tokenizer.json      {"format": "nanochat-tokenizer-v1", "pattern", "special_tokens", "vocab_size"}
    token_bytes.pt      int32 tensor: bytes per token id, 0 for special tokens (for bits-per-byte)
Plain tiktoken reads it without nanochat (with TIKTOKEN_CACHE_DIR="": load_tiktoken_bpe otherwise caches each file
by its path, and after a retrain would return the old ranks):
    from tiktoken.load import load_tiktoken_bpe
    meta = json.load(open("tokenizer.json", encoding="utf-8"))
    enc = tiktoken.Encoding("nanochat", pat_str=meta["pattern"], special_tokens=meta["special_tokens"],
                            mergeable_ranks=load_tiktoken_bpe("tokenizer.tiktoken"))
"""

import base64
import binascii
import json
import os

import tiktoken
import torch

from nanochat.common import MissingFileError, UserError, get_base_dir, write_atomic
from nanochat.engine import SpecialTokens

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document (documents are delimited by it) and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool...
    "<|output_start|>", "<|output_end|>",  # ...and the tool's output is inserted here at inference
]

# GPT-4's split pattern, except that numbers are split into runs of at most 2 digits instead of 3: at our small
# vocab that spends fewer tokens on 3-digit numbers (the reference measured 0.965 vs 0.972 bpb at 32K vocab).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

FORMAT = "nanochat-tokenizer-v1"
RANK_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.json"
PART_TYPES = ("text", "python", "python_output")


class RustbpeNotBuilt(UserError, ImportError):
    """The compiled trainer is missing: a set-up step the user runs, still an ImportError."""


class CorruptTokenizerError(UserError):
    """A tokenizer file on disk is damaged or not ours; the fix is to retrain (`python -m scripts.tok_train`)."""


def available_cpus():
    # the CPUs this process may actually run on (containers, taskset), not all the machine has
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RustBPETokenizer:
    """Our tokenizer: mergeable ranks (256 single bytes, then merges in training order) + the special tokens."""

    def __init__(self, pattern, mergeable_ranks):
        n = len(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        import rustbpe  # only training needs the compiled trainer; encoding is tiktoken's job

        if not hasattr(rustbpe, "Tokenizer"):  # run from the repo root, the bare rustbpe/ source dir imports too
            raise RustbpeNotBuilt("the rustbpe extension is not built: run `uv sync` in the repo root "
                                  "(after changing rustbpe/: `uv sync --reinstall-package nanochat`)")
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise UserError(f"vocab_size={vocab_size} is too small: it must hold the 256 byte tokens and the "
                             f"{len(SPECIAL_TOKENS)} special tokens, so at least {256 + len(SPECIAL_TOKENS)}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_ranks, pattern=SPLIT_PATTERN)
        ranks = trainer.get_mergeable_ranks()
        if len(ranks) != num_ranks:
            raise UserError(f"the training text only allowed {len(ranks) - 256} merges, but vocab_size={vocab_size} "
                             f"needs {num_ranks - 256}: train on more text or ask for a smaller vocab_size")
        return cls(trainer.get_pattern(), dict(ranks))

    @classmethod
    def from_directory(cls, tokenizer_dir):
        rank_path, meta_path = os.path.join(tokenizer_dir, RANK_FILE), os.path.join(tokenizer_dir, META_FILE)
        for path in (meta_path, rank_path):
            if not os.path.isfile(path):
                raise MissingFileError(f"no tokenizer in {tokenizer_dir}: {path} is missing. "
                                       f"Train one with `python -m scripts.tok_train`")
        meta = _read_meta(meta_path)
        ranks = _read_ranks(rank_path)
        n = len(ranks)
        expected_specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        if meta["special_tokens"] != expected_specials:
            raise CorruptTokenizerError(f"{meta_path}: special_tokens must be {expected_specials} (the nanochat special "
                             f"tokens right after the {n} ranks of {rank_path}), got {meta['special_tokens']}")
        if meta["vocab_size"] != n + len(SPECIAL_TOKENS):
            raise CorruptTokenizerError(f"{meta_path}: vocab_size is {meta['vocab_size']}, but {rank_path} has {n} ranks, "
                             f"which with the {len(SPECIAL_TOKENS)} special tokens makes {n + len(SPECIAL_TOKENS)}")
        try:
            return cls(meta["pattern"], ranks)
        except ValueError as e:  # tiktoken rejects the regex
            raise CorruptTokenizerError(f"{meta_path}: pattern is not a valid regex: {e}") from e

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        num_ranks = self.get_vocab_size() - len(SPECIAL_TOKENS)
        lines = [base64.b64encode(self.enc.decode_single_token_bytes(rank)) + b" %d\n" % rank
                 for rank in range(num_ranks)]
        rank_data = b"".join(lines)
        write_atomic(os.path.join(tokenizer_dir, RANK_FILE), lambda f: f.write(rank_data))
        meta = {"format": FORMAT, "pattern": self.pattern, "special_tokens": self.special_tokens,
                "vocab_size": self.get_vocab_size()}
        meta_data = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
        write_atomic(os.path.join(tokenizer_dir, META_FILE), lambda f: f.write(meta_data))

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return dict(self.special_tokens)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode_special(self, name):
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def _token_id(self, token):
        """An id given as itself or as a special token's name (for prepend/append)."""
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"expected a token id in [0, {self.get_vocab_size()}) or a special token name, got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=None):
        """Ids of a str, or a list of id lists for a list of str (encoded in parallel threads).
        Special token names inside the text are encoded as ordinary text; add specials with prepend/append."""
        prefix = [] if prepend is None else [self._token_id(prepend)]
        suffix = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads or available_cpus())
            return [prefix + row + suffix for row in rows]
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)  # bytes that are not valid UTF-8 become U+FFFD

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask) of a chat conversation; mask is 1 on the tokens the assistant is trained to produce.
        See _render for the format. Both lists are cut to max_tokens."""
        ids, mask = self._render(chat_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Ids of the conversation without its final assistant message, ending in <|assistant_start|>: the prompt
        from which the model writes that message (RL, generative evaluation). Not truncated."""
        messages = chat_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"message {len(conversation['messages']) - 1}: render_for_completion needs a conversation "
                             f"ending with an assistant message (it is replaced by <|assistant_start|>), "
                             f"got role {messages[-1]['role']!r}")
        ids, _ = self._render(messages[:-1])
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def _render(self, messages):
        # <|bos|>, then per user turn <|user_start|> text <|user_end|>, per assistant turn <|assistant_start|>
        # content <|assistant_end|>. Supervised (mask 1): the assistant's text, its python calls with their
        # delimiters, and <|assistant_end|> (so it learns to stop). Not supervised: everything the model is given,
        # i.e. bos, user turns, <|assistant_start|> (the engine forces it) and python outputs (the tool writes them).
        special = self.special_tokens
        ids, mask = [self.bos_token_id], [0]

        def add(token_ids, supervised):
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([special["<|user_start|>"], *self.encode(content), special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add([special["<|python_start|>"], *self.encode(part["text"]), special["<|python_end|>"]], 1)
                else:  # python_output
                    add([special["<|output_start|>"], *self.encode(part["text"]), special["<|output_end|>"]], 0)
            add([special["<|assistant_end|>"]], 1)
        return ids, mask


def chat_messages(conversation):
    """The messages of a conversation, checked, with a leading system message merged into the first user message.
    The input is not modified."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError(f"a conversation must be a dict with a 'messages' list, got {_short(conversation)}")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("the conversation has no messages")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: must be a dict with 'role' and 'content', got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r}; allowed: 'system' (first message only), "
                             f"'user', 'assistant'")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message is only allowed as the first message")
        expected = "user" if (i - int(has_system)) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (after an optional system "
                             f"message, roles alternate user, assistant, user, ... starting with user)")
        if role != "assistant" or not isinstance(content, list):
            if not isinstance(content, str):
                allowed = "a str or a list of parts" if role == "assistant" else "a str"
                raise ValueError(f"message {i}: {role} content must be {allowed}, got {_short(content)}")
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
                found = part.get("type") if isinstance(part, dict) else part
                raise ValueError(f"message {i}, part {j}: unknown part type {_short(found)}; a part is a dict "
                                 f"{{'type': one of {PART_TYPES}, 'text': str}}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}, part {j}: 'text' must be a str, got {_short(part.get('text'))}")
    if not has_system:
        return list(messages)
    if len(messages) == 1:
        raise ValueError("message 0: a system message must be followed by a user message")
    merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [merged] + messages[2:]


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# How a calculator call reads in plain text, by the parts it goes from and to: <<12*7=84>>, GSM8K's annotation
INLINE_MARKS = {("text", "python"): "<<", ("python", "python_output"): "=", ("python_output", "text"): ">>",
                ("python", "text"): ">>", ("python_output", "python"): ">><<", ("text", "python_output"): "<<="}


class ReplyText:
    """A reply's tokens as text while they arrive, for the terminal (scripts/chat_cli.py) and the server
    (nanochat/server.py). feed(token) returns the (part, text) pieces it completes; part is "text", "python" (a
    calculator call as the model writes it) or "python_output" (the tool's result). The tool's delimiters and the
    other special tokens are not text. A piece never ends inside a character: tokens are decoded in a pending
    window that is let out once it does not end in U+FFFD, i.e. once a character split across tokens has its last
    byte (a window of 8 tokens still ending in U+FFFD is let out anyway: those bytes are not UTF-8 at all).
    `parts` collects the reply as message parts, to send back as the assistant's content in the next turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = SpecialTokens(tokenizer)
        self.switch = {special.python_start: "python", special.python_end: "text",
                       special.output_start: "python_output", special.output_end: "text"}
        self.special = set(tokenizer.get_special_tokens().values())
        self.part, self.pending = "text", []
        self.parts, self.segment = [], None  # segment: the part being written since the last delimiter
        self.shown = "text"  # the part inline() last wrote

    def feed(self, token):
        if token in self.special:
            pieces = self.flush()
            self.part, self.segment = self.switch.get(token, self.part), None
            return pieces
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 8:
            return []
        return self._emit(text)

    def flush(self):
        """The pieces still pending: call once the reply has ended."""
        return self._emit(self.tokenizer.decode(self.pending)) if self.pending else []

    def _emit(self, text):
        self.pending = []
        if not text:
            return []
        if self.segment is None:
            self.segment = {"type": self.part, "text": ""}
            self.parts.append(self.segment)
        self.segment["text"] += text
        return [(self.part, text)]

    def inline(self, pieces, end=False):
        """Pieces as plain text, a calculator call reading <<expression=result>>; end=True closes a call that the
        reply ended in."""
        out = ""
        for part, text in pieces + ([("text", "")] if end else []):
            if part != self.shown:
                out, self.shown = out + INLINE_MARKS[(self.shown, part)], part
            out += text
        return out


def _read_meta(path):
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptTokenizerError(f"{path} is not valid JSON ({e}); re-run `python -m scripts.tok_train`") from e
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise CorruptTokenizerError(f"{path}: format is {found!r}, expected {FORMAT!r} (not a nanochat tokenizer file)")
    for key, kind in (("pattern", str), ("special_tokens", dict), ("vocab_size", int)):
        if not isinstance(meta.get(key), kind):
            raise CorruptTokenizerError(f"{path}: {key!r} must be a {kind.__name__}, got {_short(meta.get(key))}")
    return meta


def _read_ranks(path):
    """{token bytes: rank} from a tiktoken rank file; ranks must be 0, 1, 2, ... in file order."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    ranks = {}
    for rank, line in enumerate(lines):
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected two fields")
            token, found_rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except (ValueError, binascii.Error):
            raise CorruptTokenizerError(f"{path}, line {rank + 1}: expected `<base64 token> <rank>`, "
                             f"got {_short(line)} (corrupt or not a tiktoken rank file)") from None
        if found_rank != rank:
            raise CorruptTokenizerError(f"{path}, line {rank + 1}: rank {found_rank}, expected {rank} "
                             f"(ranks must be 0..n-1 in order)")
        if token in ranks:
            raise CorruptTokenizerError(f"{path}, line {rank + 1}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # without all single bytes some texts could not be encoded at all
        raise CorruptTokenizerError(f"{path}: {len(missing)} of the 256 single-byte tokens are missing (e.g. byte {missing[0]})")
    return ranks


def get_tokenizer():
    """The trained tokenizer in <base>/tokenizer/."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def compute_token_bytes(tokenizer):
    """int32 tensor (vocab_size,): how many bytes of text each token id stands for; 0 for special tokens, which
    stand for no text and so are left out of bits-per-byte. Taken from the raw token bytes: decoding a token
    to str and re-encoding would count a partial UTF-8 sequence as the 3-byte replacement character."""
    special_ids = set(tokenizer.get_special_tokens().values())
    counts = [0 if i in special_ids else len(tokenizer.enc.decode_single_token_bytes(i))
              for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(counts, dtype=torch.int32)


def get_token_bytes(device="cpu"):
    """The tensor of compute_token_bytes, as saved by tok_train to <base>/tokenizer/token_bytes.pt."""
    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} is missing; it is written by `python -m scripts.tok_train`")
    return torch.load(path, map_location=device, weights_only=True)
