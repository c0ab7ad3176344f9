"""The benchmarks (their figures are in dev/BENCHMARKS.md). Each is a script that prints one JSON object on stdout
and its progress on stderr, with log()."""

import sys


def log(message):
    print(message, file=sys.stderr, flush=True)
