"""The command line every script shares (train.py, eval_babilong.py, study.py, python -m bench): one
convention for bad input, and --help that shows everything.

Two ideas to hold:
  1. Bad input, a flag or a file a flag names, is refused before any work (before a model is built
     or anything written) in one line, `prog: error: message`, naming the flag or file, with exit
     status REFUSED (2, argparse's for a bad command line), never a traceback or argparse's usage
     block (`refuse`, `Parser`).
  2. A flag's own range is checked as the command line is read (`number`, `names`), so nan, inf and
     values out of range never reach the code; how flags fit together is each script's check
     (config.check_args).
"""
import argparse
import errno
import math
import os
import sys
import tempfile
from typing import NoReturn

# exit status of refused input: argparse's for a bad command line, kept for bad files too
REFUSED = 2


class Refused(SystemExit):
    """Input refused before any work: exit status REFUSED. str() is the line printed, so that a
    caller (a test) can read why."""

    def __init__(self, line: str):
        super().__init__(REFUSED)
        self.line = line

    def __str__(self) -> str:
        return self.line


def refuse(prog: str, message: str) -> NoReturn:
    """End the script over bad input: one line `prog: error: message` on stderr, exit status
    REFUSED."""
    line = f"{prog}: error: {message}"
    print(line, file=sys.stderr, flush=True)
    raise Refused(line)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its example commands keep their lines), and
    "(default: X)" after each flag's help; a flag whose default is None says in its help what
    happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The command line of every script: a bad flag is one line, `prog: error: message`, exit status
    REFUSED, without argparse's usage block (--help shows it). prog is given, not taken from
    sys.argv: tests call main()."""

    def __init__(self, prog: str, description: str):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter)

    def error(self, message: str) -> NoReturn:
        refuse(self.prog, message)


def number(kind: type, low: float, high: float = math.inf, above: bool = False, note: str = ""):
    """An argparse type: a finite `kind` (int or float) in [low, high], or in (low, high] when
    `above`; anything else (nan, inf, out of range, not a number) is refused as the command line is
    read, naming the flag. `note` follows the rule in the message (e.g. what 0 means)."""
    rule = (f"{'>' if above else '>='} {low:g}" if high == math.inf else
            f"in {'(' if above else '['}{low:g}, {high:g}]")
    what = f"{'an integer' if kind is int else 'a finite number'} {rule}{note}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high) or (above and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def names(allowed):
    """An argparse type: a comma-separated list of names from `allowed` (at least one), as a
    list."""
    def parse(text: str) -> list[str]:
        items = [x for x in text.split(",") if x]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; "
                                             f"choose from {','.join(allowed)}")
        return items
    return parse


def output_problem(flag: str, path: str, folder: bool = True) -> str | None:
    """Why `path` cannot receive a script's output, or None; creates nothing. A folder (folder=True)
    may exist or not yet; a file's folder must exist. Tried, not reasoned about: os.access says yes
    to root where nothing can be created (/proc), so a temporary folder is made where the output
    would go, and removed."""
    if not path:
        return f"{flag}: an empty path"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{flag} {path}: " + ("a file, not a folder" if folder else "a folder, not a file")
    where = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    # a folder's nearest existing parent: makedirs starts there
    while folder and not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        return f"{flag} {path}: {where} is " + ("a file" if os.path.exists(where)
                                                else "not a folder that exists")
    try:
        os.rmdir(tempfile.mkdtemp(dir=where, prefix=".probe-"))
    except OSError as e:
        # (/proc says ENOENT)
        why = "nothing can be created there" if e.errno == errno.ENOENT else e.strerror
        return f"{flag} {path}: cannot write in {where} ({why})"
    return None


def progress(step: int, total: int, width: int = 20) -> str:
    """A progress bar, "[#####...............]  5/20", for a script's per-step lines."""
    done = int(width * step / total)
    return "[" + "#" * done + "." * (width - done) + f"] {step:>{len(str(total))}}/{total}"
