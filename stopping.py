"""How a training run stops early without losing work (train.py): signals, non-finite numbers, the
log on resume.

A run stops between two steps, never inside one: SIGINT (^C) or SIGTERM is noted, the step in flight
finishes, a checkpoint of the weights after it is saved, and one line says how to continue; a second
signal stops the run at once, and since checkpoints are written to a temp file and renamed
(checkpoint.replacing), the last one stays whole. A step whose loss or gradient norm is NaN or inf
stops the run before its weights can be saved. --resume cuts log.jsonl back to its checkpoint, so
that each step appears in the log once. With several data-parallel ranks (distributed.py) a signal
to any of them stops them all at the same step boundary: they agree on it there.
"""
import contextlib
import itertools
import json
import math
import os
import shlex
import signal
import threading

import checkpoint


class NonFinite(Exception):
    """A step's loss or gradient norm is NaN or inf (log_step): the run stops before saving those
    weights."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run: at a step boundary after a checkpoint, or `at_once`
    (Stop)."""
    def __init__(self, signum: int, at_once: bool):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.at_once = signum, at_once


class Stop:
    """SIGINT (^C) and SIGTERM during a run, and what the run leaves on disk: `saved`, the step its
    checkpoint holds (-1: none yet). Before the loop there is nothing to lose, and a signal stops
    the run at once. In the loop (`training`) the first one is noted (`signum`) and the loop stops
    at the next step boundary, after a checkpoint; a second one stops it at once, also
    mid-checkpoint (checkpoint.replacing keeps the last one whole). `agree`: with several ranks,
    the largest of their values (distributed.World.largest), so that a signal noted by any rank
    stops every rank at the same boundary (requested)."""
    def __init__(self, saved: int, agree=lambda value: value):
        self.saved, self.signum, self.training, self.ended = saved, None, False, False
        self.agree = agree

    def requested(self) -> int | None:
        """At a step boundary: the signal that stops the run here, or None to go on. Every rank
        asks, each with the signal it noted (0: none), and all get the same answer."""
        return self.agree(self.signum or 0) or None

    def __call__(self, signum, frame):  # the handler: Python runs it between two bytecodes
        if self.training and self.signum is None:
            self.signum = signum        # the loop reads it at the next step boundary
        elif not self.ended:
            raise self.end(signum, at_once=True)

    def end(self, signum: int, at_once: bool) -> Interrupted:
        self.ended = True               # signals that come while the run unwinds change nothing
        return Interrupted(signum, at_once)

    @contextlib.contextmanager
    def handling_signals(self):
        """This object handles SIGINT and SIGTERM inside the block; the handlers before it come back
        after."""
        # the only one that may set them
        main_thread = threading.current_thread() is threading.main_thread()
        before = ({s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
                  if main_thread else {})
        try:
            yield
        finally:
            for s, handler in before.items():
                # (None: set outside Python)
                signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def last_line(self, out: str, e: Interrupted, launcher: str = "python") -> str:
        """The one line an interrupted run ends with: what the checkpoint holds, and the command
        that continues (`launcher`: python, or torchrun with as many processes)."""
        how = f"stopped by {signal.Signals(e.signum).name}" + (" at once" if e.at_once else "")
        if self.saved < 0:
            return f"train.py: {how}, before a checkpoint was written: nothing to resume"
        return (f"train.py: {how}: {checkpoint.path(out)} holds step {self.saved}; continue with: "
                f"{launcher} train.py --resume --out {shlex.quote(out)}")


def cut_log(file: str, step: int):
    """--resume from the checkpoint of `step`: log.jsonl back as it was when that checkpoint was
    written, so that no step appears twice. A run stopped at once (a second ^C, a kill, a crash) may
    have logged steps past its checkpoint; they go, with everything after the first of them (and a
    last line cut short). Kept: every record up to `step`, where an evaluation "eval step N"
    (written just before the checkpoint of step N - 1, and not repeated by the resumed run) and a
    run's start at step N count as N - 1."""
    def reports_on(line: str) -> float:             # (inf: a line cut short)
        try:
            r = json.loads(line)
        except ValueError:
            return math.inf
        return (r["start_step"] - 1 if "start_step" in r
                else r["step"] - 1 if "eval_acc" in r else r["step"])
    if not os.path.exists(file):
        return
    with open(file) as f:
        lines = f.readlines()
    with checkpoint.replacing(file, "w") as f:
        f.writelines(itertools.takewhile(lambda line: reports_on(line) <= step, lines))
