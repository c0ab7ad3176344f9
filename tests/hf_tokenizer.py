"""The point of comparison for our tokenizer: the same recipe (split pattern, byte-level BPE, special tokens) trained
with HuggingFace `tokenizers` (a dev dependency). The tests check that rustbpe learns what it learns."""

import os

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN


class HuggingFaceTokenizer:
    """Saved as HuggingFace's own tokenizer.json, so keep it out of the directory of a RustBPETokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        tokenizer = Tokenizer(BPE(unk_token=None))
        # split like ours, then map every byte to a printable character so that BPE runs over bytes
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS)
        tokenizer.train_from_iterator(text_iterator, trainer)
        return cls(tokenizer)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no HuggingFace tokenizer in {tokenizer_dir}: {path} is missing")
        return cls(Tokenizer.from_file(path))

    def save(self, tokenizer_dir):
        os.makedirs(tokenizer_dir, exist_ok=True)
        self.tokenizer.save(os.path.join(tokenizer_dir, "tokenizer.json"))

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def encode_special(self, name):
        return self.tokenizer.token_to_id(name)

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def encode(self, text, prepend=None, append=None, num_threads=None):
        prefix = [] if prepend is None else [prepend if isinstance(prepend, int) else self.encode_special(prepend)]
        suffix = [] if append is None else [append if isinstance(append, int) else self.encode_special(append)]
        if isinstance(text, str):
            return prefix + self.tokenizer.encode(text, add_special_tokens=False).ids + suffix
        rows = self.tokenizer.encode_batch(text, add_special_tokens=False)
        return [prefix + row.ids + suffix for row in rows]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)
