"""Running the study's commands: its train.py runs, each in a process of its own, up to N side by
side on one GPU or spread over several, skipped when an earlier study finished it and resumed from
its checkpoint when one was cut off; and its evaluations (study_eval.py), in the background as
models become ready. All stop together (SIGINT or SIGTERM to the study, or one command failing), a
run at a step boundary.

study.py says what to run; this file only runs it. Ideas to hold: a command is a subprocess, not a
thread of the study's own process, so that a GPU error in one cannot take the others down, and its
output goes to a .out file beside what it writes. An evaluation leaves the GPU partly idle
(compilation, decoding a token at a time), so it runs beside training instead of after it; but it
needs GPU memory as a run does, so the two share --parallel's slots (Slots); only once training is
over do evaluations get more (Slots.widen). A command that runs out of GPU memory beside others is
run again with fewer beside it (Slots.run), not the study's end.
"""
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

import checkpoint
from study_report import log_records

ROOT = Path(__file__).resolve().parent


class Stopped(Exception):
    """SIGINT or SIGTERM reached the study: train.py runs in flight stop at a step boundary with a
    checkpoint."""


class OutOfMemory(Exception):
    """A command died of CUDA out-of-memory on a GPU that other commands shared: it may fit with
    fewer beside it (Slots.run)."""


OUT_OF_MEMORY = ("OutOfMemoryError", "CUDA error: out of memory")   # in a command's last output
# a train.py step's GPU time against an SFT step's, for the time left (Clock; docs/study.md, "The
# time left"): next-token loss at every position (the base) costs about twice an SFT step, whose
# loss is on the answers; a step with the inner loop about twice too (its forward and backward
# before the outer step's)
LM_STEP_COST, INNER_STEP_COST = 2.0, 2.0
STOP = threading.Event()                  # set by the first SIGINT / SIGTERM: no new run starts
RUNNING: set[subprocess.Popen] = set()    # commands in flight, each in a session of its own
STARTING = [0]                            # commands being started, not yet in RUNNING
START_LOCK = threading.Lock()
FAILURES: list[str] = []                  # the line of each command that failed (run_to_end)


def on_signal(signum, frame):
    """Each command in flight gets one SIGINT (a second one stops them at once). They live in
    sessions of their own, so that a terminal's ^C reaches them only through here, once; with none
    in flight (the report, making the test data), the study stops where it is: what it has written
    is whole (write_json). Not while a command is being started: it would be left running, unseen;
    it gets its SIGINT as it joins RUNNING (run_to_end; a signal that lands in the instant between
    its joining and that check reaches it twice, which stops it at once, from its last checkpoint
    on resuming: a race not closed here)."""
    STOP.set()
    for child in list(RUNNING):
        child.send_signal(signal.SIGINT)
    if not RUNNING and not STARTING[0]:
        raise Stopped(signal.Signals(signum).name)


def step_cost(flags: list[str]) -> float:
    """A step of the train.py command with these flags, in SFT steps' GPU time (the Clock's
    unit)."""
    def value(flag: str) -> str | None:
        return flags[flags.index(flag) + 1] if flag in flags[:-1] else None
    return (LM_STEP_COST if value("--objective") == "lm" else
            INNER_STEP_COST if value("--method") == "focusft" else 1.0)


def train(name: str, out: Path, flags: list[str], clock: "Clock", gpu: str | None = None,
          shared: bool = False, threads: int | None = None, beside: bool = False) -> dict:
    """Run one train.py command into `out`, unless an earlier study finished it (a "done" file); a
    run that was cut off after a checkpoint is resumed; `gpu`: the one GPU it sees (None: the
    machine's default); `shared`, `threads`: as run_to_end's; `beside`: other runs share its GPU
    now, so its times are shared. Returns its command and what it cost: the wall seconds of all
    its tries (one that ran out of GPU memory, one stopped and resumed; a try whose study was
    killed goes unrecorded), how many there were, and whether its last try ran beside others
    ("shared", as recorded when it finished: a later study that skips it may run at another
    --parallel)."""
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out)]
    tries, done = out / "tries", out / "done"  # (tries: the wall seconds of each, a line each)
    if not done.exists():
        if STOP.is_set():
            raise Stopped(name)
        resume = (out / checkpoint.FILE).exists()
        clock.say(f"{name}: python train.py {' '.join(command[2:])}"
                  + (" (resuming)" if resume else "")
                  + (f" on GPU {gpu}" if gpu is not None else ""))
        argv = [*command[:2], "--resume", "--out", str(out)] if resume else command
        out.mkdir(parents=True, exist_ok=True)
        run_to_end(name, argv, out.parent / f"{out.name}.out", gpu, shared, threads, tries)
        total = sum(map(float, tries.read_text().split()))
        done.write_text(f"{total:.1f}\n{'shared' if beside else 'alone'}\n")
    steps = [r for r in log_records(out) if "loss" in r]
    clock.finished(name, steps=len(steps) * step_cost(flags))
    recorded = done.read_text().split()        # (a study before 2026-12-08: the seconds alone)
    each = tries.read_text().split() if tries.exists() else [recorded[0]]
    return {"command": " ".join(["python", "train.py", *flags, "--out", str(out)]),
            "wall_s": float(recorded[0]), "tries": len(each),
            "shared": recorded[1] == "shared" if len(recorded) > 1 else beside,
            "steps": len(steps),
            "median_ms": median([r["ms"] for r in steps[len(steps) // 10:]])}   # past compilation


def evaluate(name: str, argv: list[str], file: Path, clock: "Clock",
             gpu: str | None = None, shared: bool = False,
             threads: int | None = None) -> float | None:
    """Run one evaluation command (python study_eval.py ... --out file), unless an earlier study
    wrote its file; its output goes to the file's name with .out; `gpu`, `shared`, `threads`: as
    train's. Returns its wall seconds (None: skipped)."""
    seconds = None
    if not file.exists():
        clock.say(f"{name}: python {' '.join(argv[1:])}"
                  + (f" on GPU {gpu}" if gpu is not None else ""))
        seconds = run_to_end(name, argv, file.with_suffix(".out"), gpu, shared, threads)
    clock.finished(name)
    return seconds


def run_to_end(name: str, argv: list[str], output: Path, gpu: str | None,
               shared: bool = False, threads: int | None = None,
               tries: Path | None = None) -> float:
    """Run one command to its end in a session of its own (a terminal's ^C reaches it only through
    on_signal), its output appended to `output`; returns its wall seconds. Stopped by the study:
    Stopped. Out of GPU memory on a GPU that others may share (`shared`): OutOfMemory, for the
    caller to run it again with fewer beside it. Failed otherwise: the commands beside it stop (a
    run at a step boundary, with a checkpoint the study's command resumes) and the study ends in one
    line that names `output`, also kept in FAILURES for the thread that sees the stop first.
    `threads`: its torch CPU threads (OMP_NUM_THREADS, unless the study's own environment sets it;
    None: torch's default, a thread per core). `tries`: a file that gets a line with its wall
    seconds once it has ended, however it ended (none where it never started)."""
    if STOP.is_set():
        raise Stopped(name)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(output, "a") as log:
        before = log.tell()            # (what an earlier try wrote is not this one's output)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        with START_LOCK:
            STARTING[0] += 1
        try:
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
            RUNNING.add(child)
        finally:
            with START_LOCK:
                STARTING[0] -= 1
        if STOP.is_set():              # a stop that came while it started: it gets its SIGINT too
            child.send_signal(signal.SIGINT)
        code = child.wait()
        RUNNING.discard(child)
    seconds = time.perf_counter() - start
    if tries is not None:
        with open(tries, "a") as file:
            file.write(f"{seconds:.1f}\n")
    # stopped at a step boundary, or before
    if STOP.is_set() and code in (130, 143, -signal.SIGINT):
        raise Stopped(name)
    if code != 0:
        with open(output, "rb") as log:
            log.seek(max(before, log.seek(0, os.SEEK_END) - 4000))
            said = log.read().decode(errors="replace")
        memory = any(line in said for line in OUT_OF_MEMORY)
        if memory and shared:          # (during a stop: resumed by the study's command again)
            raise Stopped(name) if STOP.is_set() else OutOfMemory(name)
        # the line first: a thread that sees the stop below must find it
        FAILURES.append(f"study.py: error: {name} failed; its output: {output}"
                        + ("; it ran out of GPU memory with no other command of the study "
                           "beside it: a smaller batch (--set batch=N) needs less"
                           if memory else ""))
        STOP.set()
        for other in list(RUNNING):
            other.send_signal(signal.SIGINT)
        sys.exit(FAILURES[-1])
    return seconds


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan


class Slots:
    """Places on the GPUs for the study's commands: `per_gpu` at once on each GPU (--parallel),
    training runs and evaluations alike, each holding one while it runs. What fits on a GPU is
    bounded by its memory whatever the commands are: an evaluation started beside --parallel
    training runs once took the GPU out of memory (docs/study.md), so it takes a run's place; and
    a command that runs out of memory all the same costs its GPU a place (run)."""

    def __init__(self, per_gpu: int):
        self.devices = gpus()
        self.places = {device: per_gpu for device in self.devices}    # each GPU's, as run() leaves
        self.retired = {device: 0 for device in self.devices}  # places to keep when next freed
        self.lock = threading.Lock()
        self.free = queue.Queue()             # every GPU once, then each again, ...
        for _ in range(per_gpu):
            for device in self.devices:
                self.free.put(device)

    def widen(self, per_gpu: int):
        """At least `per_gpu` places on each GPU from now on (never fewer than it has): for
        evaluations once training is over, which need less GPU memory than a run (one that runs out
        all the same costs its GPU a place, as in run)."""
        with self.lock:
            for device in self.devices:
                for _ in range(per_gpu - self.places[device]):
                    self.free.put(device)
                self.places[device] = max(self.places[device], per_gpu)

    @property
    def count(self) -> int:
        """Commands at once over all the GPUs, as the places stand now (fewer after an
        out-of-memory, more after widen)."""
        return sum(self.places.values())

    @property
    def threads(self) -> int | None:
        """Each command's torch threads: a share of the cores (None: one command at a time, torch's
        default). Commands side by side, each with a thread per core, slow a CPU several times
        over: a quick study at --parallel 2 on 2 cores took 390 s instead of 90."""
        return max(1, (os.cpu_count() or 1) // self.count) if self.count > 1 else None

    @contextmanager
    def take(self):
        """Wait for a free place; -> its GPU (as gpus() names it; None: the machine's default),
        held until the block ends."""
        device = self.free.get()
        try:
            yield device
        finally:
            with self.lock:
                keep = self.retired[device] > 0
                self.retired[device] -= keep
            if not keep:
                self.free.put(device)

    def run(self, name: str, command, clock: "Clock"):
        """command(gpu, shared) in a free place: its result. A command that runs out of GPU memory
        with other places on its GPU (OutOfMemory) runs again when a place frees, its GPU one place
        fewer from then on (down to one: a command alone that does not fit ends the study)."""
        while True:
            with self.take() as device:
                with self.lock:
                    shared = self.places[device] > 1
                try:
                    return command(device, shared)
                except OutOfMemory:
                    with self.lock:
                        if self.places[device] > 1:
                            self.places[device] -= 1
                            self.retired[device] += 1
                        left = self.places[device]
            clock.say(f"{name} ran out of GPU memory beside other commands: again when a place "
                      f"frees, {left} at once on its GPU from now on")


def side_by_side(slots: Slots, clock: "Clock", jobs: dict[str, tuple],
                 then=None) -> dict[str, dict]:
    """train() each job (name, out, flags) in a place of `slots` (as many at once as it has, fewer
    while evaluations hold some): while one run compiles on the host, the others keep its GPU busy;
    with several GPUs, each run sees one of them alone (the first runs one per GPU). Each run's data
    workers get a share of the CPUs. then(key): called as each run ends (e.g. to start its
    evaluation)."""
    at_once = slots.count
    if at_once > 1 and not any("--workers" in flags for _, _, flags in jobs.values()):
        share = ["--workers", str(max(1, slots.threads - 1))]    # a run's share of the cores
        jobs = {key: (name, out, flags + share) for key, (name, out, flags) in jobs.items()}

    def one(key: str, job: tuple) -> dict:
        # its time is measured beside other runs on its GPU where its GPU has several places as
        # it starts (fewer after an out-of-memory) and there are others to run
        result = slots.run(job[0], lambda device, shared: train(
            *job, clock, gpu=device, shared=shared, threads=slots.threads,
            beside=shared and len(jobs) > len(slots.devices)), clock)
        if then is not None:
            then(key)
        return result
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {key: pool.submit(one, key, job) for key, job in jobs.items()}
    raise_failure(futures)                  # every run has ended
    return {key: f.result() for key, f in futures.items()}


def raise_failure(futures: dict[str, Future]):
    """Of commands that have all ended, raise what went wrong: a failure (SystemExit: its line)
    rather than the stops it caused, else the first exception."""
    ended = [f.exception() for f in futures.values() if f.exception() is not None]
    if ended:
        raise next((e for e in ended if isinstance(e, SystemExit)), ended[0])


def gpus() -> list[str | None]:
    """The GPUs the study spreads its runs over, as CUDA_VISIBLE_DEVICES names them (or by number),
    when it is given several; else [None]: every run sees the machine's default device."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (visible.split(",") if visible else [str(i) for i in range(count)])[:count]


class Evaluations:
    """Evaluation commands (evaluate) run in the background while the study trains, in the order
    submitted, each in a place of `slots` that training runs share: one at a time while the study
    trains (training comes first), then from wait(), when training is over, as many at once as
    `slots` has, widened to `after` places on each GPU (default: as many as it has). An evaluation
    leaves its GPU partly idle and needs less memory than a training run, so more of them fit at
    once than runs do. beside=False (on a CPU, where both would compete for the same cores): none
    before wait()."""

    def __init__(self, slots: Slots, clock: "Clock", beside: bool = True, after: int = 0):
        self.clock, self.slots, self.after = clock, slots, after
        self.lanes = max(slots.count, after * len(slots.devices))
        self.open, self.busy = int(beside), 0     # lanes open now, and taken; wait() opens all
        self.cancelled = False
        self.queue: deque = deque()               # those not started, first submitted first
        self.turn = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=self.lanes)
        self.futures: dict[str, Future] = {}

    def submit(self, key: str, name: str, argv: list[str], file: Path):
        # (training threads submit at once: the queue and the pool must get them in one order)
        with self.turn:
            self.queue.append(key)
            self.futures[key] = self.pool.submit(self._one, key, name, argv, file)

    def _one(self, key: str, name: str, argv: list[str], file: Path) -> float | None:
        with self.turn:
            self.turn.wait_for(lambda: self.cancelled
                               or (self.queue[0] == key and self.busy < self.open))
            if self.cancelled:
                raise Stopped(name)
            self.queue.popleft()
            self.busy += 1
            self.turn.notify_all()
        def command(gpu: str | None, shared: bool) -> float | None:
            if self.cancelled:             # (training runs may hold every place for a while)
                raise Stopped(name)
            return evaluate(name, argv, file, self.clock, gpu, shared, self.slots.threads)
        try:
            return self.slots.run(name, command, self.clock)
        finally:
            with self.turn:
                self.busy -= 1
                self.turn.notify_all()

    def idle(self):
        """Wait until no evaluation runs or is about to (e.g. before a run that is timed alone on
        the GPU): those submitted so far have ended, or none may start before wait(). A failure is
        raised by wait()."""
        with self.turn:
            self.turn.wait_for(lambda: self.busy == 0 and (not self.queue or self.open == 0))

    def wait(self) -> dict[str, float | None]:
        """Every lane open, every evaluation to its end: each one's wall seconds (None: an earlier
        study's), or the first failure (rather than the stops it caused)."""
        self.slots.widen(self.after)
        with self.turn:
            self.open = self.lanes
            self.turn.notify_all()
        self.pool.shutdown(wait=True)
        raise_failure(self.futures)
        return {key: f.result() for key, f in self.futures.items()}

    def cancel(self):
        """The evaluations not yet started never start (the study ends on a stop or an error);
        those running end as their commands do."""
        with self.turn:
            self.cancelled = True
            self.queue.clear()
            self.turn.notify_all()
        self.pool.shutdown(wait=False, cancel_futures=True)


class Clock:
    """Progress lines with an estimate of the time left, from the units of work planned and done so
    far. Threads share it: each line is written whole.

    `commands` planned; the work they stand for is `units` (default: one per command), or with
    `unit_steps`, a training run counts its steps / unit_steps units (its steps weighed by their
    cost, step_cost) and an evaluation one. (By commands alone, the study's first, the base, with
    four times an arm's steps, once told 104 minutes left of 17.) That an evaluation costs about
    as much as training one SFT arm is the estimate's assumption, not a measurement."""

    def __init__(self, commands: int, units: float = 0, unit_steps: int = 0):
        self.commands, self.planned, self.unit_steps = commands, units or commands, unit_steps
        self.done, self.count, self.start = 0.0, 0, time.perf_counter()
        self.lock = threading.Lock()

    def say(self, text: str):
        with self.lock:
            sys.stdout.write(f"[study {(time.perf_counter() - self.start) / 60:5.1f} min] "
                             f"{text}\n")
            sys.stdout.flush()

    def finished(self, name: str, steps: float = 0):
        """`name` has ended: a training run of `steps` steps (SFT steps' worth), or (0) another
        command."""
        with self.lock:
            self.done += steps / self.unit_steps if steps and self.unit_steps else 1
            self.count += 1
            done, count = self.done, self.count
        left = (time.perf_counter() - self.start) / done * max(0.0, self.planned - done)
        self.say(f"{name} done ({count}/{self.commands}); about {left / 60:.1f} min left")
