"""Running the study's train.py commands: each in a process of its own, up to N side by side on
one GPU or spread over several, skipped when an earlier study finished it and resumed from its
checkpoint when one was cut off, and all stopped together (SIGINT or SIGTERM to the study, or one
run failing) at a step boundary.

study.py says what to run; this file only runs it. Ideas to hold: a run is a subprocess, not a
thread of the study's own process, so that a GPU error in one cannot take the others down, and its
output goes to OUT.out beside its folder.
"""
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import checkpoint
from study_report import log_records

ROOT = Path(__file__).resolve().parent


class Stopped(Exception):
    """SIGINT or SIGTERM reached the study: train.py runs in flight stop at a step boundary with a
    checkpoint."""


STOP = threading.Event()                  # set by the first SIGINT / SIGTERM: no new run starts
RUNNING: set[subprocess.Popen] = set()    # train.py runs in flight, each in a session of its own


def on_signal(signum, frame):
    """Each run in flight gets one SIGINT (a second one stops them at once). The runs live in
    sessions of their own, so that a terminal's ^C reaches them only through here, once; with none
    in flight (evaluation, the report), the study stops where it is: what it has written is whole
    (write_json)."""
    STOP.set()
    for child in list(RUNNING):
        child.send_signal(signal.SIGINT)
    if not RUNNING:
        raise Stopped(signal.Signals(signum).name)


def train(name: str, out: Path, flags: list[str], clock: "Clock", gpu: str | None = None) -> dict:
    """Run one train.py command into `out`, unless an earlier study finished it (a "done" file); a
    run that was cut off after a checkpoint is resumed; `gpu`: the one GPU it sees (None: the
    machine's default). Returns its command and what it cost."""
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out)]
    if not (out / "done").exists():
        if STOP.is_set():
            raise Stopped(name)
        resume = (out / checkpoint.FILE).exists()
        clock.say(f"{name}: python train.py {' '.join(command[2:])}"
                  + (" (resuming)" if resume else "")
                  + (f" on GPU {gpu}" if gpu is not None else ""))
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out.parent / f"{out.name}.out", "a") as log:
            argv = [*command[:2], "--resume", "--out", str(out)] if resume else command
            env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
            RUNNING.add(child)
            code = child.wait()
            RUNNING.discard(child)
        # stopped at a step boundary, or before
        if STOP.is_set() and code in (130, 143, -signal.SIGINT):
            raise Stopped(name)
        if code != 0:
            # the runs beside it stop at a step boundary, with a checkpoint the command resumes
            STOP.set()
            for other in list(RUNNING):
                other.send_signal(signal.SIGINT)
            output = out.parent / f"{out.name}.out"
            memory = "OutOfMemoryError" in output.read_text(errors="replace")[-4000:]
            sys.exit(f"study.py: error: {name} failed; its output: {output}"
                     + ("; it ran out of GPU memory: fewer runs side by side (--parallel) need less"
                        if memory else ""))
        (out / "done").write_text(f"{time.perf_counter() - start:.1f}\n")   # wall seconds
    clock.finished(name)
    steps = [r for r in log_records(out) if "loss" in r]
    return {"command": " ".join(["python", "train.py", *flags, "--out", str(out)]),
            "wall_s": float((out / "done").read_text()), "steps": len(steps),
            "median_ms": median([r["ms"] for r in steps[len(steps) // 10:]])}   # past compilation


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan


def side_by_side(parallel: int, clock: "Clock", jobs: dict[str, tuple]) -> dict[str, dict]:
    """train() each job (name, out, flags), up to `parallel` at once on each GPU (gpus): while one
    run compiles on the host, the others keep its GPU busy; with several GPUs, each run sees one of
    them alone (the first runs one per GPU). Each run's data workers get a share of the CPUs."""
    devices = gpus()
    at_once = parallel * len(devices)
    if at_once > 1 and not any("--workers" in flags for _, _, flags in jobs.values()):
        share = ["--workers", str(max(1, (os.cpu_count() or 1) // at_once - 1))]
        jobs = {key: (name, out, flags + share) for key, (name, out, flags) in jobs.items()}
    free = queue.Queue()                    # a GPU per slot: every GPU once, then each again, ...
    for _ in range(parallel):
        for device in devices:
            free.put(device)

    def on_a_gpu(job: tuple) -> dict:
        device = free.get()
        try:
            return train(*job, clock, gpu=device)
        finally:
            free.put(device)
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {key: pool.submit(on_a_gpu, job) for key, job in jobs.items()}
    # every run has ended; a failure is what the study reports, not the runs it stopped
    ended = [f.exception() for f in futures.values() if f.exception() is not None]
    if ended:
        raise next((e for e in ended if isinstance(e, SystemExit)), ended[0])
    shared = min(at_once, len(jobs)) > len(devices)           # runs side by side on a GPU
    return {key: f.result() | {"shared": shared} for key, f in futures.items()}


def gpus() -> list[str | None]:
    """The GPUs the study spreads its runs over, as CUDA_VISIBLE_DEVICES names them (or by number),
    when it is given several; else [None]: every run sees the machine's default device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (visible.split(",") if visible else [str(i) for i in range(count)])[:count]


class Clock:
    """Progress lines with an estimate of the time left, from the units of work planned and done so
    far."""

    def __init__(self, planned: int):
        self.planned, self.done, self.start = planned, 0, time.perf_counter()

    def say(self, text: str):
        print(f"[study {(time.perf_counter() - self.start) / 60:5.1f} min] {text}", flush=True)

    def finished(self, name: str):
        self.done += 1
        left = (time.perf_counter() - self.start) / self.done * (self.planned - self.done)
        self.say(f"{name} done ({self.done}/{self.planned}); about {left / 60:.1f} min left")
