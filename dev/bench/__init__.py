"""The benchmarks (their figures are in dev/BENCHMARKS.md). Each is a script that prints one JSON object on stdout
and everything else on stderr: its settings through settings(), its progress through log()."""

import contextlib
import os
import sys

from nanochat.configurator import configure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def settings(script_globals):
    """configure(script_globals), as the scripts call it, with its output on stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        return configure(script_globals)


def log(message):
    print(message, file=sys.stderr, flush=True)
