"""
Measure our tokenizer's compression, bytes of UTF-8 text per token (higher means more text fits in the context),
and compare it with GPT-2's and GPT-4's.

Texts: a few short fixed samples of different kinds (news, Korean, code, math, science), and the first num_docs
documents of the train and val splits. The comparison reads tiktoken's rank files for GPT-2 (r50k_base) and GPT-4
(cl100k_base) from data/tiktoken/ (shipped, so it runs offline) or NANOCHAT_TIKTOKEN_DIR; a baseline that cannot
be had is skipped with a warning. Not a speed benchmark: see dev/bench/tokenizer.py.

Usage:
    python -m scripts.tok_eval
    python -m scripts.tok_eval --num_docs=20
    NANOCHAT_TIKTOKEN_DIR=/path/to/rank/files python -m scripts.tok_eval
"""

import hashlib
import os
import shutil

import tiktoken

from nanochat.common import UserError, get_base_dir
from nanochat.configurator import configure
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

# Settings
num_docs = 100  # documents taken from the start of each of the train and val splits
user_config = configure(globals())
if num_docs < 0:
    raise UserError(f"--num_docs={num_docs}: must be >= 0 (0 evaluates only the fixed samples)")

# -----------------------------------------------------------------------------
# The texts

SAMPLES = {
    "news": (
        "GENEVA, March 14 (Reporting by staff) - Delegates from forty-two countries agreed on Thursday to a "
        "framework for sharing weather-satellite data, ending three years of stalled talks. The accord, which still "
        "needs to be ratified by national parliaments, would give smaller nations free access to real-time imagery "
        "within 15 minutes of capture. \"This is a good day for farmers and fishermen,\" said the conference chair, "
        "adding that the first data exchanges could begin as early as January 2026. Critics warned that the $1.2 "
        "billion needed for new ground stations has not yet been pledged."
    ),
    "korean": (
        "서울은 한강을 끼고 발달한 대한민국의 수도이다. 조선 시대부터 정치와 문화의 중심지였으며, 오늘날에는 약 "
        "천만 명이 살고 있는 세계적인 대도시가 되었다. 도심에는 오래된 궁궐과 높은 빌딩이 함께 서 있고, 봄에는 "
        "벚꽃이, 가을에는 단풍이 도시를 물들인다. 지하철은 하루에 수백만 명의 시민을 실어 나른다."
    ),
    "code": (
        "class LRUCache:\n"
        "    \"\"\"Keeps the `capacity` most recently used items.\"\"\"\n\n"
        "    def __init__(self, capacity: int):\n"
        "        self.capacity = capacity\n"
        "        self.items = {}\n\n"
        "    def get(self, key):\n"
        "        if key not in self.items:\n"
        "            return None\n"
        "        value = self.items.pop(key)\n"
        "        self.items[key] = value  # re-insert: now the most recent\n"
        "        return value\n\n"
        "    def put(self, key, value):\n"
        "        self.items.pop(key, None)\n"
        "        self.items[key] = value\n"
        "        while len(self.items) > self.capacity:\n"
        "            del self.items[next(iter(self.items))]\n"
    ),
    "math": (
        "\\begin{theorem}[Cauchy--Schwarz]\n"
        "For all vectors $u, v$ in an inner product space, $|\\langle u, v \\rangle|^2 \\le "
        "\\langle u, u \\rangle \\cdot \\langle v, v \\rangle$.\n"
        "\\end{theorem}\n"
        "\\begin{proof}\n"
        "If $v = 0$ both sides vanish. Otherwise let $\\lambda = \\frac{\\langle u, v \\rangle}{\\|v\\|^2}$; then\n"
        "\\[ 0 \\le \\|u - \\lambda v\\|^2 = \\|u\\|^2 - \\frac{|\\langle u, v \\rangle|^2}{\\|v\\|^2}, \\]\n"
        "and multiplying by $\\|v\\|^2 > 0$ gives the claim. Equality holds iff $u = \\lambda v$.\n"
        "\\end{proof}\n"
        "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}, \\qquad \\sum_{n=1}^{\\infty} \\frac{1}{n^2} = "
        "\\frac{\\pi^2}{6}$$"
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent "
        "reactions, which take place in the thylakoid membranes of the chloroplast, chlorophyll absorbs photons "
        "and water molecules are split, releasing oxygen (O2) as a by-product. The energy captured is stored "
        "temporarily in ATP and NADPH. In the Calvin cycle, the enzyme RuBisCO fixes carbon dioxide onto "
        "ribulose-1,5-bisphosphate; about 6 CO2 molecules are needed to build one molecule of glucose (C6H12O6). "
        "Roughly 1-2% of the sunlight reaching a leaf ends up stored as chemical energy."
    ),
}


def first_docs(split, n):
    """The first n documents of a split, joined into one text."""
    docs = []
    for batch in parquets_iter_batched(split=split):
        docs.extend(batch)
        if len(docs) >= n:
            break
    return "\n".join(docs[:n])


texts = dict(SAMPLES)
if num_docs > 0:
    texts["train"] = first_docs("train", num_docs)
    texts["val"] = first_docs("val", num_docs)

# -----------------------------------------------------------------------------
# The tokenizers

OPENAI_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tiktoken")


def get_openai_encoding(name):
    """tiktoken.get_encoding(name) from the local <name>.tiktoken ($NANOCHAT_TIKTOKEN_DIR, else data/tiktoken/).
    tiktoken first looks for a downloaded rank file in $TIKTOKEN_CACHE_DIR, named sha1(url), and checks its sha256
    against the hash it knows; so a copy placed there is used exactly as if it had been downloaded."""
    local_dir = os.environ.get("NANOCHAT_TIKTOKEN_DIR") or SHIPPED_DIR
    local_path = os.path.join(local_dir, f"{name}.tiktoken")
    if not os.path.isfile(local_path):
        raise FileNotFoundError(f"{local_dir} has no {name}.tiktoken")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(get_base_dir(), "tiktoken_cache")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir  # "" would turn tiktoken's cache (and so this) off
    cache_path = os.path.join(cache_dir, hashlib.sha1(OPENAI_BLOB_URL.format(name).encode()).hexdigest())
    if not os.path.exists(cache_path):
        os.makedirs(cache_dir, exist_ok=True)
        shutil.copyfile(local_path, cache_path + f".tmp{os.getpid()}")
        os.replace(cache_path + f".tmp{os.getpid()}", cache_path)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # a damaged copy fails tiktoken's hash check, and then the download it tries instead
        raise RuntimeError(f"could not load tiktoken's {name!r} from {local_path}: {e}") from e


ours = get_tokenizer()
encoders = {}
for baseline, encoding_name in (("gpt2", "r50k_base"), ("gpt4", "cl100k_base")):
    try:
        encoders[baseline] = get_openai_encoding(encoding_name)
    except (RuntimeError, FileNotFoundError) as e:  # offline without the rank files: evaluate the rest
        print(f"warning: skipping the {baseline} comparison: {e}")
baselines = list(encoders)
encoders["ours"] = ours.enc

# -----------------------------------------------------------------------------
# Evaluate

results = {}  # text name -> {"bytes": n, "gpt2": tokens, "gpt4": tokens, "ours": tokens}
for text_name, text in texts.items():
    ids = ours.encode(text)
    assert ours.decode(ids) == text, f"our tokenizer does not round-trip the {text_name} text"
    # encode_ordinary: special-token strings in the text are plain text, as in training
    results[text_name] = {"bytes": len(text.encode("utf-8"))}
    results[text_name].update({name: len(enc.encode_ordinary(text)) for name, enc in encoders.items()})


def comparison_table(baseline):
    """Markdown table of bytes/token, ours vs baseline; the relative difference is positive when we use fewer
    tokens than the baseline for the same text."""
    lines = [f"| Text | Bytes | {baseline} tokens | {baseline} bytes/token | ours tokens | ours bytes/token | diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for text_name, r in results.items():
        diff = 100 * (r[baseline] - r["ours"]) / r[baseline]
        lines.append(f"| {text_name} | {r['bytes']:,} | {r[baseline]:,} | {r['bytes'] / r[baseline]:.2f} | "
                     f"{r['ours']:,} | {r['bytes'] / r['ours']:.2f} | {diff:+.1f}% |")
    return "\n".join(lines) + "\n"


def ours_table():
    """Markdown table of our tokenizer alone: tokens and bytes/token per text."""
    lines = ["| Text | Bytes | tokens | bytes/token |", "|---|---:|---:|---:|"]
    for text_name, r in results.items():
        lines.append(f"| {text_name} | {r['bytes']:,} | {r['ours']:,} | {r['bytes'] / max(r['ours'], 1):.2f} |")
    return "\n".join(lines) + "\n"


own = ours_table()
tables = {baseline: comparison_table(baseline) for baseline in baselines}
print("Vocab sizes: " + ", ".join(f"{name} {enc.n_vocab:,}" for name, enc in encoders.items()))
print(f"\nOur tokenizer ({ours.get_vocab_size():,} tokens)\n{own}")
for baseline, table in tables.items():
    print(f"\nCompression vs {baseline} (diff > 0: ours needs fewer tokens)\n{table}")

total_bytes = sum(r["bytes"] for r in results.values())
total_tokens = sum(r["ours"] for r in results.values())
get_report().log(section="Tokenizer evaluation", data=[
    user_config,
    {"vocab_size": ours.get_vocab_size(), "bytes per token (all texts)": round(total_bytes / max(total_tokens, 1), 3),
     "baselines": ", ".join(baselines) or "none (no rank files)"},
    "", "### Our tokenizer", "", own,
] + [f"### Comparison with {baseline.upper().replace('GPT', 'GPT-')}\n\n" + table for baseline, table in tables.items()])
