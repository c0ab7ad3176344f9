"""
Quality per FLOP: the validation bits per byte that a training recipe reaches for a fixed budget of training FLOPs,
on the shipped corpus, over several seeds. It compares configurations of our base_train with each other (a setting
A/B) or with the original nanochat trained side by side, and says which differences stand out of the seed spread.

A configuration is a name, the `--name=value` settings it passes to `python -m scripts.base_train`, and `+key=value`
options for this harness (+codebase=orig runs the original's own base_train, with its own defaults and dashed
settings; +fractions=0.7,0.85,1 trains it at those fractions of the budget, each with its full LR schedule). Items are
separated by ';', the first word of each is its name:

    --configs="ours; orig +codebase=orig"
    --configs="seed --arch=seed; new +fractions=0.7,0.85,1"

Equal FLOPs. Every run's training FLOPs are counted by this harness, the same way for every codebase, on the model
its own training script built (a 1-step probe run per configuration, loaded with that codebase's own checkpoint code):
    FLOPs per token = 6 * (weights of every nn.Linear) + 12 * n_head * head_dim * sum over layers of min(window, T)
i.e. 2 FLOPs per multiply-add forward and twice that backward for every weight the token stream is multiplied by
(embedding tables are lookups: 0), plus attention's QK^T and AV over the keys a query at the end of a row can see
(PaLM's count: the causal triangle is not halved; a sliding window of w keys counts w, what a windowed kernel
computes, read from the original's `window_sizes` [(left, right), ...] or our `windows` [left, ...], -1 = all T).
A run trains round(fraction * budget / (FLOPs per token * total_batch_size)) steps; the budget defaults to
budget_steps steps of the seed architecture at this depth (seed_flops_per_token below).

Equal evaluation. Every run's final checkpoint is loaded by its own codebase's build_model and scored by our
nanochat/loss_eval.py on the same text: whole documents from the start of the pinned validation shard (at least
eval_bytes bytes of UTF-8), each after a BOS, packed into one stream and cut into rows of max_seq_len, so every byte
is predicted exactly once whatever the tokenizer (bits per byte counts each token's raw bytes; the sum is checked
against the text's). It is scored twice on the same targets: val_bpb in rows cut from that stream, which start
anywhere (the rows our loader trains on), and val_bpb_aligned with each document starting a row of its own after its
BOS (the rows the original's loader trains on, best-fit packed and cropped), so neither codebase is judged only on
the other's kind of row. Each codebase's own end-of-run val bpb is recorded beside it (own_val_bpb) as a cross-check.

Runs go round-robin (config A seed 0, B seed 0, A seed 1, ...), `jobs` at a time, each with OMP_NUM_THREADS=threads.
Each finished run is added to the results JSON at once (under a file lock, several harnesses may share one file), so
a stop loses at most the runs in flight; a rerun skips what is recorded, and a run that another harness on the same
workdir has in flight (it holds the run's lock) is left to it. The table (markdown beside the JSON) gives
per configuration and budget fraction the val bpb of every seed, mean, spread (max - min), FLOPs, steps and times,
and the difference from the baseline configuration at the full budget, called real only when the two sets of seeds
do not overlap; seed by seed, the differences from the baseline at the same budget and their paired t (a seed moves
every configuration the same way, so a steady gain can show here while the sets still overlap: a t beyond about 3
at 4 seeds, the 5% level on 3 degrees of freedom); and, for a configuration trained at several fractions, the FLOPs
at which it matches the baseline's full-budget mean (interpolated in log FLOPs).

The original's base_train seeds with a fixed 42: it runs through a launcher that replaces that seed with the run's.
Its deps beside our environment: `uv pip install --target DIR rustbpe` and --orig_pythonpath=DIR. Not a training
script, not a test: the figures go into dev/BENCHMARKS.md ("Quality per FLOP").

Usage:
    python -m dev.bench.quality --configs="ours; orig +codebase=orig" --orig_repo=/path/to/nanochat \\
        --orig_pythonpath=/path/to/origdeps --depth=4 --budget_steps=400 --seeds=3 --jobs=2
    python -m dev.bench.quality --configs="ours +fractions=0.85" --depth=4 --seeds=3   # adds to the same results
    python -m dev.bench.quality --configs="ours; orig +codebase=orig" --baseline=orig --report_only=True
"""

import concurrent.futures
import contextlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

# Settings
configs = "ours"  # ';'-separated: name, then --settings for the training script and +options for this harness
baseline = ""  # the configuration the others are compared with (at the full budget); "" = the first one
depth = 4
max_seq_len = 512
device_batch_size = 8
total_batch_size = 8192  # tokens per optimizer step, the same for every configuration
vocab_size = 4096
budget_steps = 400  # the budget: this many steps of the seed architecture at this depth...
budget_flops = -1.0  # ...unless set: training FLOPs of a full-budget run
fractions = "1"  # budget fractions for configurations without +fractions
seeds = 3  # seeds 0..seeds-1 for every configuration and fraction
jobs = 1  # runs at a time
threads = 1  # OMP_NUM_THREADS of each run
dtype = "float32"  # NANOCHAT_DTYPE of every run, both codebases
eval_bytes = 1_000_000  # UTF-8 bytes of validation text every run is scored on (whole documents, at least this many)
own_eval_tokens = 65536  # tokens of each codebase's own end-of-run val bpb (own_val_bpb)
workdir = ""  # data, tokenizers, checkpoints and logs; "" = <NANOCHAT_BASE_DIR>/quality
results = ""  # the results JSON (the table goes beside it as .md); "" = <workdir>/results.json
orig_repo = ""  # a checkout of the original nanochat, for +codebase=orig
orig_pythonpath = ""  # extra PYTHONPATH for its processes (its PyPI rustbpe, installed apart from ours)
keep_checkpoints = False  # keep each run's final checkpoint (else deleted once scored)
report_only = False  # rebuild the table from the results file, run nothing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEBASES = ("ours", "orig")
# settings that the harness sets for every run: a configuration may not change them (the FLOP count depends on them)
HARNESS_SETTINGS = ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "num_iterations", "target_flops",
                    "target_param_data_ratio", "model_tag", "seed", "resume_from_step")
# The original's base_train calls torch.manual_seed(42) in compute_init; this runs it with the run's seed instead.
ORIG_LAUNCHER = ("import runpy, sys, torch\n"
                 "seed = int(sys.argv.pop(1))\n"
                 "manual_seed = torch.manual_seed\n"
                 "torch.manual_seed = lambda _: manual_seed(seed)\n"
                 "sys.argv[0] = 'scripts/base_train.py'\n"
                 "runpy.run_module('scripts.base_train', run_name='__main__', alter_sys=True)\n")


def log(message):
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Configurations, budgets and FLOPs

@dataclass(frozen=True)
class Config:
    name: str
    codebase: str  # "ours" | "orig"
    args: tuple  # --name=value settings for the training script, as written
    fractions: tuple  # budget fractions, descending


def parse_fractions(text):
    try:
        values = sorted({float(part) for part in text.split(",") if part.strip()}, reverse=True)
    except ValueError:
        values = []
    if not values or any(not 0 < value <= 10 for value in values):
        raise ValueError(f"fractions {text!r}: expected comma-separated numbers in (0, 10], like 0.7,0.85,1")
    return tuple(values)


def parse_configs(text, default_fractions="1"):
    """The configurations in `text` (see the module docstring), in order."""
    parsed = []
    for item in text.split(";"):
        words = shlex.split(item)
        if not words:
            continue
        name, rest = words[0], words[1:]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"configuration name {name!r}: use letters, digits, '_', '.' or '-' (it names files)")
        if any(config.name == name for config in parsed):
            raise ValueError(f"configuration name {name!r} is used twice in {text!r}")
        options = {"codebase": "ours", "fractions": default_fractions}
        args = []
        for word in rest:
            if word.startswith("+"):
                key, _, value = word[1:].partition("=")
                if key not in options:
                    raise ValueError(f"{name}: unknown harness option {word!r}; expected +codebase=ours|orig or "
                                     f"+fractions=F1,F2,...")
                options[key] = value
            elif word.startswith("--") and "=" in word:
                setting = word[2:].split("=", 1)[0].replace("-", "_")
                if setting in HARNESS_SETTINGS:
                    raise ValueError(f"{name}: {word!r} sets {setting}, which the harness sets for every run "
                                     f"(change it with the harness's own settings)")
                args.append(word)
            else:
                raise ValueError(f"{name}: cannot parse {word!r}: expected --name=value or +option=value")
        if options["codebase"] not in CODEBASES:
            raise ValueError(f"{name}: +codebase={options['codebase']!r}; expected one of {', '.join(CODEBASES)}")
        parsed.append(Config(name, options["codebase"], tuple(args), parse_fractions(options["fractions"])))
    if not parsed:
        raise ValueError(f"no configurations in {text!r}")
    return parsed


def seed_flops_per_token(depth, seq_len, vocab_size):
    """The harness's FLOP count for the seed architecture at this depth (width 64 * depth, 12 width^2 weights a
    block, lm_head over the vocab padded to a multiple of 64, full attention in every layer): the budget's unit."""
    width = 64 * depth
    padded_vocab = -(-vocab_size // 64) * 64
    return 6 * (12 * depth * width * width + width * padded_vocab) + 12 * depth * width * seq_len


def count_flops_per_token(model, seq_len):
    """The harness's FLOP count for a built model (see the module docstring): (total, linear weights, attention)."""
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = config.n_embd // config.n_head
    if hasattr(model, "window_sizes"):  # the original's: (left, right) per layer
        windows = [left for left, _ in model.window_sizes]
    else:  # ours: the keys before a query that each layer sees, -1 = all of them
        windows = getattr(model, "windows", [-1] * config.n_layer)
    attended = sum(seq_len if window < 0 else min(window, seq_len) for window in windows)
    attention = 12 * config.n_head * head_dim * attended
    return 6 * linear_weights + attention, linear_weights, attention


def steps_for_budget(budget, fraction, flops_per_token, tokens_per_step):
    steps = round(fraction * budget / (flops_per_token * tokens_per_step))
    if steps < 1:
        raise ValueError(f"a budget of {fraction} x {budget:.3e} FLOPs is less than one step of {tokens_per_step:,} "
                         f"tokens at {flops_per_token:,} FLOPs per token")
    return steps


# -----------------------------------------------------------------------------
# The validation text and its batches

def read_val_documents(parquet_path, min_bytes):
    """Whole documents from the start of the validation shard, until they hold at least min_bytes UTF-8 bytes."""
    import pyarrow.parquet as pq

    documents, total = [], 0
    with pq.ParquetFile(parquet_path) as parquet:
        for row_group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(row_group, columns=["text"]).column("text").to_pylist():
                documents.append(text)
                total += len(text.encode("utf-8"))
                if total >= min_bytes:
                    return documents
    raise ValueError(f"{parquet_path} holds only {total:,} bytes of text; eval_bytes={min_bytes:,} asks for more")


def val_batches(token_lists, bos_id, seq_len, batch_size, aligned=False):
    """[(inputs, targets)] of (rows, seq_len): the documents' tokens, each list after a BOS, in one stream cut into
    rows; row r predicts stream[r*T+1 .. r*T+T]. Every token after the first is a target exactly once; the last row
    is padded with BOS inputs and ignored (-1) targets. aligned: each document starts a row of its own, BOS first
    (the rows the original trains on), and goes on in the next rows if longer; the same text targets."""
    streams = [[bos_id, *tokens] for tokens in token_lists]
    if not aligned:
        streams = [[token for stream in streams for token in stream]]
    inputs, targets = zip(*(stream_rows(stream, bos_id, seq_len) for stream in streams))
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    return [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]


def stream_rows(stream, bos_id, seq_len):
    """(inputs, targets) of (rows, seq_len) for one token stream, its last row padded (BOS inputs, -1 targets)."""
    num_rows = -(-(len(stream) - 1) // seq_len)
    padded = torch.full((num_rows * seq_len + 1,), -1, dtype=torch.long)
    padded[:len(stream)] = torch.tensor(stream, dtype=torch.long)
    inputs = padded[:-1].view(num_rows, seq_len).clone()
    inputs[inputs < 0] = bos_id
    return inputs, padded[1:].view(num_rows, seq_len)


def token_byte_counts(enc):
    """int64 (n_vocab,): raw bytes each token id of a tiktoken Encoding stands for; 0 for special tokens."""
    special = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    return torch.tensor([0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
                        dtype=torch.int64)


# -----------------------------------------------------------------------------
# Worker: runs in a codebase's own context (its `nanochat` first on sys.path); no import of ours but loss_eval

def worker_measure(job):
    """Load the checkpoint with this codebase's build_model; count its FLOPs; score it on the validation text
    (when job["eval_bytes"] > 0) with our loss_eval.evaluate_bpb, loaded from its file."""
    import importlib.util

    from nanochat.checkpoint_manager import build_model

    model, tokenizer, _ = build_model(job["checkpoint_dir"], job["step"], torch.device("cpu"), "eval")
    seq_len = job["seq_len"]
    flops, linear_weights, attention = count_flops_per_token(model, seq_len)
    result = {"flops_per_token": flops, "linear_weights": linear_weights, "attention_flops_per_token": attention,
              "own_flops_per_token": model.estimate_flops(), "params": sum(p.numel() for p in model.parameters())}
    if job["eval_bytes"] > 0:
        def load(path, name):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        # our loss_eval imports our nanochat.common, which the original's package shadows here: it gets ours, by path
        theirs = sys.modules.get("nanochat.common")
        sys.modules["nanochat.common"] = load(os.path.join(os.path.dirname(job["loss_eval_path"]), "common.py"),
                                              "quality_common")
        try:
            loss_eval = load(job["loss_eval_path"], "quality_loss_eval")
        finally:
            if theirs is None:
                del sys.modules["nanochat.common"]
            else:
                sys.modules["nanochat.common"] = theirs
        enc = tokenizer.enc  # both codebases keep a tiktoken Encoding here
        documents = read_val_documents(job["val_file"], job["eval_bytes"])
        token_lists = [enc.encode_ordinary(text) for text in documents]
        token_bytes = token_byte_counts(enc)
        text_bytes = sum(len(text.encode("utf-8")) for text in documents)
        counted = sum(int(token_bytes[torch.tensor(tokens, dtype=torch.long)].sum()) for tokens in token_lists)
        if counted != text_bytes:
            raise RuntimeError(f"the tokens' bytes add up to {counted:,}, the text has {text_bytes:,}")
        t0 = time.time()
        for key, aligned in [("val_bpb", False), ("val_bpb_aligned", True)]:
            batches = val_batches(token_lists, enc.encode_single_token("<|bos|>"), seq_len, job["batch_size"], aligned)
            result[key] = loss_eval.evaluate_bpb(model, iter(batches), len(batches), token_bytes)
        result.update(eval_s=round(time.time() - t0, 1), eval_bytes=text_bytes, eval_documents=len(documents),
                      eval_tokens=sum(len(tokens) for tokens in token_lists))
    return result


# -----------------------------------------------------------------------------
# Results: one JSON file, added to under a lock as runs finish

def load_results(path):
    if not os.path.exists(path):
        return {"probes": [], "runs": [], "failures": []}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def add_result(path, kind, record):
    """Append record to results[kind] in the file at path: read, add, write atomically, under a file lock."""
    from filelock import FileLock

    with FileLock(path + ".lock"):
        data = load_results(path)
        data.setdefault(kind, []).append(record)
        tmp_path = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp_path, path)


@contextlib.contextmanager
def claim(log_path, wait=False):
    """Hold log_path's lock for a run, yielding whether it is ours: a run's log and checkpoint paths follow from its
    settings, so two harnesses on one workdir would otherwise delete each other's log and checkpoint. Without wait,
    a lock held elsewhere yields False at once. The OS drops the lock with its process: a killed harness leaves none."""
    from filelock import FileLock, Timeout

    lock = FileLock(log_path + ".lock")
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def probe_key(config, sizes):
    return json.dumps({"codebase": config.codebase, "args": list(config.args), **sizes}, sort_keys=True)


def run_key(config, sizes, budget, fraction, seed, eval_size):
    return json.dumps({"name": config.name, "codebase": config.codebase, "args": list(config.args), **sizes,
                       "budget_flops": budget, "fraction": fraction, "seed": seed, "eval_bytes": eval_size},
                      sort_keys=True)


# -----------------------------------------------------------------------------
# The table: per configuration and fraction, the seeds; differences from the baseline; FLOPs to match it

def summarize_group(runs):
    values = [run["val_bpb"] for run in runs]
    return {"n": len(values), "val_bpb": values, "mean": statistics.fmean(values),
            "spread": max(values) - min(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "steps": runs[0]["steps"], "flops": statistics.fmean(run["flops"] for run in runs),
            "train_wall_s": statistics.fmean(run["train_wall_s"] for run in runs),
            "train_cpu_s": statistics.fmean(run["train_cpu_s"] for run in runs),
            "own_val_bpb": [run.get("own_val_bpb") for run in runs],
            "aligned_val_bpb": [run.get("val_bpb_aligned") for run in runs]}


def difference_is_real(values, baseline_values):
    """Real when no seed of one side lands within the range of the other's seeds (needs >= 2 seeds on each side)."""
    if len(values) < 2 or len(baseline_values) < 2:
        return False
    return max(values) < min(baseline_values) or min(values) > max(baseline_values)


def paired_differences(runs, reference_runs):
    """Seed by seed over the seeds both sides have (a seed fixes the init draws; the data order is the same for every
    run), this side's val bpb minus the reference's: (differences, paired t = mean / its standard error, None below
    two seeds or with no variation). Sharper than comparing the two sets, since a seed moves every configuration."""
    reference_by_seed = {run["seed"]: run["val_bpb"] for run in reference_runs}
    differences = [run["val_bpb"] - reference_by_seed[run["seed"]] for run in sorted(runs, key=lambda run: run["seed"])
                   if run["seed"] in reference_by_seed]
    if len(differences) < 2 or statistics.stdev(differences) == 0:
        return differences, None
    return differences, statistics.fmean(differences) / (statistics.stdev(differences) / math.sqrt(len(differences)))


def flops_to_match(points, target_bpb):
    """points: [(flops, mean bpb)] of one configuration at several budgets. (flops, relation): the FLOPs at which its
    bpb first reaches target_bpb, interpolated linearly in log FLOPs between the budgets around it (relation "="); its
    smallest budget when that is already there ("<="); its largest when even that is not (">"): no extrapolation."""
    points = sorted(points)
    if points[0][1] <= target_bpb:
        return points[0][0], "<="
    for (f0, b0), (f1, b1) in zip(points, points[1:]):
        if b1 <= target_bpb:  # the first budget that gets there; the one before does not
            t = (b0 - target_bpb) / (b0 - b1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))), "="
    return points[-1][0], ">"


def summarize(runs, baseline_name):
    """Rows per (depth, name, fraction), each compared with the baseline at the same depth and fraction 1, and seed by
    seed with the baseline at the same depth and fraction where it has one; and per (depth, name) trained at several
    fractions, the FLOPs to match the baseline's full-budget mean."""
    groups = {}
    for run in runs:
        groups.setdefault((run["depth"], run["name"], run["fraction"]), []).append(run)
    rows = []
    for (run_depth, name, fraction), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        row = {"depth": run_depth, "name": name, "codebase": group[0]["codebase"], "args": group[0]["args"],
               "fraction": fraction, **summarize_group(sorted(group, key=lambda run: run["seed"]))}
        reference = groups.get((run_depth, baseline_name, 1.0))
        if reference and (name, fraction) != (baseline_name, 1.0):
            reference_values = [run["val_bpb"] for run in reference]
            row["delta_vs_baseline"] = row["mean"] - statistics.fmean(reference_values)
            row["real"] = difference_is_real(row["val_bpb"], reference_values)
        same_budget = groups.get((run_depth, baseline_name, fraction))
        if same_budget and name != baseline_name:
            row["paired"], row["paired_t"] = paired_differences(group, same_budget)
        rows.append(row)
    matches = []
    for run_depth in sorted({row["depth"] for row in rows}):
        reference = next((row for row in rows if row["depth"] == run_depth and row["name"] == baseline_name
                          and row["fraction"] == 1.0), None)
        if reference is None:
            continue
        for name in sorted({row["name"] for row in rows if row["depth"] == run_depth}):
            points = [(row["flops"], row["mean"]) for row in rows if row["depth"] == run_depth and row["name"] == name]
            if len(points) < 2:
                continue
            flops, relation = flops_to_match(points, reference["mean"])
            matches.append({"depth": run_depth, "name": name, "baseline": baseline_name,
                            "target_bpb": reference["mean"], "flops": flops, "relation": relation,
                            "ratio": flops / reference["flops"]})
    return rows, matches


def markdown_table(rows, matches, baseline_name):
    lines = ["| depth | config | codebase | budget | steps | FLOPs | seeds: val bpb | mean | spread | "
             f"vs {baseline_name} | real? | seed by seed vs {baseline_name} (paired t) | train min (wall / CPU) | "
             "own val bpb | doc-aligned val bpb |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---|---:|---|---|"]
    for row in rows:
        delta = f"{row['delta_vs_baseline']:+.4f}" if "delta_vs_baseline" in row else ""
        real = ("yes" if row["real"] else "no") if "real" in row else ""
        paired = ", ".join(f"{value:+.4f}" for value in row.get("paired", []))
        if row.get("paired_t") is not None:
            paired += f" (t {row['paired_t']:+.1f})"
        own, aligned = (", ".join("-" if value is None else f"{value:.4f}" for value in row[key])
                        for key in ("own_val_bpb", "aligned_val_bpb"))
        lines.append(f"| d{row['depth']} | {row['name']} | {row['codebase']} | {row['fraction']:g}x | {row['steps']} | "
                     f"{row['flops']:.3e} | {', '.join(f'{value:.4f}' for value in row['val_bpb'])} | "
                     f"{row['mean']:.4f} | {row['spread']:.4f} | {delta} | {real} | {paired} | "
                     f"{row['train_wall_s'] / 60:.1f} / {row['train_cpu_s'] / 60:.1f} | {own} | {aligned} |")
    for match in matches:
        relation = {"=": "at", "<=": "at or below", ">": "above"}[match["relation"]]
        lines.append(f"\nd{match['depth']}: {match['name']} reaches {baseline_name}'s full-budget mean val bpb "
                     f"({match['target_bpb']:.4f}) {relation} {match['ratio']:.3f}x its FLOPs")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Running the codebases

def git_commit(repo):
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class Runner:
    """Starts the training and measuring processes of both codebases and keeps track of the live ones."""

    def __init__(self, workdir, settings):
        self.workdir = workdir
        self.settings = settings
        self.live = set()
        self.lock = threading.Lock()
        os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)

    def base_dir(self, codebase):
        return os.path.join(self.workdir, codebase)

    def repo(self, codebase):
        return REPO_ROOT if codebase == "ours" else self.settings["orig_repo"]

    def env(self, codebase):
        env = {**os.environ, "NANOCHAT_BASE_DIR": self.base_dir(codebase), "NANOCHAT_DTYPE": self.settings["dtype"],
               "OMP_NUM_THREADS": str(self.settings["threads"]), "PYTHONUNBUFFERED": "1"}
        # its `nanochat` first on the path (the measuring worker runs as a file, outside the repo)
        paths = [self.repo(codebase)]
        if codebase == "orig":
            paths += [self.settings["orig_pythonpath"]] if self.settings["orig_pythonpath"] else []
            env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into its checkout
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def run(self, command, codebase, log_path):
        """Run command in the codebase's repo; (exit status, wall s, CPU s of the process and its children)."""
        t0 = time.time()
        with open(log_path, "a", encoding="utf-8") as log_file:
            log_file.write(f"\n$ {shlex.join(command)}\n")
            log_file.flush()
            process = subprocess.Popen(command, cwd=self.repo(codebase), env=self.env(codebase), stdout=log_file,
                                       stderr=subprocess.STDOUT)
            with self.lock:
                self.live.add(process)
            try:
                _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, not the other jobs'
                process.returncode = os.waitstatus_to_exitcode(status)
            finally:
                with self.lock:
                    self.live.discard(process)
        return process.returncode, time.time() - t0, usage.ru_utime + usage.ru_stime

    def stop_all(self):
        with self.lock:
            for process in self.live:
                process.terminate()

    def train_command(self, config, model_tag, steps, seed, probe=False):
        s = self.settings
        if config.codebase == "ours":
            command = [sys.executable, "-m", "scripts.base_train", f"--depth={s['depth']}",
                       f"--max_seq_len={s['max_seq_len']}", f"--device_batch_size={s['device_batch_size']}",
                       f"--total_batch_size={s['total_batch_size']}", f"--num_iterations={steps}",
                       f"--model_tag={model_tag}", f"--seed={seed}", "--eval_every=-1",
                       f"--eval_tokens={s['own_eval_tokens']}", "--core_metric_every=-1", "--sample_every=-1",
                       "--save_every=-1", "--compile=true", *config.args]
            return command + (["--compile=false", f"--eval_tokens={s['device_batch_size'] * s['max_seq_len']}"]
                              if probe else [])
        # the original: its own defaults but for the sizes, the horizon and what it evaluates along the way
        command = [sys.executable, "-c", ORIG_LAUNCHER, str(seed), f"--depth={s['depth']}",
                   f"--max-seq-len={s['max_seq_len']}", f"--device-batch-size={s['device_batch_size']}",
                   f"--total-batch-size={s['total_batch_size']}", f"--num-iterations={steps}",
                   f"--model-tag={model_tag}", f"--eval-every={-1 if probe else steps}",
                   f"--eval-tokens={s['own_eval_tokens']}", "--core-metric-every=-1", "--sample-every=-1",
                   *config.args]
        return command

    def measure(self, codebase, model_tag, step, log_path, eval_size):
        from nanochat.dataset import VAL_FILENAME  # the pinned validation shard, installed from data/embedded
        job = {"checkpoint_dir": os.path.join(self.base_dir(codebase), "base_checkpoints", model_tag), "step": step,
               "seq_len": self.settings["max_seq_len"], "batch_size": self.settings["device_batch_size"],
               "eval_bytes": eval_size, "val_file": os.path.join(self.base_dir("ours"), "base_data", VAL_FILENAME),
               "loss_eval_path": os.path.join(REPO_ROOT, "nanochat", "loss_eval.py")}
        out_path = log_path + ".measure.json"
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job), out_path]
        status, wall_s, _ = self.run(command, codebase, log_path)
        if status != 0:
            raise RuntimeError(f"measuring {job['checkpoint_dir']} step {step} failed (exit {status}): see {log_path}")
        with open(out_path, encoding="utf-8") as f:
            result = json.load(f)
        os.remove(out_path)
        return result

    def remove_checkpoints(self, codebase, model_tag):
        import shutil
        shutil.rmtree(os.path.join(self.base_dir(codebase), "base_checkpoints", model_tag), ignore_errors=True)


def own_val_bpb(log_path, codebase):
    """The last val bpb that the codebase's own training loop printed, or None."""
    pattern = r"^step \d+ \| val bpb ([\d.]+)" if codebase == "ours" else r"^Step \d+ \| Validation bpb: ([\d.]+)"
    with open(log_path, encoding="utf-8", errors="replace") as f:
        found = re.findall(pattern, f.read(), re.M)
    return float(found[-1]) if found else None


def tail(path, lines=25):
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def prepare_workspace(runner, codebases):
    """Data and a vocab_size tokenizer in each codebase's base dir, trained by its own tok_train on the same text."""
    from nanochat.dataset import install_embedded  # ours: the main process runs in our context

    ours_data = os.path.join(runner.base_dir("ours"), "base_data")
    if not os.path.exists(os.path.join(ours_data, "EMBEDDED.txt")):
        with contextlib.redirect_stdout(sys.stderr):
            install_embedded(ours_data)
    for codebase in codebases:
        tokenizer_dir = os.path.join(runner.base_dir(codebase), "tokenizer")
        if codebase == "orig":  # its data dir is base_data_climbmix; its last shard (sorted) is its validation split
            orig_data = os.path.join(runner.base_dir("orig"), "base_data_climbmix")
            os.makedirs(orig_data, exist_ok=True)
            for name in sorted(os.listdir(ours_data)):
                if name.endswith(".parquet") and not os.path.exists(os.path.join(orig_data, name)):
                    os.symlink(os.path.join(ours_data, name), os.path.join(orig_data, name))
        token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
        if os.path.exists(token_bytes_path) and len(torch.load(token_bytes_path)) == runner.settings["vocab_size"]:
            continue
        flag = "--vocab_size" if codebase == "ours" else "--vocab-size"
        command = [sys.executable, "-m", "scripts.tok_train", f"{flag}={runner.settings['vocab_size']}"]
        log_path = os.path.join(runner.workdir, "logs", f"tok_train_{codebase}.log")
        log(f"training the {codebase} tokenizer ({runner.settings['vocab_size']:,} tokens): {log_path}")
        status, _, _ = runner.run(command, codebase, log_path)
        if status != 0:
            raise RuntimeError(f"{codebase} tok_train failed (exit {status}):\n{tail(log_path)}")


# -----------------------------------------------------------------------------
# The recipe: configurations -> probes (FLOPs per token) -> runs, round-robin -> table

if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # in a codebase's context: python quality.py --worker JOB OUT_PATH
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        measured = worker_measure(json.loads(sys.argv[2]))
        with open(sys.argv[3], "w", encoding="utf-8") as f:
            json.dump(measured, f)
        sys.exit(0)

    from nanochat.common import cpu_name, get_base_dir
    from nanochat.configurator import configure

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        settings = configure(globals())
    config_list = parse_configs(configs, fractions)
    baseline = baseline or config_list[0].name
    workdir = os.path.abspath(workdir or os.path.join(get_base_dir(), "quality"))
    results = os.path.abspath(results or os.path.join(workdir, "results.json"))
    os.makedirs(workdir, exist_ok=True)
    settings.update(workdir=workdir, results=results, orig_repo=os.path.abspath(orig_repo) if orig_repo else "")
    sizes = {"depth": depth, "max_seq_len": max_seq_len, "device_batch_size": device_batch_size,
             "total_batch_size": total_batch_size, "vocab_size": vocab_size, "dtype": dtype}
    budget = budget_flops if budget_flops > 0 else budget_steps * total_batch_size * \
        seed_flops_per_token(depth, max_seq_len, vocab_size)
    names = [config.name for config in config_list]

    def write_table():
        recorded = [run for run in load_results(results)["runs"] if run["name"] in names]
        rows, matches = summarize(recorded, baseline)
        table = markdown_table(rows, matches, baseline)
        with open(os.path.splitext(results)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(table)
        return rows, matches, table

    if not report_only:
        if any(config.codebase == "orig" for config in config_list):
            if not orig_repo or not os.path.isfile(os.path.join(orig_repo, "scripts", "base_train.py")):
                raise SystemExit(f"error: --orig_repo={orig_repo!r} is not a checkout of the original nanochat "
                                 f"(no scripts/base_train.py); clone https://github.com/karpathy/nanochat and pass its "
                                 f"path, with --orig_pythonpath=DIR after `uv pip install --target DIR rustbpe`")
        runner = Runner(workdir, settings)
        prepare_workspace(runner, sorted({config.codebase for config in config_list}))
        commits = {codebase: git_commit(runner.repo(codebase)) for codebase in {c.codebase for c in config_list}}
        log(f"budget {budget:.4e} FLOPs; configurations {', '.join(names)}; results {results}")

        def probe(config):
            """FLOPs per token of the model the configuration trains: a 1-step run, loaded and counted (again for
            every commit of its codebase: a changed default may change the model)."""
            key = probe_key(config, {**sizes, "commit": commits[config.codebase]})
            model_tag = f"probe_{config.name}_d{depth}"
            log_path = os.path.join(workdir, "logs", f"{model_tag}.log")
            with claim(log_path, wait=True):  # another harness probing it: wait, then take its record
                found = next((p for p in load_results(results)["probes"] if p["key"] == key), None)
                if found:
                    return found
                log(f"probe {config.name}: {log_path}")
                runner.remove_checkpoints(config.codebase, model_tag)
                command = runner.train_command(config, model_tag, 1, 0, probe=True)
                status, _, _ = runner.run(command, config.codebase, log_path)
                if status != 0:
                    raise RuntimeError(f"the probe run of {config.name} failed (exit {status}):\n{tail(log_path)}")
                measured = runner.measure(config.codebase, model_tag, 1, log_path, 0)
                runner.remove_checkpoints(config.codebase, model_tag)
                record = {"key": key, "name": config.name, "codebase": config.codebase, "args": list(config.args),
                          **sizes, **measured}
                add_result(results, "probes", record)
                return record

        def train_and_score(config, fraction, seed, flops_per_token):
            key = run_key(config, sizes, budget, fraction, seed, eval_bytes)
            model_tag = f"q_{config.name}_d{depth}_f{fraction:g}_s{seed}"
            log_path = os.path.join(workdir, "logs", f"{model_tag}.log")
            with claim(log_path) as ours:
                if not ours:
                    log(f"skip {config.name} x{fraction:g} seed {seed}: another harness has it in flight")
                    return
                if any(run["key"] == key for run in load_results(results)["runs"]):
                    return  # another harness finished it since this one made its plan
                if os.path.exists(log_path):
                    os.remove(log_path)
                runner.remove_checkpoints(config.codebase, model_tag)  # a run stopped half-way starts afresh
                train_claimed_run(config, fraction, seed, flops_per_token, key, model_tag, log_path)

        def train_claimed_run(config, fraction, seed, flops_per_token, key, model_tag, log_path):
            steps = steps_for_budget(budget, fraction, flops_per_token, total_batch_size)
            log(f"start {config.name} x{fraction:g} seed {seed}: {steps} steps | {log_path}")
            command = runner.train_command(config, model_tag, steps, seed)
            status, wall_s, cpu_s = runner.run(command, config.codebase, log_path)
            if status != 0:
                raise RuntimeError(f"training {model_tag} failed (exit {status}):\n{tail(log_path)}")
            measured = runner.measure(config.codebase, model_tag, steps, log_path, eval_bytes)
            if measured["flops_per_token"] != flops_per_token:
                raise RuntimeError(f"{model_tag}: the trained model counts {measured['flops_per_token']:,} FLOPs per "
                                   f"token, its probe {flops_per_token:,}")
            if not keep_checkpoints:
                runner.remove_checkpoints(config.codebase, model_tag)
            record = {"key": key, "name": config.name, "codebase": config.codebase, "args": list(config.args), **sizes,
                      "seed": seed, "fraction": fraction, "budget_flops": budget, "steps": steps,
                      "tokens": steps * total_batch_size,
                      "flops": steps * total_batch_size * flops_per_token, **measured,
                      "own_val_bpb": own_val_bpb(log_path, config.codebase), "train_wall_s": round(wall_s, 1),
                      "train_cpu_s": round(cpu_s, 1), "threads": threads, "cpu": cpu_name(),
                      "commit": commits[config.codebase], "command": shlex.join(command),
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            add_result(results, "runs", record)
            log(f"done {config.name} x{fraction:g} seed {seed}: val bpb {measured['val_bpb']:.4f} "
                f"(own {record['own_val_bpb']}) | {wall_s / 60:.1f} min wall, {cpu_s / 60:.1f} min CPU")
            write_table()

        executor = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
        try:
            probes = dict(zip(names, executor.map(probe, config_list)))
            recorded = {run["key"]: run for run in load_results(results)["runs"]}
            for config in config_list:  # recorded runs count by settings: say so when the code has changed since
                stale = sorted({run["commit"] for run in recorded.values() if run["name"] == config.name
                                and run["commit"] != commits[config.codebase]})
                if stale:
                    log(f"warning: {config.name} has runs recorded at commit(s) {', '.join(map(str, stale))}, this "
                        f"{config.codebase} checkout is at {commits[config.codebase]}; they are reused as they are "
                        f"(if a default changed since, use another --results file or configuration name)")
            plan = [(config, fraction, seed) for seed in range(seeds)
                    for fraction in sorted({f for c in config_list for f in c.fractions}, reverse=True)
                    for config in config_list if fraction in config.fractions
                    and run_key(config, sizes, budget, fraction, seed, eval_bytes) not in recorded]
            log(f"{len(plan)} runs to go, {jobs} at a time")
            futures = {executor.submit(train_and_score, config, fraction, seed, probes[config.name]["flops_per_token"]):
                       (config.name, fraction, seed) for config, fraction, seed in plan}
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:  # record it and go on with the others
                    name, fraction, seed = futures[future]
                    log(f"FAILED {name} x{fraction:g} seed {seed}: {future.exception()}")
                    add_result(results, "failures", {"name": name, "fraction": fraction, "seed": seed, **sizes,
                                                     "error": str(future.exception())[-2000:],
                                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        except KeyboardInterrupt:
            log("interrupted: stopping the runs in flight (what finished is in the results file)")
            runner.stop_all()
            executor.shutdown(wait=False, cancel_futures=True)
            raise SystemExit(130)
        executor.shutdown()

    rows, matches, table = write_table()
    print(table, file=sys.stderr)
    print(json.dumps({"results": results, "table": os.path.splitext(results)[0] + ".md", "baseline": baseline,
                      "rows": rows, "flops_to_match": matches}))
