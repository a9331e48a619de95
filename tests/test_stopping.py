"""A run that stops early loses nothing (stopping.py, train.py): SIGINT and SIGTERM end it at a step
boundary with a checkpoint and one line, a second signal ends it at once with the last checkpoint
whole, a NaN stops it before its weights are saved, and --resume then finishes as if the run had
never stopped, each step logged once.

Run: python -m pytest -q tests/test_stopping.py
"""
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from test_train import TINY, losses

import checkpoint
import config
import steplog
import stopping
import train
import training_step
from data import batches

STEPS = 8
RUN = TINY + ["--data", "babilong", "--lengths", "0k", "--method", "sft", "--steps", str(STEPS),
              "--stats-every", "4",
              # 0k BABILong rows are quick to build; checkpoints at steps 2 and 5
              "--ckpt-every", "3"]


def records(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


def logged_steps(out) -> list[int]:
    return [r["step"] for r in records(out) if "loss" in r]


def evals(out) -> list[int]:
    return [r["step"] for r in records(out) if "eval_acc" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The run, uninterrupted: its final checkpoint and log."""
    out = tmp_path_factory.mktemp("straight")
    train.main(RUN + ["--out", str(out)])
    return out


def finishes_as_straight(out, straight):
    """--resume the stopped run in `out`: the same weights, losses and evaluations as the run never
    stopped."""
    train.main(["--resume", "--out", str(out)])
    a, b = (checkpoint.load(checkpoint.path(str(straight))),
            checkpoint.load(checkpoint.path(str(out))))
    assert a["step"] == b["step"] == STEPS - 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses(out) == losses(straight)
    assert logged_steps(out) == list(range(STEPS)) and evals(out) == [0, 4, STEPS]   # each once
    assert not os.path.exists(checkpoint.path(str(out)) + ".tmp")


@pytest.mark.parametrize("sig,workers,group", [
    pytest.param(signal.SIGINT, "1", True, id="SIGINT"),
    pytest.param(signal.SIGTERM, "0", False, id="SIGTERM"),
    pytest.param(signal.SIGTERM, "1", True, id="SIGTERM-group")])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, straight, sig, workers,
                                                             group):
    """A real train.py process, signalled mid-run as a terminal's ^C does (SIGINT to its process
    group, loader workers included), as `kill` does (SIGTERM to it alone) or as a scheduler does
    (SIGTERM to the group): the step in flight finishes, a checkpoint of it is saved, one line says
    how to resume, the exit code is 128 + the signal; --resume then finishes exactly."""
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, "--workers", workers,
                            "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                           start_new_session=True)      # its own process group, as a terminal's job
    for line in run.stdout:
        if re.search(rf"\]\s+2/{STEPS} ", line):       # step 1 logged: signal it during step 2
            break
    if group:
        os.killpg(run.pid, sig)
    else:
        run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + sig, stdout + stderr
    ckpt = checkpoint.load(checkpoint.path(str(out)))
    step = ckpt["step"]
    assert 1 <= step < STEPS - 1                                    # mid-run, at a step boundary:
    # the last step logged is the one it holds
    assert logged_steps(out) == list(range(step + 1))
    assert stderr.strip().splitlines() == [
        f"train.py: stopped by {sig.name}: {checkpoint.path(str(out))} holds step {step}; "
        f"continue with: "
        f"python train.py --resume --out {out}"]
    assert f"at step {step}" not in stdout                          # no second line about it
    finishes_as_straight(out, straight)


def second_signal_mid_step(monkeypatch):
    """^C twice during step 5's forward: the second one ends the run there (the checkpoint of step 2
    stays)."""
    real, calls = training_step.optimizer_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGINT)         # noted: the run would stop after this step
            signal.raise_signal(signal.SIGINT)         # at once
        return real(*args)
    monkeypatch.setattr(train, "optimizer_step", step)
    return 2


def second_signal_mid_checkpoint(monkeypatch):
    """^C twice while the second checkpoint (of step 5) is half written: the first one's (step 2)
    stays whole."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    return 2


@pytest.mark.parametrize("when", [second_signal_mid_step, second_signal_mid_checkpoint])
def test_a_second_signal_stops_at_once_and_the_last_checkpoint_stays(tmp_path, straight,
                                                                      monkeypatch, capsys, when):
    """The second ^C ends the run where it is; the steps logged after the last checkpoint are cut
    from the log by --resume, which then finishes as the run that never stopped."""
    kept = when(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        train.main(RUN + ["--out", str(tmp_path)])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: stopped by SIGINT at once: {checkpoint.path(str(tmp_path))} holds step {kept}; "
        f"continue with: "
        f"python train.py --resume --out {tmp_path}"]
    assert checkpoint.load(checkpoint.path(str(tmp_path)))["step"] == kept
    assert not os.path.exists(checkpoint.path(str(tmp_path)) + ".tmp")
    # steps past the checkpoint, logged: cut on resume
    assert logged_steps(tmp_path)[-1] > kept
    monkeypatch.undo()
    finishes_as_straight(tmp_path, straight)


class Done:                                        # a GPU step's end marker, already reached
    def synchronize(self):
        pass


@pytest.mark.parametrize("late,every,calls", [(False, 1, 4), (True, 1, 4), (True, 3, 5)])
def test_a_nan_stops_the_run_before_its_weights_are_saved(tmp_path, monkeypatch, capsys, late,
                                                          every, calls):
    """A NaN in a weight before step 3 (as a bad update would leave it) makes that step's loss and
    gradient NaN through the real forward and backward. The run stops with one line naming step 3;
    the checkpoint of step 2 stays. late: the step's line waits for the next step's launch, as on a
    GPU, so the NaN is seen at the next step boundary, before the checkpoint due there (--ckpt-every
    1), or else after step 4 has run on those weights (--ckpt-every 3), whose line then never
    comes."""
    real, steps_run = training_step.optimizer_step, []

    def step(args, model, *rest):
        steps_run.append(1)
        if len(steps_run) == 4:
            with torch.no_grad():
                model.ln_f.weight[0] = math.nan
        return real(args, model, *rest)
    monkeypatch.setattr(train, "optimizer_step", step)
    if late:
        record = train.step_record
        monkeypatch.setattr(train, "step_record", lambda *a: {**record(*a), "done": Done()})
    with pytest.raises(SystemExit) as stop:
        train.main(RUN + ["--ckpt-every", str(every), "--stats-every", "100",
                          "--out", str(tmp_path)])
    assert stop.value.code == (f"train.py: error: step 3 has loss nan and gradient norm nan: "
                               f"stopped; "
                               f"{checkpoint.path(str(tmp_path))} keeps step 2")
    ckpt = checkpoint.load(checkpoint.path(str(tmp_path)))
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())
    saved = re.findall(r"saved .* at step (\d+)", capsys.readouterr().out)
    assert saved == [str(s) for s in range(3) if (s + 1) % every == 0]
    # the NaN step's line is the last
    assert logged_steps(tmp_path) == [0, 1, 2, 3]
    assert math.isnan(losses(tmp_path)[-1]) and all(math.isfinite(x) for x in losses(tmp_path)[:-1])
    assert len(steps_run) == calls


def test_a_finite_loss_with_an_infinite_gradient_norm_stops_too(tmp_path):
    record = steplog.step_record(7, 1e-3, torch.tensor(2.0), torch.zeros(0), torch.tensor(math.inf),
                                 tokens=100)
    with open(tmp_path / "log.jsonl", "w") as log, pytest.raises(stopping.NonFinite,
                                                                 match="step 7 .* norm inf"):
        steplog.log_step(8, log, record, time.perf_counter())
    assert json.loads((tmp_path / "log.jsonl").read_text())["grad_norm"] == math.inf


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    """The log of a run killed during step 6 whose checkpoint holds step 3 (saved at the top of step
    4, after the evaluation of the model after 4 steps): what was written after that checkpoint
    goes."""
    lines = [{"config": {}, "start_step": 0}, {"step": 0, "eval_acc": 0.1},
             *[{"step": s, "loss": 1.0} for s in range(4)],
             {"step": 4, "eval_acc": 0.2}, {"step": 4, "loss": 1.0}, {"step": 5, "loss": 1.0},
             {"step": 6, "eval_acc": 0.3}]
    file = tmp_path / "log.jsonl"
    # a line cut short
    file.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    stopping.cut_log(str(file), 3)
    assert [json.loads(line) for line in file.read_text().splitlines()] == lines[:7]
    stopping.cut_log(str(file), 3)                                   # nothing more to cut
    assert len(file.read_text().splitlines()) == 7
    # a resume at 4 that then died
    resumed = [{"config": {}, "start_step": 4}, {"step": 4, "loss": 1.0}]
    file.write_text("".join(json.dumps(r) + "\n" for r in lines[:7] + resumed))
    stopping.cut_log(str(file), 3)
    # its start stays, its step goes
    assert len(file.read_text().splitlines()) == 8
    assert not os.path.exists(str(file) + ".tmp")


def test_checkpoints_by_default_every_tenth_of_the_steps_or_few_minutes_but_not_too_often():
    every, minimum = checkpoint.EVERY_SECONDS, checkpoint.MIN_SECONDS
    # --ckpt-every 3: steps only
    assert checkpoint.due(3, 1000, 3, 0.1) and not checkpoint.due(3, 1000, 2, 1e6)
    # a tenth
    assert checkpoint.due(0, 1000, 100, minimum) and not checkpoint.due(0, 1000, 99, minimum)
    # fast steps: no sooner than MIN_SECONDS
    assert not checkpoint.due(0, 1000, 500, minimum - 1)
    # slow steps
    assert checkpoint.due(0, 1000, 1, every) and not checkpoint.due(0, 1000, 1, every - 1)
    # 20 steps of 20 s: every fourth, not every second (the floor)
    assert checkpoint.due(0, 20, 4, 4 * 20.0) and not checkpoint.due(0, 20, 2, 2 * 20.0)


def test_the_default_schedule_reaches_the_loop(tmp_path, monkeypatch, capsys):
    """--ckpt-every 0: with the one-minute floor lifted, a 20-step run saves every 2 steps (a tenth
    of them); here it stops after 5 (--stop-after), and saves there too."""
    monkeypatch.setattr(checkpoint, "MIN_SECONDS", 0)
    train.main(RUN + ["--ckpt-every", "0", "--steps", "20", "--stop-after", "5",
                      "--out", str(tmp_path)])
    assert re.findall(r"saved .* at step (\d+)", capsys.readouterr().out) == ["1", "3", "4"]


def test_loader_workers_leave_signals_to_the_main_process():
    """A terminal's ^C, or a SIGTERM to the process group, reaches the loader's workers too: they go
    on building batches (the main process stops the run at a step boundary, and may still wait for
    the batch of the step in flight)."""
    args = config.get_args(RUN + ["--workers", "1"])
    config.apply_defaults(args)
    with stopping.Stop(saved=-1).handling_signals():
        before = set(multiprocessing.active_children())
        cfg = config.data_config(args)
        loader = iter(batches.batch_loader(cfg, 0, STEPS - 1, batches.data_source(cfg)))
        next(loader)
        (worker,) = set(multiprocessing.active_children()) - before
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert worker.is_alive()
        assert len(list(loader)) == STEPS - 1


def test_an_error_in_the_loop_ends_the_loader_workers_so_the_program_can_exit(tmp_path):
    """Workers ignore SIGTERM, and multiprocessing's exit handler ends children with SIGTERM and
    waits for them: a run that failed with an error (a CUDA out-of-memory, say) used to hang at exit
    with its workers alive. Its error propagates, and its workers are gone with it."""
    code = ("import sys, train\n"
            "def fail(*a, **k): raise RuntimeError('out of memory (a test)')\n"
            "train.optimizer_step = fail\n"
            "train.main(sys.argv[1:])\n")
    argv = [*RUN, "--workers", "2", "--stats-every", "100", "--out", str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip().endswith("out of memory (a test)")
