"""
The report card of a run: every stage logs a markdown section into <base>/report/, and `generate` puts them
together into report.md with a summary table (metrics x stages), the time per stage, the total wall clock, a
cost estimate, and a plot of each training curve after its section.

    python -m nanochat.report reset      # start of a run: clear old sections, write the header (git, hardware, code size)
    python -m nanochat.report generate   # end of a run: <base>/report/report.md

In code: `get_report().log(section="Base model training", data=[user_config, {"val_bpb": 0.81}])`; only rank 0
writes, every file atomically. Not a metrics database: sections are plain markdown, and the summary table reads
`- key: value` lines back out of them.
"""

import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys

import torch

from nanochat.common import cpu_name, format_duration, get_base_dir, get_dist_info, write_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The sections of a full run, in pipeline order (generate lists them in this order, any others after them).
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                 "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft",
                 "Chat RL", "Chat evaluation rl"]
# The summary table: metric rows x stage columns, each column read from that stage's evaluation section.
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "SimpleSpelling",
                   "ChatCORE"]
SUMMARY_COLUMNS = {"BASE": "Base model evaluation", "MID": "Chat evaluation mid", "SFT": "Chat evaluation sft",
                   "RL": "Chat evaluation rl"}
# The training curves (report.log_curve name) plotted after a section, and the plot's title
CURVES = {"Base model training": ("base_train", "Base model training"), "Midtraining": ("mid_train", "Midtraining"),
          "Chat SFT": ("chat_sft", "SFT"), "Chat RL": ("chat_rl", "RL")}
# Panels a curve may have: (x key, y key, y label); a panel is drawn when the curve holds both keys with data
CURVE_PANELS = [("step", "loss", "train loss (nats/token)"), ("val_step", "val_bpb", "validation bits per byte"),
                ("val_step", "val_loss", "validation loss (nats/token)"), ("step", "reward", "mean reward"),
                ("eval_step", "pass@1", "pass@1 (eval)")]
# Rough on-demand cloud prices per GPU-hour (USD), matched by substring of the GPU name; others get the default.
GPU_HOURLY_COST = [("H200", 3.50), ("H100", 3.00), ("A100", 1.79), ("V100", 0.55)]
DEFAULT_GPU_HOURLY_COST = 2.00
CODE_EXTENSIONS = (".py", ".rs", ".sh", ".md", ".html", ".toml")
# chat_eval marks an accuracy within two standard errors of its baseline; the summary explains the mark
NEAR_BASELINE_MARK = "*"
NEAR_BASELINE_LEGEND = (f"{NEAR_BASELINE_MARK} within two standard errors of its baseline (base: the score of "
                        f"answering without reading the question): no evidence that the model learned the task")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def _write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


# -----------------------------------------------------------------------------
# What the header records about the run's environment


def _git(*args):
    try:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_info():
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return ["- Not a git checkout"]
    dirty = bool(_git("status", "--porcelain"))
    return [f"- Branch: {_git('rev-parse', '--abbrev-ref', 'HEAD')}",
            f"- Commit: {commit}{' (dirty)' if dirty else ' (clean)'}",
            f"- Message: {_git('log', '-1', '--format=%s') or ''}"]


def gpu_hourly_cost():
    """(USD per hour for all visible GPUs, description), or (None, None) without GPUs."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None, None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    per_gpu = next((cost for key, cost in GPU_HOURLY_COST if key in names[0]), DEFAULT_GPU_HOURLY_COST)
    return per_gpu * len(names), f"{len(names)} x {names[0]} at ${per_gpu:.2f}/h"


def hardware_info():
    import psutil

    lines = [f"- Platform: {platform.system()} {platform.release()} ({socket.gethostname()})",
             f"- CPU: {cpu_name()} ({psutil.cpu_count(logical=False)} physical cores, {psutil.cpu_count(logical=True)} logical)",
             f"- Memory: {psutil.virtual_memory().total / 2**30:.1f} GiB"]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPUs: {torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.1f} GiB each), "
                     f"CUDA {torch.version.cuda}")
        rate, description = gpu_hourly_cost()
        lines.append(f"- Hourly cost estimate: ${rate:.2f}/h ({description})")
    else:
        lines.append("- GPUs: none")
    return lines


def code_files():
    """The repo's source and docs: git-tracked files when this is a checkout, else a walk of the tree."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard")
    if listed is not None:
        paths = listed.splitlines()
    else:
        skip = {".git", ".venv", "target", "__pycache__", "node_modules"}
        paths = []
        for root, dirs, files in os.walk(REPO_ROOT):
            dirs[:] = [d for d in dirs if d not in skip]
            paths += [os.path.relpath(os.path.join(root, name), REPO_ROOT) for name in files]
    return sorted(p for p in paths if p.endswith(CODE_EXTENSIONS) and os.path.isfile(os.path.join(REPO_ROOT, p)))


def bloat_info():
    """Code size: what it costs to read this codebase (and to hand it to an LLM: ~4 characters a token)."""
    chars = lines = 0
    files = code_files()
    for path in files:
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        chars += len(text)
        lines += text.count("\n")
    lock_path = os.path.join(REPO_ROOT, "uv.lock")
    lock_lines = 0
    if os.path.exists(lock_path):
        with open(lock_path, encoding="utf-8") as f:
            lock_lines = sum(1 for _ in f)
    return [f"- Characters: {chars:,}", f"- Lines: {lines:,}", f"- Files: {len(files):,}",
            f"- Tokens (approx.): {chars // 4:,}", f"- Dependencies (uv.lock lines): {lock_lines:,}"]


# -----------------------------------------------------------------------------
# The report


class Report:
    def __init__(self, report_dir=None):
        self.report_dir = report_dir or os.path.join(get_base_dir(), "report")
        os.makedirs(self.report_dir, exist_ok=True)

    def _path(self, name):
        return os.path.join(self.report_dir, name)

    def log(self, section, data):
        """Write section `section`: data is a list of dicts (one `- key: value` line per item) and strings
        (one line each, verbatim). Logging the same section again replaces it."""
        lines = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
            else:
                lines.append(str(item))
        path = self._path(f"{slugify(section)}.md")
        _write_text(path, "\n".join(lines) + "\n\n")
        return path

    def log_curve(self, name, curve):
        """Save training-curve data (a dict of equally long lists, "step" among them) as <name>_curve.json."""
        _write_text(self._path(f"{name}_curve.json"), json.dumps(curve) + "\n")

    def read_curve(self, name):
        path = self._path(f"{name}_curve.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def reset(self):
        """Start a new run: delete every section, curve and report of the previous one, write a fresh header."""
        for name in os.listdir(self.report_dir):
            if name.endswith(".md") or name.endswith("_curve.json") or name.endswith("_curve.png"):
                os.remove(self._path(name))
        header = ["# nanochat training report", "", "## Environment", "",
                  "### Git", *git_info(), "", "### Hardware", *hardware_info(), "",
                  "### Software", f"- Python: {platform.python_version()}", f"- PyTorch: {torch.__version__}", "",
                  "### Bloat", *bloat_info(), "", f"Run started: {_now()}", ""]
        _write_text(self._path("header.md"), "\n".join(header) + "\n")
        print(f"Reset the report in {self.report_dir}")

    def generate(self):
        """Write report.md: header, the sections in pipeline order, the curve plot, the summary. Returns its path."""
        header_path = self._path("header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            print(f"warning: no header in {self.report_dir}; run `python -m nanochat.report reset` at the start of a run")
            header = "# nanochat training report\n\n"
        slugs = [slugify(section) for section in SECTION_ORDER]
        extra = sorted(name[:-3] for name in os.listdir(self.report_dir)
                       if name.endswith(".md") and name[:-3] not in slugs and name not in ("header.md", "report.md"))
        sections = {}
        for slug in slugs + extra:
            path = self._path(f"{slug}.md")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    sections[slug] = f.read()
        missing = [section for section in SECTION_ORDER if slugify(section) not in sections]
        if missing:
            print(f"Sections not in this report (stage not run): {', '.join(missing)}")

        plots = {slugify(section): curve for section, curve in CURVES.items()}
        parts = [header.rstrip() + "\n"]
        for slug, text in sections.items():
            parts.append(text.rstrip() + "\n")
            if slug in plots and self.plot_curve(*plots[slug]):
                name, title = plots[slug]
                parts.append(f"![{title.lower()} curve]({name}_curve.png)\n")
        parts.append(self.summary(sections, header))
        report_path = self._path("report.md")
        _write_text(report_path, "\n".join(parts))
        print(f"Wrote {report_path}")
        return report_path

    def summary(self, sections, header):
        lines = ["## Summary", ""]
        bloat = re.search(r"### Bloat\n(.*?)\n\n", header, re.S)
        if bloat:
            lines += [bloat.group(1), ""]
        lines += summary_table(sections) + [""]
        base_loss = sections.get(slugify("Base model loss"), "")
        val_bpb, unigram_bpb = read_metric(base_loss, "val bpb"), read_metric(base_loss, "unigram bpb")
        if val_bpb and unigram_bpb:  # did pretraining learn more than token frequencies?
            lines += [f"Base model val bpb: {val_bpb} (unigram baseline: {unigram_bpb})", ""]
        # Wall clock: from "Run started" in the header to the last section written (so regenerating later does
        # not stretch it); each stage's time is the gap between its section's timestamp and the one before it.
        stamps = [(slug, _section_time(text)) for slug, text in sections.items()]
        stamps = sorted(((t, slug) for slug, t in stamps if t is not None))
        started = re.search(r"^Run started: (.+)$", header, re.M)
        if started and stamps:
            previous = start = datetime.datetime.strptime(started.group(1).strip(), TIME_FORMAT)
            lines += ["| Stage (section) | Finished | Took |", "|---|---|---|"]
            for when, slug in stamps:
                lines.append(f"| {slug} | {when.strftime('%H:%M:%S')} | {format_duration((when - previous).total_seconds())} |")
                previous = when
            elapsed = (stamps[-1][0] - start).total_seconds()
            lines += ["", f"Total wall clock time: {format_duration(elapsed)}"]
            rate = re.search(r"Hourly cost estimate: \$([0-9.]+)/h \(([^)]*)\)", header)
            if rate:
                cost = float(rate.group(1)) * elapsed / 3600
                lines.append(f"Estimated cost: ${cost:,.2f} ({rate.group(2)}, for {format_duration(elapsed)})")
            else:
                lines.append("Estimated cost: - (no GPUs in this run)")
        return "\n".join(lines) + "\n"

    def plot_curve(self, name, title=None):
        """<name>_curve.png from <name>_curve.json: one panel per series it holds (train loss, validation bpb or
        loss, RL reward, pass@1) against step. False when there is no curve or nothing to draw."""
        curve = self.read_curve(name)
        if not curve:
            return False
        panels = [(x, y, label) for x, y, label in CURVE_PANELS
                  if curve.get(x) and curve.get(y) and len(curve[x]) == len(curve[y])]
        if not panels:
            return False
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (x, y, label) in zip(axes[0], panels):
            points = len(curve[x])
            ax.plot(curve[x], curve[y], linewidth=1, marker="o" if points <= 50 else None, markersize=3)
            ax.set(xlabel="step", ylabel=label, title=f"{title or name}: {label.split(' (')[0]}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        write_atomic(self._path(f"{name}_curve.png"), lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        return True


def _section_time(text):
    found = re.search(r"^timestamp: (.+)$", text, re.M)  # written by log() in TIME_FORMAT
    return datetime.datetime.strptime(found.group(1).strip(), TIME_FORMAT) if found else None


def core_cell(section_text):
    """(value, "over N of 22 tasks" or None) of the base evaluation's CORE, which base_eval writes as
    `- CORE: 0.1234 (over 19 of 22 tasks)` when only some of the tasks ran."""
    value = read_metric(section_text, "CORE")
    if value is None:
        return None, None
    counted = re.search(r"over \d+ of \d+ tasks", value)
    return value.split()[0], counted.group(0) if counted else None


def summary_table(sections):
    """The metrics x stages table as markdown lines; "-" where a stage did not measure a metric. CORE's row says
    "over N of 22 tasks" when the evaluation had only some of the tasks: such a CORE is not the published one. A
    chat task's cell is chat_eval's whole line, "80.1 ± 2.5 (n=256, base 59.0)"; the legend of its near-baseline
    mark follows the table when a cell has it."""
    columns = list(SUMMARY_COLUMNS)
    rows = []
    for metric in SUMMARY_METRICS:
        label, cells = metric, []
        for column in columns:
            text = sections.get(slugify(SUMMARY_COLUMNS[column]), "")
            if metric == "CORE":
                value, partial = core_cell(text)
                label = f"CORE ({partial})" if partial else label
            else:
                value = read_metric(text, metric)
            cells.append(value or "-")
        rows.append([label] + cells)
    widths = [max(len(row[i]) for row in rows + [["Metric"] + columns]) for i in range(len(columns) + 1)]
    table = [["Metric"] + columns, ["-" * w for w in widths]] + rows
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in table]
    if any(cell.endswith(NEAR_BASELINE_MARK) for row in rows for cell in row[1:]):
        lines += ["", NEAR_BASELINE_LEGEND]
    return lines


def read_metric(section_text, metric):
    """The value of a `- <metric>: value` line in a section (case-insensitive key), or None."""
    match = re.search(rf"^- {re.escape(metric)}: *(.+?) *$", section_text, re.M | re.I)
    return match.group(1) if match else None


class DummyReport:
    """What ranks other than 0 get: every method (log, log_curve, read_curve, ...) does nothing and returns None."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def get_report():
    """The Report on rank 0, a DummyReport elsewhere, so every rank can call it unconditionally."""
    _, rank, _, _ = get_dist_info()
    return Report() if rank == 0 else DummyReport()


if __name__ == "__main__":
    commands = {"generate": lambda: get_report().generate(), "reset": lambda: get_report().reset()}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python -m nanochat.report generate|reset", file=sys.stderr)
        sys.exit(2)
    commands[sys.argv[1]]()
