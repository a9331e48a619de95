r"""The study: do FocuSFT's claims hold at our scale? One command trains and evaluates every arm of
the ablation.

    python study.py --out runs/study --books DIR --test-books DIR \
        --babi-dir ../shared/data/babi/en               # one GPU
    python study.py --quick --out runs/quick            # the whole pipeline on a CPU, tiny sizes
    CUDA_VISIBLE_DEVICES=0,1,2,3 python study.py \
        --out runs/study ...                            # the sweep and the arms over 4 GPUs

FocuSFT (arXiv 2605.09932) claims that fine-tuning a pretrained model with its hybrid mask and inner
loop moves attention off the sinks and onto the context, and that long-context accuracy rises. Its
premise is a base model whose attention drains into sinks, so the study first makes one. Stages,
each a folder of --out, skipped when it is there (run the command again to resume after a stop):

  base      a causal LM pretrained on book text (train.py --objective lm --data books --bos 1), then
            briefly on short BABILong and RULER CWE samples as text (so that it knows the question
            formats, as a pretrained model would); sink mass, sink rate and engagement on held-out
            books are logged as it trains
  sweep     the inner loop's learning rate (and steps), chosen on a validation split of the training
            distribution (held-out questions in held-out books), never on the test data: short
            FocuSFT runs from the base
  arms      from the base, the same data (BABILong and CWE samples, half each), seed and steps: SFT
            (causal), hybrid mask only, inner loop only, FocuSFT, and SFT given FocuSFT's time (more
            steps); SFT and FocuSFT with --seeds seeds
  eval      BABILong qa1-qa5 at 0k-32k (the bAbI test split in books no stage read), each model
            under its own mask and the causal one; attention statistics at 4K and 16K. RULER CWE
            (eval_ruler.py) at 4K-32K, each model under its own mask, with attention statistics at
            each length. One study_eval.py command per model, in eval/, started in the background
            as the model is ready: the base's beside the sweep, each arm's as it ends
  report    results.json, results.md (the tables) and PNG figures (study_report.py)

Ideas to hold: every training stage is a train.py command and every evaluation a study_eval.py
command (recorded in results.json, runnable by hand), and evaluation reads only the test books and
test stories; the arms differ only in their flags.
"""
import json
import math
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

import checkpoint
import eval_babilong
import eval_ruler
from cli import Parser, number, output_problem
from data import books, cwe
from fastweights import INNER_LOSSES
from study_plan import FULL, QUICK, STATS_LENGTHS, Plan, arm_folder, arm_names, with_changes
from study_report import log_records, markdown_table, mean, report, sweep_table, write_json
from study_runs import (
    FAILURES,
    INNER_STEP_COST,
    LM_STEP_COST,
    STOP,
    Clock,
    Evaluations,
    Slots,
    Stopped,
    on_signal,
    side_by_side,
    step_cost,
    train,
)

ROOT = Path(__file__).resolve().parent
# on a GPU, evaluations at once once training is over, per place of --parallel: an evaluation needs
# less GPU memory than a training run and leaves the GPU partly idle (compiling, decoding a token at
# a time), so more of them fit (one that runs out of memory runs again with fewer beside it)
EVALS_PER_PLACE = 2


def common(plan: Plan, args) -> list[str]:
    """Flags every run shares: the model, the rows, the books, the start-of-document token."""
    return ["--model", plan.model, "--ctx", str(plan.ctx), "--batch-size", str(plan.batch),
            "--haystack", args.books, "--bos", "1", "--stats-every", str(plan.stats_every),
            *plan.extra]


def stage_base(plan: Plan, args, out: Path, clock: Clock) -> dict:
    """Book text first (sinks grow here), then short BABILong samples as plain text (the question
    format)."""
    runs = {"books": train("base (book text)", out / "base_books", common(plan, args) + [
        "--objective", "lm", "--data", "books", "--steps", str(plan.base_steps),
        "--lr", str(plan.base_lr), "--weight-decay", str(plan.base_wd), "--seed", "0"], clock)}
    final = out / "base_books"
    if plan.qa_steps:
        runs["qa"] = train("base (short QA as text)", out / "base", common(plan, args) + [
            "--objective", "lm", "--data", plan.data, "--lengths", "0k,1k",
            "--steps", str(plan.qa_steps), "--lr", str(plan.base_lr / 3),
            "--init", str(final / checkpoint.FILE), "--seed", "0"], clock)
        final = out / "base"
    runs["checkpoint"] = str(final / checkpoint.FILE)
    runs["curve"] = [{k: r.get(k, math.nan)
                      for k in ("step", "sink_mass", "sink_rate", "sink_mass_64", "sink_rate_64")}
                     for r in log_records(out / "base_books") if "sink_mass" in r]
    return runs


def arm_flags(plan: Plan, args, base: str, seed: int, steps: int) -> list[str]:
    """Fine-tuning from the base on rows of plan.data, every length from the first step (the base
    has already learned the question format on short samples: no curriculum)."""
    return common(plan, args) + ["--init", base, "--data", plan.data,
                                 "--lengths", plan.train_lengths, "--curriculum", "0",
                                 "--steps", str(steps), "--lr", str(plan.arm_lr),
                                 "--seed", str(seed)]


def stage_sweep(plan: Plan, args, out: Path, base: str, clock: Clock,
                slots: Slots) -> dict:
    """Short FocuSFT runs, one per inner lr and number of inner steps, side by side. The answer
    accuracy of their last evaluation on the validation split (train.py's held-out rows: held-out
    questions in held-out books) decides, then the lower inner loss before adaptation; the
    validation loss is reported beside it, not used (so that studies before it choose alike). A run
    is named by its lr, and by its steps too where several are tried ("0.03x1")."""
    both = len(plan.sweep_inner_steps) > 1
    grid = {f"{lr:g}" + (f"x{k}" if both else ""): (lr, k)
            for lr in plan.sweep_lrs for k in plan.sweep_inner_steps}
    runs = side_by_side(slots, clock, {
        key: (f"sweep inner lr {lr:g}, {k} steps", out / f"lr{key}",
              arm_flags(plan, args, base, plan.seeds[0], plan.sweep_steps)
              + ["--method", "focusft", "--inner-lr", str(lr), "--inner-steps", str(k),
                 "--inner-loss", plan.inner_loss])
        for key, (lr, k) in grid.items()})
    for key, r in runs.items():
        records = log_records(out / f"lr{key}")
        last = [x for x in records if "eval_acc" in x][-1]
        # the last fifth
        tail = [x for x in records if x.get("inner")][-max(1, plan.sweep_steps // 5):]
        r.update(inner_lr=grid[key][0], inner_steps=grid[key][1],
                 val_acc=last["eval_acc"], val_n=last["eval_n"],
                 val_loss=last.get("eval_loss"),          # (logged since 2026-12-08)
                 inner_before=mean(x["inner"][0] for x in tail),
                 inner_after=mean(x["inner"][-1] for x in tail),
                 moved=mean(x["moved"] for x in tail))
    chosen = max(runs, key=lambda key: (runs[key]["val_acc"], -runs[key]["inner_before"]))
    return {"runs": runs, "chosen": grid[chosen][0], "chosen_steps": grid[chosen][1]}


ARMS = {   # name: train.py flags (the method's defaults: focusft = hybrid mask + inner loop)
    "sft": ["--method", "sft"],
    "hybrid": ["--method", "sft", "--mask", "hybrid"],
    "inner": ["--method", "focusft", "--mask", "causal"],
    "focusft": ["--method", "focusft"],
    "sft_time": ["--method", "sft"],             # as many steps as FocuSFT's time per step allows
}


def stage_arms(plan: Plan, args, out: Path, base: str, inner: list[str], clock: Clock,
               evals: Evaluations, evaluate) -> dict:
    """Every arm from the base; SFT and FocuSFT with each seed. The first seed's SFT and FocuSFT run
    first, each alone on the machine (the evaluations before them waited for): their median step
    times give sft_time its steps (SFT's times the ratio, FocuSFT's time per step); then the other
    arms side by side. `inner`: the sweep's choice, as flags of the arms with an inner loop. Each
    arm's evaluation starts as it ends (evaluate(name, checkpoint))."""
    def job(key: str, steps: int) -> tuple:
        name, seed = key.split("/")
        return (f"arm {name} seed {seed}", out / arm_folder(key),
                arm_flags(plan, args, base, int(seed), steps) + ARMS[name]
                + (inner if name in ("focusft", "inner") else []))

    def then(key: str):
        evaluate(key, str(out / arm_folder(key) / checkpoint.FILE))
    timed, rest = arm_names(plan)[:2], arm_names(plan)[2:]     # sft, focusft of the first seed
    one_card(plan, args, out, timed)
    if not all((out / arm_folder(key) / "done").exists() for key in timed):
        evals.idle()                               # timed alone: no evaluation beside them
    runs = {key: train(*job(key, plan.arm_steps), clock) for key in timed}
    for key in timed:
        then(key)
    ratio = runs[timed[1]]["median_ms"] / runs[timed[0]]["median_ms"]
    time_steps = max(plan.arm_steps, round(plan.arm_steps * ratio))
    runs |= side_by_side(evals.slots, clock,
                         {key: job(key, time_steps if key.startswith("sft_time/")
                                   else plan.arm_steps) for key in rest}, then)
    runs["time_ratio"] = ratio
    return runs


def one_card(plan: Plan, args, out: Path, timed: list[str]):
    """SFT given FocuSFT's time trains SFT's steps times the ratio of the timed pair's step times,
    so both must be timed on one kind of GPU: one kept from a study on another machine (its log says
    the card of each try, "unrecorded" before 2026-12-08) beside one to be timed here ends the study
    in one line, before either trains or is evaluated (unless that arm is done already)."""
    time_arm = next(key for key in arm_names(plan) if key.startswith("sft_time/"))
    if (out / arm_folder(time_arm) / "done").exists():
        return
    cards = set()
    for key in timed:
        folder = out / arm_folder(key)
        if (folder / "done").exists() or (folder / checkpoint.FILE).exists():   # steps it keeps
            cards |= {r.get("gpu", "unrecorded") for r in log_records(folder) if "config" in r}
        if not (folder / "done").exists():                                      # steps to come
            cards.add(torch.cuda.get_device_name() if device(args) == "cuda" else None)
    if len(cards) > 1:
        gone = [str(out / arm_folder(key)) for key in timed] + [
            str(eval_file(out.parent, key)) for key in timed]
        sys.exit(f"study.py: error: SFT and FocuSFT of seed {timed[0].split('/')[1]} would be "
                 f"timed on different GPUs ({', '.join(sorted(map(str, cards)))}; None: the CPU), "
                 f"and their step-time ratio sets the steps of SFT given FocuSFT's time: remove "
                 f"{', '.join(gone)} to train, time and evaluate both here")


def test_data(plan: Plan, args, out: Path) -> tuple[Path, Path]:
    """The test sets, made once (seconds, on the host): BABILong from the bAbI test split (or
    held-out generated questions) in the test books, and RULER CWE (no books, no stories)."""
    test_dir, cwe_dir = out / "test_data", out / "cwe_data"
    if not (test_dir / "done").exists():
        eval_babilong.main(["--make-data", str(test_dir), "--lengths", ",".join(plan.eval_lengths),
                            "--n", str(plan.eval_n), "--haystack", args.test_books, "--seed", "0"]
                           + (["--babi-dir", args.babi_dir] if args.babi_dir else []))
        (test_dir / "done").write_text("")
    if not (cwe_dir / "done").exists():
        eval_ruler.main(["--make-data", str(cwe_dir), "--lengths", ",".join(plan.cwe_lengths),
                         "--n", str(plan.cwe_n), "--seed", "0"])
        (cwe_dir / "done").write_text("")
    return test_dir, cwe_dir


def device(args) -> str:
    """Where the evaluations run: the GPU when there is one, but a --quick study stays on the
    CPU."""
    return "cuda" if torch.cuda.is_available() and not args.quick else "cpu"


def evaluator(plan: Plan, args, out: Path, evals: Evaluations):
    """submit(name, checkpoint): start one model's evaluation (study_eval.py) in the background:
    BABILong under its own mask and the causal one, attention statistics at STATS_LENGTHS, RULER
    CWE under its own mask, into out/eval/NAME.json."""
    test_dir, cwe_dir = test_data(plan, args, out)
    stats_at = [n for n in STATS_LENGTHS if n in plan.eval_lengths] or [plan.eval_lengths[-1]]

    def submit(name: str, ckpt: str):
        file = eval_file(out, name)
        evals.submit(name, f"eval {name}", [
            sys.executable, str(ROOT / "study_eval.py"), "--ckpt", ckpt,
            "--babilong", str(test_dir), "--cwe", str(cwe_dir),
            "--lengths", ",".join(plan.eval_lengths), "--stats-lengths", ",".join(stats_at),
            "--stats-n", str(plan.stats_n), "--cwe-lengths", ",".join(plan.cwe_lengths),
            "--out", str(file), "--device", device(args)], file)
    return submit


# --------------------------------------------------------------------------------------------------
# numbers

def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    def git(*argv):
        return subprocess.run(["git", *argv], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " with changes"                        # the files that ran are not that commit's
    return {"gpu": gpu, "cpu": platform.machine(), "torch": torch.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def rewrite_report(out: Path):
    """results.md and the figures again, from what a study recorded (e.g. after the report changed).
    A study cut short reports the stages it finished and the evaluations it wrote (eval/*.json)."""
    res = json.loads((out / "results.json").read_text())
    plan = Plan(**{k: tuple(v) if isinstance(v, list) and k != "extra" else v
                   for k, v in res["plan"].items()})
    if "eval" not in res:
        res["partial"] = True
        res["eval"] = evaluations(out, ["base", *arm_names(plan)])
    report(out, plan, res)
    print(f"wrote {out / 'results.md'} and the figures"
          + (f" ({len(res['eval'])} models evaluated: a study cut short)"
             if res.get("partial") else ""))


def eval_file(out: Path, name: str) -> Path:
    """Where a model's evaluation goes ("sft/1" -> out/eval/sft_1.json)."""
    return out / "eval" / f"{name.replace('/', '_')}.json"


def evaluations(out: Path, names: list[str]) -> dict[str, dict]:
    """The evaluations written in out/eval, of these models, in this order (those not written
    left out)."""
    files = {name: eval_file(out, name) for name in names}
    return {name: json.loads(file.read_text()) for name, file in files.items() if file.exists()}


# --------------------------------------------------------------------------------------------------

def get_args(argv=None):
    """The study's flags, every one checked before any stage runs (a bad one: one line,
    config.Parser's)."""
    p = Parser("study.py", __doc__)
    p.add_argument("--out", default="runs/study", help="folder of the study's stages and results")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes on the CPU: the pipeline, not the numbers")
    p.add_argument("--books", default="synthetic:0",
                   help="training text: a folder of .txt/.txt.gz books, pg19 (online) or "
                        "synthetic:SEED")
    p.add_argument("--test-books", default="synthetic:7",
                   help="the test haystack, books no stage reads: a folder, or synthetic:SEED "
                        "(other books)")
    p.add_argument("--babi-dir", default=None,
                   help="real bAbI files (their test split is the test set); default: none, "
                        "generated stories")
    p.add_argument("--parallel", type=number(int, 1), default=1,
                   help="commands at once on each GPU, train.py runs of the sweep and the arms "
                        "and evaluations alike (one GPU is shared; 1 = one at a time); given "
                        "several GPUs, they spread over them, each seeing one; one that runs "
                        "out of GPU memory beside others runs again with one fewer")
    p.add_argument("--until", choices=["base", "sweep"], default=None,
                   help="stop after this stage, its results in results.json (and the sweep's "
                        "table printed); the command without it goes on from there "
                        "(default: none, every stage)")
    p.add_argument("--report", action="store_true",
                   help="only rewrite results.md and the figures from --out's results.json and "
                        "logs (no training); a study cut short reports the models it evaluated")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change one size of the plan, e.g. --set arm_steps=500 "
                        "--set sweep_lrs=0.1,0.3 (repeatable)")
    args = p.parse_args(argv)
    try:
        args.plan = with_changes(QUICK if args.quick else FULL, args.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    if args.plan.inner_loss not in INNER_LOSSES:
        p.error(f"--set: inner_loss must be one of {', '.join(INNER_LOSSES)}, "
                f"not {args.plan.inner_loss!r}")
    problem = output_problem("--out", args.out)
    if problem:
        p.error(problem)
    if args.report and not (Path(args.out) / "results.json").is_file():
        p.error(f"--report: {args.out} is not a study's folder (no results.json)")
    if not args.report:
        other = other_plan(Path(args.out), args)
        if other:
            p.error(f"--out {args.out} holds a study of another plan ({other}): its finished "
                    f"stages would be reported beside this plan's; give that study's --quick "
                    f"and --set, or another --out")
    for flag, value in (("--books", args.books), ("--test-books", args.test_books)):
        if value.split(":")[0] not in ("synthetic", "pg19"):
            try:
                books.folder_books(value)
            except (FileNotFoundError, ValueError) as e:
                p.error(f"{flag}: {e}")
    if args.babi_dir and not Path(args.babi_dir).is_dir():
        p.error(f"--babi-dir: no folder {args.babi_dir}")
    try:
        for length in args.plan.cwe_lengths:
            cwe.budget(length)                      # a length CWE can be made at
        cwe.word_pool()                             # wonderwords' word lists, before any stage runs
    except (ValueError, RuntimeError) as e:
        p.error(f"CWE: {e}")
    return args


def other_plan(out: Path, args) -> str | None:
    """How the study already in `out` (its results.json, written once the base is done) differs
    from this command's plan: '' if it does not, None where there is none. A rerun skips every
    finished stage, so a changed plan (e.g. another eval_n, which makes other test samples) would
    pair evaluations of different samples."""
    try:
        recorded = json.loads((out / "results.json").read_text())
        was, quick = recorded["plan"], recorded["args"]["quick"]
    except (OSError, ValueError, KeyError, TypeError):
        return None                   # no study there yet (or not one: its stages check their own)
    now = json.loads(json.dumps(asdict(args.plan)))
    changed = [f"{k}: {now.get(k)!r} here, {was.get(k)!r} there" for k in {**was, **now}
               if now.get(k) != was.get(k)]
    if quick != args.quick:
        changed.insert(0, f"--quick {'here' if args.quick else 'there'}")
    return "; ".join(changed[:2]) + ("; ..." if len(changed) > 2 else "")


def main(argv=None):
    args = get_args(argv)
    # only the main thread may set signal handlers
    in_main = threading.current_thread() is threading.main_thread()
    before = ({s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
              if in_main else {})
    STOP.clear()
    FAILURES.clear()
    try:
        if args.report:
            rewrite_report(Path(args.out))
        else:
            run(args)
    except Stopped:
        if FAILURES:                   # a command failed and stopped the others: say the failure
            sys.exit(FAILURES[0])
        again = shlex.join(["python", "study.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"study.py: stopped: finished stages are kept and a run cut off resumes from its "
              f"checkpoint; continue with: {again}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def run(args):
    plan = args.plan
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = 2 * len(plan.seeds) + 3
    sweep_runs = len(plan.sweep_lrs) * len(plan.sweep_inner_steps)
    models = arms + 1                            # evaluated: the base and each arm
    # the work in SFT arms' steps, each step weighed by its cost (step_cost), an evaluation as one
    # arm (Clock; SFT given FocuSFT's time counted as FocuSFT's steps: its own are known once the
    # pair is timed)
    arm_units = sum(step_cost(ARMS["focusft" if name == "sft_time" else name])
                    for name in (key.split("/")[0] for key in arm_names(plan)))
    clock = Clock(1 + bool(plan.qa_steps) + sweep_runs + arms + models,
                  ((plan.base_steps + plan.qa_steps) * LM_STEP_COST
                   + sweep_runs * plan.sweep_steps * INNER_STEP_COST) / plan.arm_steps
                  + arm_units + models, unit_steps=plan.arm_steps)
    results = {"plan": asdict(plan), "args": {k: v for k, v in vars(args).items() if k != "plan"},
               "machine": machine()}
    results["base"] = stage_base(plan, args, out, clock)
    base = results["base"]["checkpoint"]
    write_json(out / "results.json", {**results, "partial": True})     # (--report: what is done)
    if args.until:
        if args.until == "sweep":
            results["sweep"] = stage_sweep(plan, args, out / "sweep", base, clock,
                                           Slots(args.parallel))
            print("\n".join(markdown_table(*sweep_table(plan, results["sweep"]))), flush=True)
        results["until"] = args.until
        write_json(out / "results.json", results)
        clock.say(f"stopped after the {args.until} stage (--until); wrote {out / 'results.json'}")
        return
    # the base's evaluation runs beside the sweep, each arm's as it ends (on a GPU)
    # (they share --parallel's places on the GPUs with the training runs)
    gpu = device(args) == "cuda"
    evals = Evaluations(Slots(args.parallel), clock, beside=gpu,
                        after=EVALS_PER_PLACE * args.parallel if gpu else 0)
    try:
        evaluate = evaluator(plan, args, out, evals)
        evaluate("base", base)
        sweep = results["sweep"] = stage_sweep(plan, args, out / "sweep", base, clock,
                                               evals.slots)
        write_json(out / "results.json", {**results, "partial": True})
        inner = (["--inner-lr", str(sweep["chosen"]), "--inner-loss", plan.inner_loss]
                 + (["--inner-steps", str(sweep["chosen_steps"])]
                    if len(plan.sweep_inner_steps) > 1 else []))
        results["arms"] = stage_arms(plan, args, out / "arms", base, inner, clock, evals,
                                     evaluate)
        write_json(out / "results.json", {**results, "partial": True})
        evals.wait()
    finally:
        evals.cancel()
    results["eval"] = evaluations(out, ["base", *arm_names(plan)])
    write_json(out / "results.json", results)
    report(out, plan, results)
    clock.say(f"wrote {out / 'results.json'}, {out / 'results.md'} and the figures")


if __name__ == "__main__":
    main()
