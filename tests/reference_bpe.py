"""A deliberately plain, slow byte-level BPE in pure Python: the specification rustbpe is tested against.

Training recounts every pair from scratch before each merge; the most frequent pair wins and ties go to the
smallest (first id, second id), which is the rule rustbpe promises. Encoding repeatedly merges the pair that was
learned earliest."""

from collections import Counter

import regex


def _merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def train(texts, vocab_size, pattern):
    """[(pair, count, tied)] of the vocab_size - 256 merges (fewer if the text runs out of pairs); merge i makes
    token 256+i, and `tied` says whether another pair had the same count (so the tie-break rule decided)."""
    chunks = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = Counter({tuple(chunk.encode("utf-8")): count for chunk, count in chunks.items()})
    merges = []
    for new_id in range(256, vocab_size):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        tied = sum(count == pairs[best] for count in pairs.values()) > 1
        merges.append((best, pairs[best], tied))
        merged = Counter()
        for word, count in words.items():
            merged[_merge(word, best, new_id)] += count
        words = merged
    return merges


def token_bytes(merges):
    """The bytes of every token id, given the merged pairs in order."""
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    return tokens


def encode(text, merges, pattern):
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    ids = []
    for chunk in regex.findall(pattern, text):
        word = tuple(chunk.encode("utf-8"))
        while len(word) >= 2:
            pair = min(zip(word, word[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            word = _merge(word, pair, rank[pair])
        ids.extend(word)
    return ids
