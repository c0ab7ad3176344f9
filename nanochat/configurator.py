"""
`--name=value` overrides for a script's settings: the plain module-level variables at its top.

A script calls `user_config = configure(globals())` after its settings block. Every public int, float,
bool or str global defined by then is a setting, except ALL_CAPS constants (paths, URLs, code the script
builds, never meant to be overridden); each `--name=value` on the command line replaces one.
Values are Python literals type-checked against the default (an int may stand for a float); str settings
take the text as written. Unknown names fail with the valid ones and a close match, `--help` prints the
script's docstring and every setting. Not a config framework: no files, no nesting, no exec.
"""

import ast
import difflib
import sys

from nanochat.common import UserError

SETTING_TYPES = (bool, int, float, str)


class ConfigError(UserError):
    """A command-line setting that does not parse or does not exist (printed as `error: ...`, exit status 2)."""


def parse_overrides(settings, args):
    """Return {name: value} for the `--name=value` args, checked against the default settings."""
    overrides = {}
    for arg in args:
        if arg == "--":  # torchrun passes the separator through
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot parse argument {arg!r}: expected --name=value (see --help)")
        name, text = arg[2:].split("=", 1)
        if name not in settings:
            close = difflib.get_close_matches(name, settings, n=1)
            hint = f" Did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown setting --{name}.{hint} Valid settings: {', '.join(sorted(settings))}")
        default = settings[name]
        if isinstance(default, str):
            overrides[name] = text
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{name}={text}: not a Python literal; expected a {type(default).__name__} like {default!r}") from None
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"--{name}={text}: expected a {type(default).__name__} like {default!r}, got {type(value).__name__}")
        overrides[name] = value
    return overrides


def format_help(doc, settings):
    lines = [(doc or "").strip(), "", "Settings (override with --name=value):"]
    width = max((len(name) for name in settings), default=0)
    lines += [f"  --{name:<{width}} = {value!r}" for name, value in settings.items()]
    return "\n".join(lines)


def configure(script_globals, argv=None):
    """Apply command-line overrides to a script's settings in place; return all settings as a dict."""
    argv = sys.argv[1:] if argv is None else argv
    settings = {name: value for name, value in script_globals.items()
                if not name.startswith("_") and not name.isupper() and type(value) in SETTING_TYPES}
    if "--help" in argv or "-h" in argv:
        print(format_help(script_globals.get("__doc__"), settings))
        sys.exit(0)
    try:
        overrides = parse_overrides(settings, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, value in overrides.items():
        print(f"Overriding: {name} = {value!r}")
    script_globals.update(overrides)
    settings.update(overrides)
    return settings


def check_positive(settings, *names):
    """A UserError naming the first of these settings whose value is not positive (sizes, counts, batch sizes)."""
    for name in names:
        if settings[name] <= 0:
            raise UserError(f"--{name}={settings[name]}: must be positive")
