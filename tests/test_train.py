"""train.py end to end on the CPU: loss falls, checkpoints round-trip, resume is exact, bad input
fails cleanly.

Run: python -m pytest -q tests/test_train.py
"""
import itertools
import json
import math

import pytest
import torch
from conftest import SHARED, refused, write_checkpoint

import attention
import checkpoint
import config
import masks
import model
import steplog
import train
import training_step
from data import batches, packing, tokenizer
from model import GPT, preset

# ctx 512 fits only 0k BABILong samples
TINY = ["--ctx", "512", "--data", "synthetic", "--model", "tiny", "--device", "cpu",
        "--batch-size", "2", "--lr", "3e-3", "--inner-rank", "8", "--stats-every", "100"]


BABI_EN = SHARED / "data" / "babi" / "en"


def losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("method", ["focusft", "sft"])
def test_twenty_steps_loss_falls_and_checkpoint_is_written(tmp_path, method, capsys):
    train.main(TINY + ["--steps", "20", "--method", method, "--out", str(tmp_path)])
    got = losses(tmp_path)
    # the run ends by saying what it shows
    said = capsys.readouterr().out.split("summary: ")[1]
    assert said.startswith(f"loss {got[0]:.2f} -> {got[-1]:.2f} over steps 0-19; "
                           f"held-out answers right")
    assert len(got) == 20
    assert sum(got[-5:]) / 5 < 0.7 * sum(got[:5]) / 5
    # inner[0] is the loss of the base weights alone (fresh fast weights): it falls too
    if method == "focusft":
        base = [r["inner"][0] for r in map(json.loads, open(tmp_path / "log.jsonl"))
                if "inner" in r]
        assert sum(base[-5:]) / 5 < 0.7 * sum(base[:5]) / 5
    evals = [r["step"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "eval_acc" in r]
    # before training, and the trained model the checkpoint holds
    assert evals == [0, 20]
    ckpt = checkpoint.load(checkpoint.path(str(tmp_path)))       # weights_only=True
    assert ckpt["step"] == 19 and ckpt["config"]["args"]["method"] == method
    # fast weights are never saved
    assert not [k for k in ckpt["model"] if k.endswith((".A", ".B"))]
    state = ckpt["optimizer"]["state"]
    n_params = len(list(checkpoint.model_from(ckpt).parameters()))
    # optimizer holds base weights only
    assert len(state) == n_params
    assert ckpt["config"]["inner"]["rank"] == 8 and ckpt["config"]["model"]["n_layer"] == 4


# batches built in-line, or ahead in a worker process
@pytest.mark.parametrize("workers", ["0", "1"])
def test_resume_continues_exactly(tmp_path, workers):
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    common = TINY + ["--steps", "6", "--method", "focusft", "--workers", workers,
                     "--stats-every", "3"]
    train.main(common + ["--out", str(straight)])
    train.main(common + ["--out", str(chunked), "--stop-after", "3"])
    assert checkpoint.load(checkpoint.path(str(chunked)))["step"] == 2
    train.main(["--out", str(chunked), "--resume"])
    a = checkpoint.load(checkpoint.path(str(straight)))
    b = checkpoint.load(checkpoint.path(str(chunked)))
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses(straight) == losses(chunked)
    evals = lambda out: [r["step"] for r in map(json.loads, open(out / "log.jsonl"))
                         if "eval_acc" in r]
    # --stats-every 3: the resumed run does not repeat 3
    assert evals(chunked) == evals(straight) == [0, 3, 6]
    # a step's line waits for the next step's launch, never past an evaluation
    order = [("eval" if "eval_acc" in r else "step", r["step"])
             for r in map(json.loads, open(straight / "log.jsonl"))
             if "step" in r]
    assert order == [("eval", 0)] + [("step", i) for i in range(3)] + [("eval", 3)] + \
        [("step", i) for i in range(3, 6)] + [("eval", 6)]
    ms = [r["ms"] for r in map(json.loads, open(straight / "log.jsonl")) if "loss" in r]
    # each line times its own step, also the one before an evaluation (~10 ms here)
    assert min(ms) > 1
    # finished: nothing to do, nothing written
    train.main(["--out", str(chunked), "--resume"])
    assert (evals(chunked) == [0, 3, 6]
            and checkpoint.load(checkpoint.path(str(chunked)))["step"] == 5)
    # a worker builds the same batches
    if workers == "1":
        inline = tmp_path / "inline"
        train.main(TINY + ["--steps", "6", "--method", "focusft", "--workers", "0",
                           "--out", str(inline)])
        assert losses(inline) == losses(straight)
    # an earlier stop would corrupt the step
    with pytest.raises(SystemExit, match="not past"):
        train.main(["--out", str(chunked), "--resume", "--stop-after", "2"])
    # resume runs the recorded config only
    with pytest.raises(SystemExit, match="drop --steps"):
        train.main(["--out", str(chunked), "--resume", "--steps", "9"])


def test_a_failed_step_keeps_the_line_of_the_step_before_it(tmp_path, monkeypatch):
    """On a GPU a step's line is printed once the next step is queued; when that next step fails
    (here the fourth, on a CPU made to hold lines back as a GPU does), the line of the third is
    still written; and an interruption just after a line is written writes it once."""
    # a finished GPU step's end marker
    class Event:
        def synchronize(self):
            pass
    record, step_fn, calls = train.step_record, training_step.optimizer_step, []

    def held_back(*args):
        return {**record(*args), "done": Event()}
    def failing_step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("CUDA out of memory (faked)")
        return step_fn(*args)
    monkeypatch.setattr(train, "step_record", held_back)
    monkeypatch.setattr(train, "optimizer_step", failing_step)
    with pytest.raises(RuntimeError, match="faked"):
        train.main(TINY + ["--steps", "6", "--method", "sft", "--out", str(tmp_path / "fail")])
    logged = lambda out: [r["step"] for r in map(json.loads, open(out / "log.jsonl"))
                          if "loss" in r]
    assert logged(tmp_path / "fail") == [0, 1, 2]
    # ^C just after step 1's line is written: no line twice, none lost
    calls.clear()
    real_log = steplog.log_step

    def interrupted(total, log, step, since):
        now = real_log(total, log, step, since)
        if step["step"] == 1:
            raise KeyboardInterrupt
        return now
    monkeypatch.setattr(steplog, "log_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--steps", "6", "--method", "sft", "--out", str(tmp_path / "stop")])
    assert logged(tmp_path / "stop") == [0, 1, 2]


def test_resume_of_a_checkpoint_from_before_workers_existed(tmp_path):
    train.main(TINY + ["--steps", "2", "--stop-after", "1", "--out", str(tmp_path)])
    path = checkpoint.path(str(tmp_path))
    ckpt = checkpoint.load(path)
    del ckpt["config"]["args"]["workers"]
    torch.save(ckpt, path)
    train.main(["--out", str(tmp_path), "--resume"])
    assert checkpoint.load(path)["step"] == 1


def test_lm_objective_then_init(tmp_path):
    base = tmp_path / "base"
    train.main(TINY + ["--steps", "4", "--objective", "lm", "--out", str(base)])
    ckpt = checkpoint.load(checkpoint.path(str(base)))
    assert ckpt["config"]["args"]["mask"] == "causal" and ckpt["config"]["args"]["method"] == "sft"
    ft = tmp_path / "ft"
    train.main(TINY + ["--steps", "1", "--init", checkpoint.path(str(base)), "--out", str(ft),
                       "--lr", "1e-12"])
    after = checkpoint.load(checkpoint.path(str(ft)))["model"]
    # a 1e-12 step keeps the base weights
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(after[k], v, atol=1e-8, rtol=0)


def test_ablation_flags_reach_the_step(tmp_path):
    runs = {}
    for inner_loss in ("context", "response"):
        out = tmp_path / inner_loss
        train.main(TINY + ["--steps", "2", "--method", "focusft", "--mask", "causal",
                           "--inner-loss", inner_loss, "--inner-steps", "3", "--out", str(out)])
        runs[inner_loss] = [r["inner"] for r in map(json.loads, open(out / "log.jsonl"))
                            if "inner" in r]
        assert checkpoint.load(checkpoint.path(str(out)))["config"]["args"]["mask"] == "causal"
    # before each inner step, and after
    assert [len(i) for i in runs["context"]] == [4, 4]
    # a different inner loss was optimised
    assert runs["context"][0][0] != runs["response"][0][0]


@pytest.mark.parametrize("argv,needle", [
    (["--ctx", "0"], "--ctx"),
    (["--ctx", "-5"], "--ctx"),
    (["--method", "magic"], "--method"),
    (["--tasks", "qa1,qa9"], "qa9"),
    (["--steps", "-1"], "--steps"),
    (["--resume", "--out", "/nonexistent/run"], "no checkpoint"),
    (["--ctx", "abc"], "--ctx"),
    (["--objective", "lm", "--mask", "hybrid"], "hybrid"),
    (["--objective", "lm", "--method", "focusft"], "inner loop"),
    (["--flex-backend", "flash"], "serves --attn flex"),
    (["--stop-after", "-3"], "--stop-after"),
    (["--inner-rank", "0"], "--inner-rank"),
    (["--inner-clip", "-1"], "--inner-clip"),
    (["--lr", "-1"], "--lr"),
    (["--warmup", "5"], "--warmup"),
    (["--device", "gpu"], "--device"),
    (["--data", "synthetic", "--min-len", "8"], "--min-len"),
    (["--attn", "flex", "--flex-backend", "flash"], "flash-attn-4"),   # no such GPU here
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path, monkeypatch, capsys, argv, needle):
    """(In the process: tests/test_cli.py runs train.py's refusals as a process.)"""
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, train.main, ["--device", "cpu", "--out", str(tmp_path / "o"), *argv])
    assert needle in line and line.startswith("train.py: error:"), line
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_babilong_data_with_a_curriculum(tmp_path):
    args = config.get_args(["--data", "babilong", "--ctx", "8192", "--lengths", "0k,1k,2k,4k,16k",
                           "--steps", "10", "--curriculum", "1"])
    # the first half on 0k alone, then 1k, 2k, 4k one per stage over the other five steps; 16k never
    # fits 8192
    assert [batches.lengths_at(config.data_config(args), s) for s in range(11)] == [["0k"]] * 5 + [
        ["0k", "1k"], ["0k", "1k", "2k"], ["0k", "1k", "2k"], ["0k", "1k", "2k", "4k"],
        ["0k", "1k", "2k", "4k"], ["0k", "1k", "2k", "4k"]]
    # few steps: every length still arrives by the last one
    args.steps = 3
    assert batches.lengths_at(config.data_config(args), 2) == ["0k", "1k", "2k", "4k"]
    args.curriculum = 0
    assert batches.lengths_at(config.data_config(args), 0) == ["0k", "1k", "2k", "4k"]
    train.main(TINY + ["--ctx", "1024", "--steps", "2", "--data", "babilong", "--lengths", "0k,1k",
                       "--out", str(tmp_path)])
    assert len(losses(tmp_path)) == 2 and all(x == x for x in losses(tmp_path))
    assert checkpoint.load(checkpoint.path(str(tmp_path)))["config"]["args"]["data"] == "babilong"


@pytest.mark.skipif(not BABI_EN.is_dir(), reason="needs ../shared/data/babi")
def test_real_babi_stories_train_on_train_files_and_hold_out_test_files(monkeypatch):
    """--babi-dir: training batches draw stories from the bAbI train files, the held-out check from
    the test files, so the logged accuracy is on stories the model never trained on."""
    from data import babi, babilong
    args = config.get_args(["--data", "babilong", "--ctx", "1024", "--lengths", "0k",
                           "--tasks", "qa1,qa4", "--babi-dir", str(BABI_EN), "--device", "cpu",
                           "--batch-size", "1"])
    config.apply_defaults(args)
    source = batches.data_source(config.data_config(args))
    for split, file in (("train", "train"), ("eval", "test")):
        assert source[1][split]["qa4"] == babi.read_babi(babi.babi_file(str(BABI_EN), "qa4", file))
    drawn = []
    real_sample = babilong.training_sample
    monkeypatch.setattr(babilong, "training_sample",
                        lambda *a: drawn.append(a[6:]) or real_sample(*a))
    for split in ("train", "eval"):
        batches.get_batch(config.data_config(args), tokenizer.gpt2(), source, 0, 0, split)
        # generated stories: held out or not
        assert drawn[-1][0] is source[1][split] and drawn[-1][1] == split


def test_accumulated_micro_batches_weigh_every_answer_token_alike():
    """--grad-accum: the step's loss and gradient are those of one batch holding all the
    micro-batches' rows (a mean over all their target tokens), though the micro-batches hold
    different numbers of targets."""
    import contextlib

    from conftest import random_batch, tiny_config
    args = config.get_args(["--method", "sft", "--mask", "causal", "--device", "cpu",
                            "--model", "tiny", "--ctx", "90"])
    config.apply_defaults(args)
    torch.manual_seed(0)
    model = GPT(tiny_config())
    micro = [random_batch(B=1, S=90, seed=seed) for seed in (1, 2, 3)]
    answers = (micro[1]["targets"][0] != -100).nonzero()[:, 0]
    micro[1]["targets"][0, answers[:-3]] = -100             # few answers in the second micro-batch
    counts = [int((b["targets"] != -100).sum()) for b in micro]
    assert counts[1] == 3 and counts[0] > 3
    loss, inner = training_step.accumulate(args, model, training_step.inner_config(args),
                                           [batches.to_device(b, "cpu") for b in micro],
                                           contextlib.nullcontext())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    want = training_step.train_loss(args, model, training_step.inner_config(args), whole)[0]
    want.backward()
    assert math.isclose(loss, want.item(), rel_tol=1e-5) and inner.numel() == 0
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_resume_does_not_need_the_init_checkpoint_any_more(tmp_path):
    """--init is read when a run starts (config.init_model), never on --resume: a resumed run's
    recorded --init may be gone, a new run's may not."""
    gone = str(tmp_path / "gone.pt")
    argv = ["--device", "cpu", "--ctx", "512", "--data", "synthetic", "--init", gone]
    args = config.get_args(argv + ["--steps", "3", "--model", "tiny", "--out", str(tmp_path)])
    config.apply_defaults(args)
    args.method, args.mask = "focusft", "hybrid"
    # after step 0
    write_checkpoint(checkpoint.path(str(tmp_path)), GPT(preset("tiny", "sdpa")), vars(args))
    resumed, start_step, _, _ = config.from_command_line(["--resume", "--out", str(tmp_path)])
    assert resumed.init == gone and start_step == 1
    with pytest.raises(SystemExit, match="--init: no checkpoint"):
        config.from_command_line(argv + ["--out", str(tmp_path / "new")])


def test_evaluate_scores_each_answers_first_token():
    """eval_acc is measured at the positions that predict the first token of each answer, nowhere
    else."""
    from conftest import random_batch, tiny_config
    args = config.get_args(["--ctx", "70", "--device", "cpu", "--model", "tiny", "--min-len", "10"])
    config.apply_defaults(args)
    args.mask, args.method = "hybrid", "focusft"
    batch = random_batch(B=2, S=70)
    torch.manual_seed(0)
    model = GPT(tiny_config())
    lm, docs, valid = batch["loss_mask"], batch["document_ids"], batch["attention_mask"]
    # context -> answer, same doc
    starts = [(b, t) for b in range(2) for t in range(69)
              if lm[b, t] == 0 and lm[b, t + 1] == 1 and docs[b, t] == docs[b, t + 1]
              and valid[b, t + 1]]
    with torch.no_grad():
        out = train.evaluate(args, model, batch)
        x = model.blocks(model.wte(batch["idx"]), model.rope(batch["pos"]),
                         training_step.build_mask(args, masks.for_batch(args.mask, batch), 2),
                         range(4))
        logits = [model.lm_head(model.ln_f(x[b, t])) for b, t in starts]
        hits = [int(z.argmax() == batch["idx"][b, t + 1]) for z, (b, t) in zip(logits, starts)]
        # the answer's first token's cross-entropy, by hand
        nll = [float(z.logsumexp(-1) - z[batch["idx"][b, t + 1]])
               for z, (b, t) in zip(logits, starts)]
    assert out["eval_n"] == len(starts) == 4
    assert out["eval_acc"] == sum(hits) / len(hits)
    assert out["eval_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


@pytest.mark.parametrize("method,inner_loss", [("sft", "response"), ("focusft", "response"),
                                               ("focusft", "context")])
def test_target_positions_found_on_the_host_give_the_same_loss(method, inner_loss):
    """batches.to_device adds the flat positions that have a target ("target_index", and
    "context_index" for the "context" inner loss's own targets, so no loss waits on a device
    nonzero()); the step's outer and inner losses and gradients are those found without them, and
    each index is really what its loss reads (a wrong one changes it)."""
    from conftest import random_batch, tiny_config
    args = config.get_args(["--method", method, "--mask", "causal" if method == "sft" else "hybrid",
                            "--device", "cpu", "--model", "tiny", "--ctx", "90",
                            "--inner-rank", "4", "--inner-loss", inner_loss])
    config.apply_defaults(args)
    torch.manual_seed(0)
    model, inner = GPT(tiny_config()), training_step.inner_config(args)
    # the context targets built in train_loss
    plain = random_batch(B=2, S=90, seed=5)
    loaded = ({**plain, "context_targets": packing.context_targets(plain)}
              if inner_loss == "context" else plain)
    # ... or with the batch, as get_batch adds them
    moved = batches.to_device(loaded, "cpu")
    assert torch.equal(moved["target_index"], (plain["targets"].flatten() != -100).nonzero()[:, 0])
    assert ("context_index" in moved) == (inner_loss == "context")
    if inner_loss == "context":
        assert torch.equal(moved["context_index"],
                           (loaded["context_targets"].flatten() != -100).nonzero()[:, 0])

    def step(batch):
        torch.manual_seed(1)                                   # the same fresh fast weights
        model.zero_grad()
        loss, record = training_step.train_loss(args, model, inner, batch)
        loss.backward()
        inner_losses = torch.zeros(0) if record is None else record["losses"]
        return loss, inner_losses, [p.grad.clone() for p in model.parameters()]
    want, got = step(plain), step(moved)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        assert torch.equal(g, w)
    wrong = step({**moved, "target_index": moved["target_index"][:-1]})
    assert not torch.equal(wrong[0], want[0])
    # the response inner loss reads it too
    if method == "focusft":
        assert (want[1].numel() == 2 * 2
                and torch.equal(wrong[1], want[1]) == (inner_loss == "context"))
    # and the context inner loss reads its own
    if inner_loss == "context":
        wrong = step({**moved, "context_index": moved["context_index"][:-1]})
        assert not torch.equal(wrong[1], want[1])


def test_context_inner_loss_batches_carry_their_targets(tmp_path):
    """With --inner-loss context, get_batch adds each context token's next token as
    "context_targets" (what the inner loss would otherwise build on the device); other runs carry no
    such key."""
    for inner_loss, method in (("context", "focusft"), ("response", "focusft"), ("context", "sft")):
        args = config.get_args(TINY + ["--method", method, "--inner-loss", inner_loss,
                                       "--out", str(tmp_path)])
        config.apply_defaults(args)
        cfg = config.data_config(args)
        b = batches.get_batch(cfg, tokenizer.gpt2(), batches.data_source(cfg), 0, 0)
        assert ("context_targets" in b) == (inner_loss == "context" and method == "focusft")
        if "context_targets" in b:                                    # the slow way: token by token
            want = torch.full_like(b["idx"], -100)
            for r, t in itertools.product(range(b["idx"].size(0)), range(b["idx"].size(1) - 1)):
                if (b["document_ids"][r, t] == b["document_ids"][r, t + 1] >= 0
                        and b["loss_mask"][r, t + 1] == 0):
                    want[r, t] = b["idx"][r, t + 1]
            assert torch.equal(b["context_targets"], want) and (want != -100).sum() > 100


def test_a_new_run_does_not_overwrite_a_finished_one(tmp_path):
    """A second run into an --out that holds a checkpoint is refused (one line) unless it is
    --resume; the first run's checkpoint and log stay as they were."""
    train.main(TINY + ["--steps", "1", "--out", str(tmp_path)])
    log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(TINY + ["--steps", "2", "--out", str(tmp_path)])
    assert ((tmp_path / "log.jsonl").read_text() == log
            and checkpoint.load(checkpoint.path(str(tmp_path)))["step"] == 0)


def test_the_model_is_built_with_the_chosen_flex_backend(tmp_path, monkeypatch):
    """train.py builds the model with attention.BACKENDS[--flex-backend] (the FLASH case itself runs
    in tests/test_gpu.py, where flash-attn-4 is installed), and a resumed run with its own; the flag
    is this invocation's, not recorded as the run's method."""
    built = []
    monkeypatch.setitem(attention.BACKENDS, "triton", attention.Kernels(options={"marker": 1}))
    real_gpt = model.GPT.__init__

    def spy(self, cfg, kernels=attention.Kernels()):
        if torch.empty(0).device.type != "meta":    # checkpoint.problem's shape check: no model
            built.append(kernels)
        real_gpt(self, cfg, kernels)
    monkeypatch.setattr(model.GPT, "__init__", spy)
    train.main(TINY + ["--steps", "2", "--stop-after", "1", "--out", str(tmp_path)])
    train.main(["--out", str(tmp_path), "--resume"])
    assert built == [attention.BACKENDS["triton"]] * 2 and "flex_backend" in config.RUN_ONLY


def test_the_inner_loops_defaults_have_one_source():
    """Every inner-loop flag left open gives InnerConfig's own default (fastweights.py), the lr
    included with --init (the authors' values); from scratch only the lr differs."""
    from fastweights import InnerConfig
    for argv, lr in ((["--init", "x.pt"], InnerConfig.lr), ([], config.SCRATCH_INNER_LR)):
        args = config.get_args(argv + ["--device", "cpu"])
        config.apply_defaults(args)
        assert training_step.inner_config(args) == InnerConfig(lr=lr)


def test_init_defaults_to_the_authors_fine_tuning_rates():
    """With --init, AdamW's lr defaults to the authors' 1e-5 (with the inner lr at their 1.0);
    given, it stays."""
    for argv, lr in ((["--init", "x.pt"], config.FINETUNE_LR),
                     (["--init", "x.pt", "--lr", "3e-4"], 3e-4), ([], 3e-3)):
        args = config.get_args(argv + ["--device", "cpu"])
        config.apply_defaults(args)
        assert args.lr == lr and args.inner_lr == (1.0 if argv else config.SCRATCH_INNER_LR)
    assert config.FINETUNE_LR == 1e-5


@pytest.mark.parametrize("per", ["row", "sample"])
def test_the_logged_inner_loss_leaves_out_rows_without_targets(per):
    """A row with no answer has an inner loss of 0 (nothing to adapt to); the step's logged inner
    record is the mean over the groups (rows, or samples) that have one, here row 0's alone."""
    import contextlib

    from conftest import random_batch, tiny_config
    args = config.get_args(["--device", "cpu", "--model", "tiny", "--ctx", "90",
                            "--inner-rank", "4", "--inner-per", per, "--max-docs", "2"])
    config.apply_defaults(args)
    args.method, args.mask = "focusft", "hybrid"
    torch.manual_seed(0)
    model, inner = GPT(tiny_config()), training_step.inner_config(args)
    batch = random_batch(B=2, S=90, seed=5)                    # two samples a row
    batch["targets"][1] = -100
    moved = batches.to_device(batch, "cpu", training_step.fast_weight_slots(args))
    # the same fresh fast weights in both
    torch.manual_seed(1)
    _, logged = training_step.accumulate(args, model, inner, [moved], contextlib.nullcontext())
    torch.manual_seed(1)
    _, record = training_step.train_loss(args, model, inner, moved)
    # (steps + 2, G)
    values = torch.cat([record["losses"], record["after"][None], record["moved"][None]])
    used = [0] if per == "row" else [0, 1]                      # row 0, or row 0's two samples
    assert (values.size(1) == 2 * len(used)
            and record["has"].tolist() == [True] * len(used) + [False] * len(used))
    assert ((batch["targets"][0] != -100).any()
            and torch.equal(values[:2, len(used):], torch.zeros(2, len(used))))
    torch.testing.assert_close(logged, values[:, used].mean(dim=1).float())
