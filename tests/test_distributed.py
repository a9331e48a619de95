"""Data-parallel training on the CPU (distributed.py, gloo): `torchrun --nproc_per_node=2` trains as
one process holding both ranks' rows (SFT and FocuSFT, fp32), rank 0 alone prints and writes, a
signal to one rank stops both at a step boundary with rank 0's checkpoint, --resume then finishes
bit for bit as the run that never stopped, and a failure on one rank ends both with one line.

Run: python -m pytest -q tests/test_distributed.py
"""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT
from test_train import losses

import checkpoint
import config
import fastweights
import train
import training_step
from data import batches, tokenizer
from distributed import World
from model import GPT, preset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
STEPS = 2
# two micro-batches a step: the ranks' gradients are summed once, after both; 0k BABILong rows are
# quick to build
RUN = ["--ctx", "512", "--data", "babilong", "--lengths", "0k", "--model", "tiny",
       "--device", "cpu", "--dtype", "fp32", "--lr", "1e-3", "--inner-rank", "8",
       "--steps", str(STEPS), "--grad-accum", "2", "--stats-every", "100", "--ckpt-every", "100",
       "--workers", "0"]
# within 1e-5 of each other, relative to each tensor's norm: the ranks' sums round differently
AGREE = 1e-5
# The weights after the run, likewise. Looser: AdamW divides each gradient element by its RMS plus
# eps (1e-8), so an element whose gradient is at eps's scale, where fp32 rounding is of that size
# too, moves by a noisy fraction of a step (docs/multigpu.md: measured up to 0.15 lr)
WEIGHTS = 1e-3
# torchrun's workers run train.main with a failure or a signal on one rank, during one step
INJECTING = """import os, signal, sys
sys.path.insert(0, {root!r})
import train
real, calls = train.optimizer_step, []
def step(*args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == {at}:
        {what}
    return real(*args)
train.optimizer_step = step
train.main(sys.argv[1:])
"""
FAIL = 'raise RuntimeError("injected failure")'
TERMINATE = "signal.raise_signal(signal.SIGTERM)"


def torchrun(script, argv: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 script argv`; on a timeout, torchrun is asked to stop its
    workers (SIGTERM, which it passes on, then kills them) before the test fails: none is left
    behind."""
    run = subprocess.Popen([*TORCHRUN, str(script), *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.terminate()
        try:
            run.communicate(timeout=60)
        finally:
            run.kill()
        pytest.fail(f"torchrun {' '.join(argv)} ran past {timeout} s")
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def injecting(tmp_path, at: int, what: str):
    script = tmp_path / "inject.py"
    script.write_text(INJECTING.format(root=str(ROOT), at=at, what=what))
    return script


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """method -> (out, torchrun's result): 2 processes of 1 row, uninterrupted (each run once)."""
    runs = {}

    def run(method: str):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"two_{method}")
            runs[method] = out, torchrun(ROOT / "train.py", RUN + [
                "--method", method, "--batch-size", "1", "--out", str(out)], out)
        return runs[method]
    return run


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def records(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("method", ["sft", "focusft"])
def test_two_processes_of_one_row_train_as_one_process_of_two_rows(tmp_path, two_ranks, method):
    """Rank r draws rows [r, r + 1) of the batch one process of 2 rows draws, and its fast weights
    from the same seeds; the summed gradients are the whole batch's. Same losses and gradient norms
    at every step (fp32, to AGREE) and weights (to WEIGHTS); rank 0 alone prints and writes."""
    one = tmp_path / "one"
    train.main(RUN + ["--method", method, "--batch-size", "2", "--out", str(one)])
    two, run = two_ranks(method)
    assert run.returncode == 0, run.stderr
    for key in ("loss", "grad_norm"):
        got, want = ([r[key] for r in records(out) if "loss" in r] for out in (two, one))
        assert len(got) == len(want) == STEPS
        assert max(abs(g - w) / abs(w) for g, w in zip(got, want)) < AGREE, (key, got, want)
    a, b = (checkpoint.load(checkpoint.path(str(out))) for out in (two, one))
    assert a["step"] == b["step"] == STEPS - 1 and a["config"]["world_size"] == 2
    assert max(relative(a["model"][k], b["model"][k]) for k in b["model"]) < WEIGHTS
    # rank 0 alone: one line per step and per evaluation, in the log and on the screen, two files
    assert [r["step"] for r in records(two) if "loss" in r] == list(range(STEPS))
    assert [r["step"] for r in records(two) if "eval_acc" in r] == [0, STEPS]
    assert run.stdout.count(f"] {STEPS}/{STEPS} |") == 1 and run.stdout.count("summary:") == 1
    assert "data parallel: 2 processes of 1 row(s) each, 2 rows per micro-batch" in run.stdout
    assert sorted(os.listdir(two)) == ["ckpt.pt", "log.jsonl"]


def test_a_signal_to_one_rank_stops_both_and_resume_is_bit_exact(tmp_path, two_ranks):
    """SIGTERM to rank 1 alone during step 0: the ranks agree at the next boundary, rank 0 saves
    step 0 and says how to continue (one line); --resume on 2 processes then ends with the weights
    and losses of the run that never stopped, each step logged once."""
    straight, _ = two_ranks("focusft")
    out = tmp_path / "out"
    argv = RUN + ["--method", "focusft", "--batch-size", "1", "--out", str(out)]
    stopped = torchrun(injecting(tmp_path, 1, TERMINATE), argv, tmp_path)
    assert stopped.returncode != 0
    ours = [line for line in stopped.stderr.splitlines() if line.startswith("train.py")]
    assert ours == [f"train.py: stopped by SIGTERM: {checkpoint.path(str(out))} holds step 0; "
                    f"continue with: torchrun --standalone --nproc_per_node=2 train.py --resume "
                    f"--out {out}"], stopped.stderr
    assert checkpoint.load(checkpoint.path(str(out)))["step"] == 0
    resumed = torchrun(ROOT / "train.py", ["--resume", "--out", str(out)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (checkpoint.load(checkpoint.path(str(o))) for o in (out, straight))
    assert a["step"] == b["step"] == STEPS - 1
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses(out) == losses(straight)
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(STEPS))


def test_a_failure_on_one_rank_ends_both_with_one_line(tmp_path):
    """Rank 1 raises during step 0: it says so in one line (no traceback) and ends; rank 0 finds it
    gone at its next collective and ends quietly; nothing half-written is left."""
    out = tmp_path / "out"
    argv = RUN + ["--method", "sft", "--batch-size", "1", "--out", str(out)]
    failed = torchrun(injecting(tmp_path, 1, FAIL), argv, tmp_path)
    assert failed.returncode != 0
    ours = [line for line in failed.stderr.splitlines() if line.startswith("train.py")]
    assert len(ours) == 1 and ours[0].startswith(
        "train.py: error: rank 1 of 2: RuntimeError: injected failure (train.py:"), failed.stderr
    assert 'train.py", line' not in failed.stderr                  # no worker's traceback
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# --------------------------------------------------------------------------------------------------
# in one process: the pieces

def test_a_ranks_rows_and_fast_weights_are_those_of_the_whole_batch(tiny_model):
    """Rank 1 of 2 with 1 row draws row 1 of the 2 rows one process draws (get_batch), and row 1's
    fresh fast weights (row_seeds, init_fast): neither depends on the rows beside it."""
    args = config.get_args(RUN + ["--batch-size", "2"])
    config.apply_defaults(args)
    cfg = config.data_config(args)
    source, enc = batches.data_source(cfg), tokenizer.gpt2()
    whole = batches.get_batch(cfg, enc, source, 3, 1)
    rank1 = batches.get_batch(replace(cfg, rows=1, first_row=1), enc, source, 3, 1)
    for k in whole:
        assert torch.equal(rank1[k], whole[k][1:]), k
    assert not torch.equal(whole["idx"][0], whole["idx"][1])
    inner = fastweights.InnerConfig(rank=4)
    torch.manual_seed(0)
    both = fastweights.init_fast(tiny_model, inner, 2 * 3, fastweights.row_seeds(World().rows(2)))
    torch.manual_seed(0)
    second = fastweights.init_fast(tiny_model, inner, 3,
                                   fastweights.row_seeds(World(rank=1, size=2).rows(1)))
    for k in both:
        assert torch.equal(second[k], both[k][3:]), k
    first_a = next(k for k in both if k.endswith(".A"))             # (B starts at 0)
    assert not torch.equal(both[first_a][:3], both[first_a][3:])


class Rank(World):
    """Rank `rank` of `size`, run in this process: its collectives recorded, the world's count of
    answer tokens given, and its gradients at the all-reduce kept (the test sums them)."""

    def __init__(self, rank: int, size: int, world_targets: int):
        super().__init__(rank=rank, size=size)
        self.world_targets, self.calls = world_targets, []

    def total(self, *counts):
        self.calls.append("total")
        return [self.world_targets]

    def sum_gradients(self, params, *values):
        self.calls.append("sum_gradients")
        self.grads, self.loss = [p.grad.clone() for p in params], values[0]
        return list(values)


@pytest.mark.parametrize("method", ["sft", "focusft"])
def test_the_ranks_gradients_sum_to_the_batchs_once_a_step(method):
    """Two micro-batches of 2 rows in one process, against ranks 0 and 1 of two with 1 row each
    (their own rows and fast weights): each rank counts the world's answers once, then runs its
    micro-batches with no collective between them, then reaches the one all-reduce with gradients
    and loss that sum to the one process's (fp32, to AGREE, each tensor against its norm)."""
    import contextlib
    args = config.get_args(RUN + ["--batch-size", "2"])
    config.apply_defaults(args)
    args.method, args.mask = method, "hybrid" if method == "focusft" else "causal"
    cfg, slots = config.data_config(args), training_step.fast_weight_slots(args)
    source, enc = batches.data_source(cfg), tokenizer.gpt2()

    def step(world: Rank, rows: int) -> Rank:
        part = replace(cfg, rows=rows, first_row=world.rows(rows).start)
        micro = [batches.to_device(batches.get_batch(part, enc, source, 0, m), "cpu", slots)
                 for m in range(args.grad_accum)]
        torch.manual_seed(0)                    # the same weights, and the same fast-weight draws
        model = GPT(preset("tiny", "sdpa"))
        training_step.optimizer_step(args, model, training_step.inner_config(args),
                                     training_step.make_optimizer(args, model), micro,
                                     contextlib.nullcontext(), world)
        return world
    targets = sum(int((batches.get_batch(cfg, enc, source, 0, m)["targets"] != -100).sum())
                  for m in range(args.grad_accum))
    whole, ranks = step(Rank(0, 1, targets), 2), [step(Rank(r, 2, targets), 1) for r in (0, 1)]
    assert all(r.calls == ["total", "sum_gradients"] for r in ranks)
    assert relative(ranks[0].loss + ranks[1].loss, whole.loss) < AGREE
    for g0, g1, want in zip(ranks[0].grads, ranks[1].grads, whole.grads):
        assert relative(g0 + g1, want) < AGREE
    assert relative(ranks[0].grads[0], whole.grads[0]) > 0.1        # each rank's alone is not


def test_a_run_resumes_only_on_as_many_processes(tmp_path, monkeypatch, capsys):
    """A run trained on one process, resumed under torchrun with two (rank 0 reads it), is refused
    in one line before any process group is formed; so is --device cuda:N for several ranks."""
    train.main(RUN + ["--method", "sft", "--batch-size", "2", "--steps", "2", "--stop-after", "1",
                      "--out", str(tmp_path)])
    for name, value in zip(("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"), "0202"):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as refused:
        train.main(["--resume", "--out", str(tmp_path)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: --resume: the run was trained on 1 process(es), this launch has 2: "
        "continue it on as many (its batch is theirs)")
    assert World.from_environment().problem("cuda:1", None).startswith("--device cuda:1: under")
    assert World().problem("cuda:1", None) is None
