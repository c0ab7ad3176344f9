"""
CORE, the base-model metric of the DCLM paper: 22 few-shot tasks scored from a base model's losses, each accuracy
centred on its random baseline, CORE = the mean of the centred accuracies.

The eval bundle (core.yaml, eval_meta_data.csv, eval_data/<category>/<task>.jsonl) is read from a directory or
downloaded once into <base>/eval_bundle. Three task types: multiple_choice (one prompt per choice, same context),
schema (one prompt per context option, same continuation) and language_modeling (the model's greedy tokens must
reproduce the continuation). MC and schema pick the option with the lowest mean loss over its answer span.
A task whose file is missing is skipped, and the result then says "CORE over N of 22 tasks": a partial CORE is never
to be compared with a published one. Ranks take every world_size-th example and all-reduce.

Speed without changing a number: all options of an example, and several examples up to a token budget, go in one
right-padded forward (causal attention keeps each row's scores independent of the padding), and the prompt the
options share runs once into a KV cache that each option continues from (~1/3 of the compute on few-shot MC).
Rows are not cropped to the training context: like the original, a row runs whole while it fits the rotary table
(10x sequence_len), so CORE stays comparable with published numbers; a longer row loses tokens on the left, and
those examples are counted and printed with the score. Not here: chat evaluations (nanochat/chat_eval.py).
"""

import csv
import json
import os
import random
import shutil
import time
import zipfile

import torch
import torch.nn.functional as F
import yaml
from filelock import FileLock

from nanochat.common import (MissingFileError, UserError, all_ranks_sum, dist_rank_and_size, download_file_with_lock,
                             get_base_dir, print0)
from nanochat.gpt import KVCache

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TOTAL_TASKS = 22  # CORE is defined over the 22 tasks of the bundle's core.yaml
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# The shared data has a 1000-example random subset of HellaSwag val in the bundle's schema; the bundle's own
# hellaswag.jsonl (10,042 rows) is used whenever it exists.
FALLBACK_FILES = {"language_understanding/hellaswag.jsonl": "eval_data_fallback/hellaswag_val_olmes1000.jsonl"}
# Padded tokens per forward (0 = one example per forward). A GPU needs many rows per forward to be busy (one d4
# example is mostly launch overhead); a CPU gains a little from a few examples together and loses again to the
# padding of bigger forwards (dev/bench/eval.py, d4 on 2 quiet cores: 2048 tokens ran at 1.18x the speed of one
# example at a time, 8192 at 1.01x).
BATCH_TOKENS = {"cuda": 8192, "mps": 8192, "cpu": 2048}

# -----------------------------------------------------------------------------
# The bundle: find it, or download and unpack it


def _bundle_root(names):
    """The folder inside a zip that holds core.yaml: '' (at the top) or 'eval_bundle/' (the real zip's layout)."""
    for name in names:
        if name == "core.yaml" or (name.endswith("/core.yaml") and name.count("/") == 1):
            return name[: -len("core.yaml")]
    return None


def validate_bundle_zip(path):
    """Reject a download that is not the eval bundle (an HTML error page, a truncated or corrupt zip)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip file")
    with zipfile.ZipFile(path) as archive:
        if _bundle_root(archive.namelist()) is None:
            raise ValueError(f"{path} has no core.yaml at its top or in one top-level folder")
        bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"{path}: member {bad} fails its CRC check")


def unpack_bundle(zip_path, bundle_dir):
    """Extract the bundle into a temporary folder beside bundle_dir, then rename it into place: bundle_dir is either
    absent or complete. zipfile drops absolute paths and '..' from member names, so nothing lands outside."""
    tmp_dir = f"{bundle_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            root = _bundle_root(archive.namelist())
            archive.extractall(tmp_dir)
        os.replace(os.path.join(tmp_dir, root) if root else tmp_dir, bundle_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def find_bundle(bundle_dir=None, url=None, attempts=5):
    """The bundle directory: bundle_dir when given (it must hold core.yaml), else <base>/eval_bundle, downloaded
    from url (default BUNDLE_URL; locked across ranks, retried, validated) and unpacked there the first time."""
    url = url or BUNDLE_URL
    if bundle_dir:
        if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
            raise MissingFileError(f"bundle_dir={bundle_dir!r} has no core.yaml; point it at an eval bundle (e.g. "
                                   f"data/core_eval) or leave it empty to download {url} into <base>/eval_bundle")
        return bundle_dir
    bundle_dir = os.path.join(get_base_dir(), "eval_bundle")
    with FileLock(bundle_dir + ".lock"):
        if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
            print0(f"Downloading the CORE eval bundle from {url} ...")
            try:
                zip_path = download_file_with_lock(url, "eval_bundle.zip", validate=validate_bundle_zip,
                                                   desc="eval bundle", attempts=attempts)
            except RuntimeError as e:
                raise MissingFileError(f"no CORE eval bundle in {bundle_dir} and the download failed: {e}. Offline, "
                                       f"pass --bundle_dir=data/core_eval (the repo's 50-row demo subset) or a copy "
                                       f"of the bundle") from e
            unpack_bundle(zip_path, bundle_dir)
            os.remove(zip_path)  # ~160 MB; the unpacked folder is what counts
    return bundle_dir


def load_tasks(bundle_dir, use_fallback=True):
    """The tasks of core.yaml in order, each a dict: label, task_type, num_fewshot, delimiter, baseline (percent),
    path (None when the file is missing) and fallback (True when a stand-in file is used)."""
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for entry in config["icl_tasks"]:
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"{bundle_dir}/core.yaml: task {label} has icl_task_type={task_type!r}; "
                             f"expected one of {TASK_TYPES}")
        if label not in baselines:
            raise ValueError(f"{bundle_dir}/eval_meta_data.csv has no random baseline for task {label}")
        path = os.path.join(bundle_dir, "eval_data", entry["dataset_uri"])
        fallback = False
        if not os.path.isfile(path):
            stand_in = FALLBACK_FILES.get(entry["dataset_uri"])
            if use_fallback and stand_in and os.path.isfile(os.path.join(bundle_dir, stand_in)):
                path, fallback = os.path.join(bundle_dir, stand_in), True
            else:
                path = None
        tasks.append(dict(label=label, task_type=task_type, num_fewshot=entry["num_fewshot"][0],
                          delimiter=entry.get("continuation_delimiter", " "), baseline=baselines[label],
                          path=path, fallback=fallback, dataset_uri=entry["dataset_uri"]))
    return tasks


def load_examples(path, max_per_task=-1):
    """The rows of a task file, shuffled with Random(1337) (the files are often ordered, and a crop should be a
    random sample), then cropped to max_per_task (-1: all)."""
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# -----------------------------------------------------------------------------
# Prompts


def fewshot_examples(data, idx, num_fewshot):
    """Few-shot examples of item idx: drawn from the other items with Random(1234 + idx), so every item has its
    own, reproducible set; the count is clamped to the items that exist (a tiny max_per_task leaves few)."""
    num_fewshot = min(num_fewshot, len(data) - 1)
    if num_fewshot <= 0:
        return []
    rng = random.Random(1234 + idx)
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(others, num_fewshot)]


def render_prompts(item, task_type, delimiter, fewshot):
    """The prompts of one item. Few-shot examples come first, each followed by a blank line.
    multiple_choice: one prompt per choice (same query). schema: one prompt per context option (same
    continuation). language_modeling: [prompt without the continuation (right-stripped, so the continuation's
    leading space stays with its first token), prompt with it]."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        return [prompt.rstrip(), prompt + item["continuation"]]
    raise ValueError(f"task_type={task_type!r}: expected one of {TASK_TYPES}")


def _common_prefix_length(rows):
    length = min(len(row) for row in rows)
    for i in range(length):
        if any(row[i] != rows[0][i] for row in rows):
            return i
    return length


def _common_suffix_length(rows):
    return _common_prefix_length([row[::-1] for row in rows])


def token_rows(task_type, token_lists, max_len=None):
    """(rows, spans) to score for one item, from its prompts' tokens (BOS first). A span (start, end) is the range of
    tokens of a row that are scored: after the common prefix of the choices (MC), the common suffix (schema), the
    continuation (LM: only the prompt with it is run). Rows longer than max_len lose tokens on the left."""
    if task_type == "multiple_choice":
        prefix = _common_prefix_length(token_lists)
        rows, spans = token_lists, [(prefix, len(row)) for row in token_lists]
    elif task_type == "schema":
        suffix = _common_suffix_length(token_lists)
        rows, spans = token_lists, [(len(row) - suffix, len(row)) for row in token_lists]
    else:
        without, with_continuation = token_lists
        rows, spans = [with_continuation], [(_common_prefix_length(token_lists), len(with_continuation))]
    cropped = []
    for row, (start, end) in zip(rows, spans):
        if max_len is not None and len(row) > max_len:
            cut = len(row) - max_len
            row, start, end = row[cut:], start - cut, end - cut
        # a span scores tokens start..end-1 from the predictions at start-1..end-2: at least one token, after position 0
        start = max(1, min(start, end - 1))
        cropped.append((row, (start, end)))
    return [row for row, _ in cropped], [span for _, span in cropped]


# -----------------------------------------------------------------------------
# Scoring


def _pad(rows, pad_id):
    """(len(rows), longest) long tensor of the rows, right-padded with pad_id."""
    batch = torch.full((len(rows), max(len(row) for row in rows)), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, :len(row)] = torch.tensor(row, dtype=torch.long)
    return batch


def supports_prefix_sharing(model):
    """A nanochat GPT takes a KV cache; other models (test stubs, wrappers) are run one full row per option."""
    config = getattr(model, "config", None)
    return all(hasattr(config, name) for name in ("n_layer", "n_head", "n_kv_head", "n_embd"))


@torch.no_grad()
def score_batch(model, items, pad_id, device, share_prefix=True):
    """Is each item right? items: dicts with rows, spans, shared, task_type and gold.

    All rows of all items go through one forward, right-padded; a row's scores read only its own span, which the
    padding after it cannot affect. With share_prefix, the leading tokens that all options of an item share and
    whose predictions are not scored (item["shared"]: few-shot examples + question, most of a multiple-choice
    prompt) run once per item into a KV cache, and each option's row continues from there, instead of every
    option running the whole prompt."""
    rows = [row for item in items for row in item["rows"]]
    spans = [span for item in items for span in item["spans"]]
    row_shared = [item["shared"] if share_prefix else 0 for item in items for _ in item["rows"]]
    # Logits are wanted only from the first position that predicts a scored token (the lm_head and softcap over
    # a few-shot prompt's every position would cost as much as the blocks; on a GPU, a 65K vocab makes them GBs)
    first = min(start - 1 - q for (start, _), q in zip(spans, row_shared))
    if any(row_shared):
        config = model.config
        def new_cache(batch_size, seq_len):
            return KVCache(batch_size, config.n_kv_head, seq_len, config.n_embd // config.n_head, config.n_layer, device)
        # 1) each item's shared prefix, once (an item without one gets an empty prefix: its rows start at 0)
        prefixes = _pad([item["rows"][0][:item["shared"]] or [pad_id] for item in items], pad_id).to(device)  # (E, Q)
        prefix_cache = new_cache(len(items), prefixes.size(1))
        model(prefixes, kv_cache=prefix_cache, logits_from=-1)  # only the cache is wanted
        # 2) every row continues from its item's prefix
        suffixes = _pad([row[q:] for row, q in zip(rows, row_shared)], pad_id).to(device)  # (R, S)
        cache = new_cache(len(rows), prefixes.size(1) + suffixes.size(1))
        cache.prefill(prefix_cache, rows=[e for e, item in enumerate(items) for _ in item["rows"]])
        cache.set_positions(row_shared)  # a row keeps only its own item's prefix (padding past it is hidden)
        # (R, S - first, V): logits position j of row r is token row_shared[r] + first + j
        logits = model(suffixes, kv_cache=cache, logits_from=first)
    else:
        logits = model(_pad(rows, pad_id).to(device), logits_from=first)  # (R, T - first, V)

    # span tokens start..end-1 are predicted at positions start-1..end-2 (never inside the shared prefix)
    row_index, position, targets = [], [], []
    for r, ((start, end), q, row) in enumerate(zip(spans, row_shared, rows)):
        row_index += [r] * (end - start)
        position += range(start - 1 - q - first, end - 1 - q - first)
        targets += row[start:end]
    row_index, position, targets = (torch.tensor(x, device=device) for x in (row_index, position, targets))
    span_logits = logits[row_index, position]  # (N, V): only the scored positions
    losses = F.cross_entropy(span_logits.float(), targets, reduction="none")
    hits = span_logits.argmax(dim=-1) == targets
    # per row: mean loss over its span, and whether every span token was the argmax
    num_rows = len(rows)
    loss_sums = torch.zeros(num_rows, device=device).index_add_(0, row_index, losses)
    counts = torch.zeros(num_rows, device=device).index_add_(0, row_index, torch.ones_like(losses))
    misses = torch.zeros(num_rows, device=device).index_add_(0, row_index, (~hits).float())
    mean_losses, misses = (loss_sums / counts).tolist(), misses.tolist()

    correct, r = [], 0
    for item in items:
        n = len(item["rows"])
        if item["task_type"] == "language_modeling":
            correct.append(misses[r] == 0)
        else:
            row_losses = mean_losses[r:r + n]
            correct.append(row_losses.index(min(row_losses)) == item["gold"])
        r += n
    return correct


def forward_size(items, share_prefix):
    """(padded tokens, positions reached) of one forward over these items: the rows after their shared prefix plus
    the prefixes; the longest prefix plus the longest padded suffix (rows continue from their own prefix length, so
    a batch can reach further than any one of its rows)."""
    shared = [item["shared"] if share_prefix else 0 for item in items]
    num_rows = sum(len(item["rows"]) for item in items)
    suffix_len = max(len(row) - q for item, q in zip(items, shared) for row in item["rows"])
    return num_rows * suffix_len + sum(1 for q in shared if q) * max(shared), max(shared) + suffix_len


def make_batches(items, batch_tokens, share_prefix=True, max_len=None):
    """Groups of item indices, each forward at most batch_tokens padded tokens and (when max_len is given) reaching
    no position past max_len, taken in order of length so that items of similar length share a forward (little
    padding). An item never splits; one item per forward when batch_tokens <= 0."""
    order = sorted(range(len(items)), key=lambda i: max(len(row) for row in items[i]["rows"]), reverse=True)
    batches, current = [], []
    for i in order:
        tokens, length = forward_size([items[j] for j in current + [i]], share_prefix)
        if current and (tokens > batch_tokens or (max_len is not None and length > max_len)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def prepare_items(data, indices, task, tokenizer, max_len):
    """The rows and spans of data[i] for each i in indices (one tokenizer call for all their prompts), how many
    leading tokens all rows of an item share before the first scored prediction (0 for a single row: nothing to
    share), and whether a row was longer than max_len (cropped)."""
    prompts = [render_prompts(data[i], task["task_type"], task["delimiter"],
                              fewshot_examples(data, i, task["num_fewshot"])) for i in indices]
    flat = tokenizer.encode([p for item_prompts in prompts for p in item_prompts], prepend=tokenizer.get_bos_token_id())
    items, k = [], 0
    for i, item_prompts in zip(indices, prompts):
        token_lists = flat[k:k + len(item_prompts)]
        k += len(item_prompts)
        rows, spans = token_rows(task["task_type"], token_lists, max_len)
        shared = min(_common_prefix_length(rows), min(start for start, _ in spans) - 1) if len(rows) > 1 else 0
        cropped = max_len is not None and any(len(tokens) > max_len for tokens in token_lists)
        items.append(dict(index=i, rows=rows, spans=spans, shared=shared, task_type=task["task_type"],
                          gold=data[i].get("gold"), cropped=cropped))
    return items


def max_row_length(model):
    """The longest row the model can score whole: its rotary table (GPT.rotary_seq_len, 10x the training context,
    as long as the original ever runs), or a stub's max_seq_len; None: no limit."""
    return getattr(model, "rotary_seq_len", None) or getattr(model, "max_seq_len", None)


def score_examples(model, tokenizer, data, task, device, batch_tokens=None, share_prefix=True):
    """(correct, cropped): correct[i] is 1.0 when the model gets data[i] right, cropped the number of examples with
    a row longer than max_row_length(model), which lost tokens on the left. Each rank scores examples rank,
    rank + world_size, ...; both are summed over ranks, so every rank returns the same. batch_tokens: padded tokens
    per forward (None: the device's default, 0: one example per forward)."""
    batch_tokens = BATCH_TOKENS.get(torch.device(device).type, 0) if batch_tokens is None else batch_tokens
    rank, world_size = dist_rank_and_size()
    max_len = max_row_length(model)
    share_prefix = share_prefix and supports_prefix_sharing(model)
    items = prepare_items(data, range(rank, len(data), world_size), task, tokenizer, max_len)
    counts = torch.zeros(len(data) + 1, dtype=torch.float32, device=device)  # 1.0 per right example; last: cropped
    counts[-1] = sum(item["cropped"] for item in items)
    for batch in make_batches(items, batch_tokens, share_prefix, max_len):
        results = score_batch(model, [items[i] for i in batch], tokenizer.get_bos_token_id(), device, share_prefix)
        for i, right in zip(batch, results):
            counts[items[i]["index"]] = float(right)
    all_ranks_sum(counts)  # one all-reduce for both
    return counts[:-1], int(counts[-1].item())


def evaluate_task(model, tokenizer, data, task, device, batch_tokens=None, share_prefix=True):
    """Accuracy of the model on data (this task's examples), the same on every rank (see score_examples)."""
    correct, _ = score_examples(model, tokenizer, data, task, device, batch_tokens, share_prefix)
    return correct.mean().item()


def centered(accuracy, baseline_percent):
    """Accuracy above chance, rescaled so that 1 stays 1: (acc - b) / (1 - b), b the random baseline (a fraction)."""
    b = baseline_percent / 100
    return (accuracy - b) / (1 - b)


def core_label(result):
    """How to name a CORE number: plain "CORE" only when all 22 tasks ran on their own data, else e.g.
    "CORE over 18 of 22 tasks", so that a partial number is never read as (or compared with) full CORE."""
    label = "CORE"
    if result["num_tasks"] < result["total_tasks"]:
        label += f" over {result['num_tasks']} of {result['total_tasks']} tasks"
    if result["fallback_tasks"]:
        label += f" ({' and '.join(result['fallback_tasks'])} on the HellaSwag fallback subset)"
    return label


def evaluate_model(model, tokenizer, device, max_per_task=-1, bundle_dir=None, batch_tokens=None,
                   use_fallback=True, share_prefix=True):
    """CORE of a base model. Returns {"results": {task: accuracy}, "centered_results": {task: centred},
    "core_metric": mean centred accuracy, "num_tasks": tasks evaluated, "total_tasks": 22, "skipped": {task: why},
    "fallback_tasks": [tasks run on a stand-in file], "label": "CORE (over N of 22 tasks ...)",
    "cropped": {task: examples longer than the model's rotary table, cropped on the left}}."""
    bundle_dir = find_bundle(bundle_dir)
    tasks = load_tasks(bundle_dir, use_fallback)
    results, centered_results, skipped, fallback_tasks, cropped = {}, {}, {}, [], {}
    for task in tasks:
        label = task["label"]
        if task["path"] is None:
            skipped[label] = f"missing {os.path.join(bundle_dir, 'eval_data', task['dataset_uri'])}"
            print0(f"{label:<35} skipped: {skipped[label]}")
            continue
        t0 = time.time()
        data = load_examples(task["path"], max_per_task)
        correct, cropped[label] = score_examples(model, tokenizer, data, task, device, batch_tokens, share_prefix)
        results[label] = accuracy = correct.mean().item()
        centered_results[label] = centered(accuracy, task["baseline"])
        if task["fallback"]:
            fallback_tasks.append(label)
        note = " (fallback subset)" if task["fallback"] else ""
        note += f" ({cropped[label]} cropped)" if cropped[label] else ""
        print0(f"{label:<35} accuracy {accuracy:.4f} | centered {centered_results[label]:+.4f} | "
               f"{len(data)} examples, {task['num_fewshot']}-shot, {time.time() - t0:.1f}s{note}")
    if not results:
        raise UserError(f"no CORE task file found in {bundle_dir}/eval_data; expected the files listed in its core.yaml")
    result = dict(results=results, centered_results=centered_results,
                  core_metric=sum(centered_results.values()) / len(centered_results), num_tasks=len(results),
                  total_tasks=max(TOTAL_TASKS, len(tasks)), skipped=skipped, fallback_tasks=fallback_tasks,
                  cropped=cropped)
    result["label"] = core_label(result)
    print0(f"{result['label']}: {result['core_metric']:.4f} | {cropped_note(result, model)}")
    return result


def cropped_note(result, model):
    """What cropping did to a CORE result: "no example cropped", or how many were, in which tasks."""
    total = sum(result["cropped"].values())
    if not total:
        return f"no example cropped (all rows fit the {max_row_length(model)}-token rotary table)"
    where = ", ".join(f"{task} {n}" for task, n in result["cropped"].items() if n)
    return f"{total} examples cropped on the left to the {max_row_length(model)}-token rotary table ({where})"
