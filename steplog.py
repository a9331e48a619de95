"""Each training step's log line, written without making the GPU wait for the host.

On a GPU, a step's Python returns once its work is queued, long before the GPU has done it. Reading
its loss then (.item()) would stall the host until the GPU is idle, and the next step could not be
queued meanwhile. So a step's numbers are copied to the host as the GPU reaches them (step_record),
and its line is written (log_step) once the next step is queued, waiting for that one step alone:
the GPU always has work. On a CPU, where a step is done when it returns, the line is written at
once. A NaN or inf is caught here, a step late on a GPU, and stops the run (stopping.NonFinite)
before those weights are saved.
"""
import contextlib
import json
import math
import time

import torch

from cli import progress
from stopping import NonFinite


def step_record(step: int, lr: float, loss: torch.Tensor, inner: torch.Tensor,
                grad_norm: torch.Tensor, tokens: int) -> dict:
    """What a step's log line needs. On a GPU the loss values are copied to (pinned) host memory as
    the GPU reaches them, and an event marks the end of the step: reading them later waits for this
    step alone, where .item() would wait for everything queued since."""
    record = {"step": step, "lr": lr, "tokens": tokens, "loss": loss.to("cpu", non_blocking=True),
              "inner": inner.to("cpu", non_blocking=True),
              "grad_norm": grad_norm.to("cpu", non_blocking=True), "done": None}
    if loss.is_cuda:
        record["done"] = torch.cuda.Event()
        record["done"].record()
    return record


def log_step(total: int, log, step: dict, since: float) -> float:
    """The fixed-format line of a step (step_record), printed once its work is done; returns when
    that was. ms counts from `since`, when the step before it was done: the time per step of steps
    run back to back. Raises NonFinite after the line of a step whose loss or gradient norm is NaN
    or inf: checked here, from the host copies, a step late on a GPU, so that no step waits for the
    GPU to check its own."""
    if step["done"] is not None:
        step["done"].synchronize()  # this step only: a step queued after it keeps running
    now = time.perf_counter()
    dt = now - since
    # host copies, complete
    loss, il, norm = step["loss"].item(), step["inner"].tolist(), step["grad_norm"].item()
    inner, moved = il[:-1], il[-1:]                                 # (accumulate's record)
    inner_txt = f" | inner {inner[0]:.3f}->{inner[-1]:.3f} (moved {moved[0]:.3g})" if il else ""
    print(f"{progress(step['step'] + 1, total)} | loss {loss:.4f}{inner_txt} "
          f"| lr {step['lr']:.2e} | "
          f"{step['tokens'] / dt:,.0f} tok/s | {dt * 1000:.0f} ms", flush=True)
    record = {"step": step["step"], "loss": loss, "inner": inner, "moved": moved[0] if il else None,
              "grad_norm": norm, "lr": step["lr"], "tok_s": step["tokens"] / dt, "ms": dt * 1000}
    log.write(json.dumps(record) + "\n")
    log.flush()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFinite(f"step {step['step']} has loss {loss:.4g} and gradient norm {norm:.4g}")
    return now


class StepLog:
    """The lines of a run's steps in order, each written once its step is done (see the module's
    docstring). `since`: when the step before the next line's ended, so that a line's ms is its
    step's time."""

    def __init__(self, log, total: int):
        self.log, self.total, self.pending, self.since = log, total, None, time.perf_counter()

    def queued(self, record: dict):
        """A step was queued: write the line of the step before it, and this one's too where it is
        done."""
        previous, self.pending = self.pending, record
        if previous:
            self.since = log_step(self.total, self.log, previous, self.since)
        if record["done"] is None:  # a CPU step is over when it returns: nothing to overlap
            self.pending = None
            self.since = log_step(self.total, self.log, record, self.since)

    def drain(self):
        """Write the line still pending (before an evaluation, a checkpoint, the end)."""
        if self.pending:
            previous, self.pending = self.pending, None  # (cleared first: no line is written twice)
            self.since = log_step(self.total, self.log, previous, self.since)

    def pause(self):
        """The loop paused (an evaluation, a checkpoint): the next step's time starts now."""
        self.since = time.perf_counter()

    def failed(self):
        """A step failed (or ^C): the one before it keeps its line, unless the GPU itself failed and
        it has none; its ms then runs to the failure."""
        if self.pending:
            with contextlib.suppress(Exception):
                log_step(self.total, self.log, self.pending, self.since)
