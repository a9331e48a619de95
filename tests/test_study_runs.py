"""study_runs.py: the study's train.py runs side by side on one GPU or spread over several, and
stopped together when one fails (fake runs: no training).

Run: python -m pytest -q tests/test_study_runs.py
"""
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import study_runs


@pytest.fixture(autouse=True)
def no_stop_left():
    """A failed run leaves STOP set (study.main clears it)."""
    yield
    study_runs.STOP.clear()


def counting(result):
    """A fake command (train or evaluate) that takes 0.1 s: -> (it, the most that ran at once
    ([n]), each call's name and other arguments in the order they ended)."""
    running, most, ended = [0], [0], []
    lock = threading.Lock()

    def fake(name, *args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
            ended.append((name, args))
        return result(name, **kwargs)
    return fake, most, ended


def test_side_by_side_runs_up_to_parallel_at_once_each_with_a_share_of_the_cpus(monkeypatch):
    fake_train, most, ended = counting(lambda name, beside=False, **kwargs: {"name": name,
                                                                            "shared": beside})
    monkeypatch.setattr(study_runs, "train", fake_train)
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])      # one GPU, or none
    jobs = {f"k{i}": (f"run {i}", None, ["--steps", "3"]) for i in range(5)}
    got = study_runs.side_by_side(study_runs.Slots(2), study_runs.Clock(5), jobs)
    seen = {name: args[1] for name, args in ended}                   # (out, flags, clock)
    assert most[0] == 2 and list(got) == list(jobs)
    assert all(got[f"k{i}"] == {"name": f"run {i}", "shared": True} for i in range(5))
    assert all(flags[:2] == ["--steps", "3"] and flags[2] == "--workers" for flags in seen.values())
    alone = study_runs.side_by_side(study_runs.Slots(1), study_runs.Clock(1),
                                    {"k": ("one", None, ["--steps", "3"])})
    assert alone == {"k": {"name": "one", "shared": False}} and ended[-1][1][1] == ["--steps", "3"]


@pytest.mark.parametrize("memory", [True, False])
def test_a_failed_run_ends_the_study_in_one_line_that_names_its_output(tmp_path, monkeypatch,
                                                                       memory):
    """A train.py run that fails ends the study with one line naming the run's output; one that ran
    out of GPU memory alone on its GPU also says so."""
    class FailingRun:
        def __init__(self, argv, stdout, **kwargs):
            stdout.write("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n" if memory
                         else "Traceback ...\nValueError: something else\n")

        def wait(self):
            return 1
    monkeypatch.setattr(study_runs.subprocess, "Popen", FailingRun)
    with pytest.raises(SystemExit) as stop:
        study_runs.train("arm sft seed 1", tmp_path / "sft_s1", [], study_runs.Clock(1))
    said = str(stop.value.code)
    assert said.startswith("study.py: error: arm sft seed 1 failed; its output: ")
    assert str(tmp_path / "sft_s1.out") in said and ("GPU memory" in said) == memory
    assert not (tmp_path / "sft_s1" / "done").exists()


def out_of_memory_once(monkeypatch, names: set[str],
                       said: str = "torch.OutOfMemoryError: CUDA out of memory") -> dict[str, int]:
    """Fake train.py runs of 0.2 s: one whose --out is in `names` dies of CUDA out-of-memory on its
    first start, saying `said`. -> the starts of each run, by the name of its --out."""
    starts: dict[str, int] = {}

    class Process:
        def __init__(self, argv, stdout, **kwargs):
            self.name = Path(argv[-1]).name
            Path(argv[-1]).mkdir(exist_ok=True)
            starts[self.name] = starts.get(self.name, 0) + 1
            self.dies = self.name in names and starts[self.name] == 1
            stdout.write(said + "\n" if self.dies else "")

        def wait(self):
            time.sleep(0.2)
            return 1 if self.dies else 0
    monkeypatch.setattr(study_runs.subprocess, "Popen", Process)
    monkeypatch.setattr(study_runs, "log_records", lambda out: [])
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    return starts


@pytest.mark.parametrize("said", ["torch.OutOfMemoryError: CUDA out of memory",
                                  "RuntimeError: CUDA error: out of memory"])
def test_a_run_out_of_gpu_memory_beside_others_runs_again_with_fewer_beside_it(
        tmp_path, monkeypatch, capsys, said):
    """Three runs, two places: the first dies of out-of-memory beside the second; instead of ending
    the study it runs again, alone, and the GPU keeps one place from then on (the third run waits
    for it); every run ends done, nothing was stopped; the first's time (alone) is not shared, its
    wall time counts both tries."""
    starts = out_of_memory_once(monkeypatch, {"a"}, said)
    study_runs.FAILURES.clear()
    slots = study_runs.Slots(2)
    jobs = {key: (f"run {key}", tmp_path / key, []) for key in "abc"}
    got = study_runs.side_by_side(slots, study_runs.Clock(3), jobs)
    assert starts == {"a": 2, "b": 1, "c": 1} and set(got) == set("abc")
    assert got["a"]["shared"] is False and got["b"]["shared"] is True   # (c: as it happens)
    # its time is both tries' (0.2 s each), as the table says
    assert (got["a"]["tries"], got["b"]["tries"]) == (2, 1)
    assert got["a"]["wall_s"] >= 0.4 > got["b"]["wall_s"] >= 0.2
    assert all((tmp_path / key / "done").exists() for key in "abc")
    assert slots.places == {None: 1} and slots.free.qsize() == 1
    assert not study_runs.FAILURES and not study_runs.STOP.is_set()
    assert "run a ran out of GPU memory beside other commands" in capsys.readouterr().out


def test_a_finished_run_keeps_the_times_it_was_measured_with(tmp_path, monkeypatch):
    """A later study skips finished runs: they report whether their time was shared as it was
    when they ran (here beside others, two places), not as the later --parallel (one) would have
    it; a run never started (a stop before it) records no try."""
    out_of_memory_once(monkeypatch, set())
    jobs = {key: (f"run {key}", tmp_path / key, []) for key in "abc"}
    first = study_runs.side_by_side(study_runs.Slots(2), study_runs.Clock(3), jobs)
    again = study_runs.side_by_side(study_runs.Slots(1), study_runs.Clock(3), jobs)
    kept = ("shared", "wall_s", "tries")
    assert [[r[k] for k in kept] for r in again.values()] == [[r[k] for k in kept]
                                                              for r in first.values()]
    assert first["a"]["shared"] is True
    study_runs.STOP.set()
    with pytest.raises(study_runs.Stopped):
        study_runs.run_to_end("run d", ["train.py"], tmp_path / "d.out", None,
                              tries=tmp_path / "d_tries")
    assert not (tmp_path / "d_tries").exists()


def test_a_command_out_of_gpu_memory_with_its_gpu_to_itself_ends_the_study(tmp_path, monkeypatch):
    """With one place per GPU (--parallel 1, or what out-of-memory left), running it again cannot
    help: the study ends in the failure's line."""
    out_of_memory_once(monkeypatch, {"a"})
    with pytest.raises(SystemExit) as stop:
        study_runs.side_by_side(study_runs.Slots(1), study_runs.Clock(1),
                                {"a": ("run a", tmp_path / "a", [])})
    assert "run a failed" in str(stop.value.code) and "GPU memory" in str(stop.value.code)


def test_out_of_gpu_memory_during_a_stop_is_a_stop(tmp_path, monkeypatch):
    """^C reaches the study while a run shares its GPU; the run dies of out-of-memory on its way
    out: the study stops (its command resumes the run), it does not fail, nor retry."""
    class Process:
        def __init__(self, argv, stdout, **kwargs):
            self.stdout = stdout

        def wait(self):
            study_runs.STOP.set()                    # ^C while it runs
            self.stdout.write("torch.OutOfMemoryError: CUDA out of memory\n")
            self.stdout.flush()
            return 1
    monkeypatch.setattr(study_runs.subprocess, "Popen", Process)
    study_runs.FAILURES.clear()
    with pytest.raises(study_runs.Stopped):
        study_runs.run_to_end("run a", ["python", "train.py", "--out", str(tmp_path / "a")],
                              tmp_path / "a.out", None, shared=True)
    assert not study_runs.FAILURES


def test_a_signal_while_a_command_starts_stops_that_command_too(tmp_path, monkeypatch):
    """^C lands while the main thread starts a run (before the run is among those in flight): the
    study does not stop there and leave the run going unseen; the run gets its SIGINT, is waited
    for, and then the study stops."""
    got = []

    class Process:
        def __init__(self, argv, stdout, **kwargs):
            study_runs.on_signal(signal.SIGINT, None)        # the handler, as the signal lands

        def send_signal(self, signum):
            got.append(signum)

        def wait(self):
            got.append("waited")
            return 130
    monkeypatch.setattr(study_runs.subprocess, "Popen", Process)
    with pytest.raises(study_runs.Stopped):
        study_runs.run_to_end("run a", ["train.py"], tmp_path / "a.out", None)
    assert got == [signal.SIGINT, "waited"] and not study_runs.RUNNING
    assert study_runs.STARTING == [0]


def test_only_a_commands_own_output_says_whether_it_ran_out_of_memory(tmp_path, monkeypatch):
    """An earlier try's out-of-memory, still in the .out file the command appends to, does not make
    a later failure of another kind one: that one ends the study at its first try."""
    (tmp_path / "a.out").write_text("torch.OutOfMemoryError: CUDA out of memory\n")
    one_fails(monkeypatch, lambda argv: argv[-1].endswith("a"))
    with pytest.raises(SystemExit) as stop:
        study_runs.side_by_side(study_runs.Slots(2), study_runs.Clock(1),
                                {"a": ("run a", tmp_path / "a", [])})
    assert "run a failed" in str(stop.value.code) and "memory" not in str(stop.value.code)


@pytest.mark.parametrize("parallel, preset, threads", [(2, None, "2"), (3, None, "1"),
                                                     (1, None, None), (2, "3", "3")])
def test_commands_side_by_side_share_the_cores_unless_the_environment_says(
        tmp_path, monkeypatch, parallel, preset, threads):
    """Each command's torch threads are the cores over the commands at once (4 cores, 2 at once:
    2 each); alone it keeps torch's default; an OMP_NUM_THREADS of the study's own wins."""
    envs = []

    class Process:
        def __init__(self, argv, stdout, env=None, **kwargs):
            envs.append(env or {})
            Path(argv[-1]).mkdir(exist_ok=True)

        def wait(self):
            return 0
    monkeypatch.setattr(study_runs.subprocess, "Popen", Process)
    monkeypatch.setattr(study_runs, "log_records", lambda out: [])
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    monkeypatch.setattr(study_runs.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if preset is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", preset)
    jobs = {key: (f"run {key}", tmp_path / key, []) for key in "ab"}
    study_runs.side_by_side(study_runs.Slots(parallel), study_runs.Clock(2), jobs)
    assert [env.get("OMP_NUM_THREADS") for env in envs] == [threads, threads]


def test_given_several_gpus_the_runs_spread_over_them_one_on_each(monkeypatch):
    """CUDA_VISIBLE_DEVICES=3,5: five runs, two at a time (--parallel 1), each seeing one of the two
    GPUs (by their names) and never two on the same GPU at once; their times are not shared."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert study_runs.gpus() == ["3", "5"]
    on, most, seen = {"3": 0, "5": 0}, [0], {}
    lock = threading.Lock()

    def fake_train(name, out, flags, clock, gpu=None, shared=False, threads=None, beside=False):
        with lock:
            on[gpu] += 1
            most[0] = max(most[0], *on.values())
        time.sleep(0.1)
        with lock:
            on[gpu] -= 1
        seen[name] = gpu
        return {"name": name, "shared": beside}
    monkeypatch.setattr(study_runs, "train", fake_train)
    jobs = {f"k{i}": (f"run {i}", None, ["--steps", "3"]) for i in range(5)}
    got = study_runs.side_by_side(study_runs.Slots(1), study_runs.Clock(5), jobs)
    assert most[0] == 1 and set(seen.values()) == {"3", "5"} and len(seen) == 5
    assert all(r["shared"] is False for r in got.values())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert study_runs.gpus() == [None]               # one GPU: the runs share it (--parallel)


def one_fails(monkeypatch, fails) -> list:
    """Fake processes: one whose argv `fails` says fails after 0.2 s (the others are under way);
    the others run until a signal stops them (exit 130). -> the signals they were sent."""
    signals = []

    class Process:
        def __init__(self, argv, stdout, **kwargs):
            self.bad, self.stopped = fails(argv), threading.Event()
            stdout.write("ValueError: broken\n" if self.bad else "")

        def wait(self):
            if self.bad:
                time.sleep(0.2)
                return 1
            return 130 if self.stopped.wait(timeout=20) else 0

        def send_signal(self, sig):
            signals.append(sig)
            self.stopped.set()
    monkeypatch.setattr(study_runs.subprocess, "Popen", Process)
    return signals


def test_a_failed_run_stops_the_runs_beside_it_and_the_failure_is_what_the_study_says(
        tmp_path, monkeypatch):
    """Two runs side by side: when one fails, the other gets a SIGINT at once (it checkpoints at a
    step boundary; the command again resumes it) instead of running on, and the study ends with the
    failure's line, not with the stop of the run listed first."""
    signals = one_fails(monkeypatch, lambda argv: argv[-1].endswith("bad"))
    jobs = {"good": ("run good", tmp_path / "good", []), "bad": ("run bad", tmp_path / "bad", [])}
    with pytest.raises(SystemExit) as stop:
        study_runs.side_by_side(study_runs.Slots(2), study_runs.Clock(2), jobs)
    assert str(stop.value.code).startswith("study.py: error: run bad failed")
    assert signals == [signal.SIGINT] and not study_runs.RUNNING
    assert not (tmp_path / "good" / "done").exists()


def test_evaluations_run_one_at_a_time_beside_training_then_every_lane_at_once(monkeypatch,
                                                                               tmp_path):
    """Submitted while training runs, evaluations take one lane (the training runs' GPU memory
    comes first), in the order submitted; idle() returns once those submitted have ended; wait()
    opens every lane."""
    fake_evaluate, most, ended = counting(lambda name, **kwargs: 0.1)
    monkeypatch.setattr(study_runs, "evaluate", fake_evaluate)
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    evals = study_runs.Evaluations(study_runs.Slots(3), study_runs.Clock(6))
    for i in range(3):
        evals.submit(f"k{i}", f"eval {i}", [], tmp_path / f"{i}.json")
    evals.idle()
    assert [name for name, _ in ended] == ["eval 0", "eval 1", "eval 2"] and most[0] == 1
    for i in range(3, 6):
        evals.submit(f"k{i}", f"eval {i}", [], tmp_path / f"{i}.json")
    assert evals.wait() == {f"k{i}": 0.1 for i in range(6)}
    assert most[0] == 3 and len(ended) == 6


def test_once_training_is_over_evaluations_run_in_more_places_each_gpu_as_many(monkeypatch,
                                                                               tmp_path):
    """after=N: from wait() on, up to N evaluations at once on each GPU (more than --parallel's
    training runs: an evaluation needs less memory), with a share of the cores each."""
    on_gpu = {"0": [0, 0], "1": [0, 0]}                   # running now, most at once
    lock = threading.Lock()

    def fake_evaluate(name, argv, file, clock, gpu, shared, threads):
        with lock:
            on_gpu[gpu][0] += 1
            on_gpu[gpu][1] = max(on_gpu[gpu][1], on_gpu[gpu][0])
        time.sleep(0.2)
        with lock:
            on_gpu[gpu][0] -= 1
        return threads
    monkeypatch.setattr(study_runs, "evaluate", fake_evaluate)
    monkeypatch.setattr(study_runs, "gpus", lambda: ["0", "1"])
    monkeypatch.setattr(study_runs.os, "cpu_count", lambda: 12)
    evals = study_runs.Evaluations(study_runs.Slots(1), study_runs.Clock(8), after=3)
    for i in range(8):
        evals.submit(f"k{i}", f"eval {i}", [], tmp_path / f"{i}.json")
    got = evals.wait()
    assert on_gpu["0"][1] == 3 and on_gpu["1"][1] == 3
    assert len(got) == 8 and got["k7"] == 12 // 6


def test_a_steps_cost_follows_its_objective_and_method():
    """The time left counts a run's steps at what each costs against an SFT step: the base's
    next-token steps and steps with an inner loop more; the flags' order is free."""
    cost = study_runs.step_cost
    assert cost(["--objective", "lm", "--data", "books"]) == study_runs.LM_STEP_COST > 1
    assert cost(["--steps", "3", "--method", "focusft", "--mask", "causal"]) == \
        study_runs.INNER_STEP_COST > 1
    assert cost(["--method", "sft", "--mask", "hybrid"]) == cost([]) == 1.0
    assert cost(["--seed", "1", "--method"]) == 1.0                   # (a flag without a value)


def test_the_time_left_weighs_training_runs_by_their_steps(monkeypatch, capsys):
    """With unit_steps, a run of 4x an arm's steps counts as four arms' work: after it, 60 s in,
    with 8 of 12 units left, the line says 2 minutes left (by commands alone: 60 s x 4 more)."""
    now = [0.0]
    monkeypatch.setattr(study_runs.time, "perf_counter", lambda: now[0])
    clock, commands = study_runs.Clock(5, units=12, unit_steps=300), study_runs.Clock(5)
    now[0] = 60.0
    clock.finished("base", steps=1200)
    assert "base done (1/5); about 2.0 min left" in capsys.readouterr().out
    commands.finished("base", steps=1200)
    assert "base done (1/5); about 4.0 min left" in capsys.readouterr().out


def test_widening_never_takes_places_away(monkeypatch):
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    slots = study_runs.Slots(3)
    slots.widen(2)
    assert slots.places == {None: 3} and slots.count == 3 and slots.free.qsize() == 3
    slots.widen(5)
    assert slots.places == {None: 5} and slots.count == 5 and slots.free.qsize() == 5


def test_an_evaluation_beside_training_takes_the_place_of_a_run(monkeypatch, tmp_path):
    """--parallel bounds what shares a GPU, training runs and evaluations together (an evaluation
    beside four runs once took an 80 GB GPU out of memory): with two places, an evaluation
    submitted while three runs wait leaves room for one run at a time, and every command ran."""
    fake, most, _ = counting(lambda name, **kwargs: {"name": name} if name.startswith("run")
                             else 0.1)
    monkeypatch.setattr(study_runs, "train", fake)
    monkeypatch.setattr(study_runs, "evaluate", fake)
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    slots = study_runs.Slots(2)
    evals = study_runs.Evaluations(slots, study_runs.Clock(4))
    evals.submit("base", "eval base", [], tmp_path / "base.json")
    jobs = {f"k{i}": (f"run {i}", None, ["--steps", "3"]) for i in range(3)}
    got = study_runs.side_by_side(slots, study_runs.Clock(3), jobs)
    assert evals.wait() == {"base": 0.1} and len(got) == 3
    assert most[0] == 2


def test_an_evaluation_is_skipped_when_an_earlier_study_wrote_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(study_runs.subprocess, "Popen", None)      # nothing may start
    (tmp_path / "base.json").write_text("{}")
    assert study_runs.evaluate("eval base", ["python"], tmp_path / "base.json",
                               study_runs.Clock(1)) is None


def test_a_failed_evaluation_stops_the_training_beside_it_and_is_what_the_study_says(
        tmp_path, monkeypatch):
    """An evaluation in the background fails while a run trains: the run gets one SIGINT and stops
    (the study's command resumes it), and the line the study ends with is the evaluation's."""
    signals = one_fails(monkeypatch, lambda argv: "study_eval.py" in argv)
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    study_runs.FAILURES.clear()
    evals = study_runs.Evaluations(study_runs.Slots(2), study_runs.Clock(2))
    evals.submit("base", "eval base", ["python", "study_eval.py"], tmp_path / "eval" / "base.json")
    with pytest.raises(study_runs.Stopped):
        study_runs.train("arm sft seed 1", tmp_path / "sft_s1", [], study_runs.Clock(1))
    with pytest.raises(SystemExit) as stop:
        evals.wait()
    assert str(stop.value.code).startswith("study.py: error: eval base failed; its output: ")
    assert study_runs.FAILURES == [str(stop.value.code)] and str(tmp_path / "eval") in \
        study_runs.FAILURES[0]
    assert signals == [signal.SIGINT] and not (tmp_path / "eval" / "base.json").exists()
    study_runs.FAILURES.clear()


def three_on_a_cpu(monkeypatch, tmp_path):
    """Three fake evaluations submitted with beside=False and two lanes: (evals, the most that ran
    at once, those ended)."""
    fake_evaluate, most, ended = counting(lambda name, **kwargs: 0.1)
    monkeypatch.setattr(study_runs, "evaluate", fake_evaluate)
    monkeypatch.setattr(study_runs, "gpus", lambda: [None])
    evals = study_runs.Evaluations(study_runs.Slots(2), study_runs.Clock(3), beside=False)
    for i in range(3):
        evals.submit(f"k{i}", f"eval {i}", [], tmp_path / f"{i}.json")
    return evals, most, ended


def test_on_a_cpu_evaluations_wait_for_the_end_of_training(monkeypatch, tmp_path):
    """beside=False (a CPU study: training and evaluation would compete for the cores): nothing
    starts before wait(), and idle() does not wait for what cannot start."""
    evals, most, ended = three_on_a_cpu(monkeypatch, tmp_path)
    evals.idle()
    time.sleep(0.3)
    assert ended == []
    assert evals.wait() == {f"k{i}": 0.1 for i in range(3)} and most[0] == 2


def test_cancel_ends_evaluations_waiting_for_a_lane_so_the_study_can_exit(monkeypatch, tmp_path):
    """A study stopped (or failed) while evaluations wait for a lane: cancel() ends them, none
    starts, and no thread is left waiting (the interpreter would wait for it at exit)."""
    evals, most, ended = three_on_a_cpu(monkeypatch, tmp_path)
    time.sleep(0.2)                                   # two threads wait for a lane
    evals.cancel()
    deadline = time.time() + 5
    while time.time() < deadline and not all(f.done() for f in evals.futures.values()):
        time.sleep(0.05)
    assert all(f.done() for f in evals.futures.values()) and ended == []
    assert all(f.cancelled() or isinstance(f.exception(), study_runs.Stopped)
               for f in evals.futures.values())


def test_a_stop_while_a_command_starts_reaches_it(tmp_path, monkeypatch):
    """A SIGINT to the study (or a failure elsewhere) that lands while a command is being started
    is passed on to it once it is running."""
    signals = []

    class Starting:
        def __init__(self, argv, stdout, **kwargs):
            study_runs.STOP.set()                     # the stop arrives during Popen

        def wait(self):
            return 130 if signals else 0

        def send_signal(self, sig):
            signals.append(sig)
    monkeypatch.setattr(study_runs.subprocess, "Popen", Starting)
    with pytest.raises(study_runs.Stopped):
        study_runs.run_to_end("arm sft seed 1", ["python"], tmp_path / "sft.out", None)
    assert signals == [signal.SIGINT]


def test_a_failure_is_recorded_before_the_others_are_told_to_stop(tmp_path, monkeypatch):
    """Whoever sees the stop a failure causes must find the failure's line (else the study would
    say "stopped ... continue with" instead of the error)."""
    seen = []

    class Stop(threading.Event):
        def set(self):
            seen.append(list(study_runs.FAILURES))
            super().set()
    monkeypatch.setattr(study_runs, "STOP", Stop())
    one_fails(monkeypatch, lambda argv: True)
    study_runs.FAILURES.clear()
    with pytest.raises(SystemExit):
        study_runs.run_to_end("eval base", ["python"], tmp_path / "base.out", None)
    assert len(seen) == 1 and seen[0][0].startswith("study.py: error: eval base failed")
    study_runs.FAILURES.clear()
