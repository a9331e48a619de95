r"""Evaluate a checkpoint on BABILong, scored by the benchmark's own rule.

    python eval_babilong.py --make-data babilong_data \
        --tasks qa1,qa2 --lengths 0k,1k,4k --n 50                   # build the data
    python eval_babilong.py --ckpt out/ckpt.pt --data babilong_data \
        --tasks qa1,qa2 --lengths 0k,1k,4k --n 50
    python eval_babilong.py --ckpt out/ckpt.pt --data hub \
        --revision <commit>                                         # the real benchmark (online)
    python eval_babilong.py --score outputs.csv --tasks qa1         # score a CSV of outputs

BABILong (Kuratov et al. 2024; booydar/babilong) hides bAbI facts in long haystack text and asks one
question. Two ideas to hold:
  1. Decoding is greedy with a KV cache (generate.py): a prompt is run once under the chosen mask
     (with `hybrid` it is one bidirectional context turn), then each new token attends to all of
     it. Samples are decoded in batches of one padded prompt size, generate.EVAL_TOKENS prompt
     tokens at most (`generate.decoding_batches`).
  2. The score is the official rule, quirks included (babilong_score.py): keep the output's first
     sentence (before the first '.'), lower-cased, cut at '<context>' / '<example>' (the official
     code also cuts at 'Question', which never matches after lower-casing); drop the task's labels
     that the question names; correct iff the target is the only label of the task left in it.
"""
import json
import math
import os
import random
import sys

import torch

import checkpoint
from babilong_score import TASK_LABELS, is_correct, last_mentioned, score_file
from cli import Parser, names, number, output_problem, progress, refuse
from config import device_problem
from data import babi, babilong, books, packing, tokenizer
from data.sample_files import read_hub_dataset, read_local
from data.tokenizer import NEWLINE
from generate import decode_all
from model import autocast as model_autocast
from stats import prompt_stats

MAX_NEW_TOKENS = 20                               # the benchmark's generation budget
OFFICIAL = ("{instruction}\n\n{examples}\n\n{post_prompt}\n\n<context>\n{context}\n</context>\n\n"
            "Question: {question}")
READING_TITLE = ("reading: accuracy where the baseline is wrong "
                 "(echoing the last-named label scores 0 here)")
PROG = "eval_babilong.py"                         # the name its refusals give


def read_samples(source: str, task: str, length: str, revision: str) -> list[dict]:
    """--data: samples from a local hub-layout folder, or (source "hub") from the hub itself;
    ValueError naming the file (or `--data hub`) if they are not the benchmark's samples."""
    if source == "hub":
        return read_hub_dataset(task, length, revision, "--data hub")
    return read_local(source, task, length)


def prompt_for(enc, sample: dict, task: str, style: str, parts: dict,
               bos: bool = False) -> list[int]:
    """Our training format, or the benchmark's official template
    (parts: instruction/examples/post_prompt); with `bos` (a model trained with train.py --bos 1),
    after the start-of-document token."""
    if bos:
        return [tokenizer.BOS_ID] + prompt_for(enc, sample, task, style, parts)
    if style == "trained":
        return packing.prompt_ids(enc, sample["input"], sample["question"])
    fill = {k: parts.get(task, {}).get(k, "") for k in ("instruction", "examples", "post_prompt")}
    text = OFFICIAL.format(**fill, context=sample["input"].strip(), question=sample["question"])
    return enc.encode_ordinary(text.strip())   # both strips as the benchmark's get_formatted_input


def evaluate(model, enc, samples: list[dict], task: str, mask_kind: str, device,
             style: str = "trained", parts: dict | None = None, tick=lambda: None,
             bos: bool = False) -> list[dict]:
    """Greedy answers to the samples, decoded in batches and scored, in the samples' order; tick()
    after each sample (the progress bar). A sample's seconds: its batch's time over the batch's
    rows."""
    records = [None] * len(samples)
    # our answers end at a newline
    stop = (NEWLINE, tokenizer.PAD_ID) if style == "trained" else (tokenizer.PAD_ID,)
    prompts = [prompt_for(enc, s, task, style, parts or {}, bos) for s in samples]
    for i, output, seconds in decode_all(model, enc, prompts, mask_kind, device, MAX_NEW_TOKENS,
                                         stop):
        s, guess = samples[i], last_mentioned(samples[i], task)
        records[i] = {**s, "output": output,
                      "correct": is_correct(s["target"], output, s["question"], task),
                      "last_mentioned": guess,
                      "baseline_correct": is_correct(s["target"], guess, s["question"], task),
                      "prompt_tokens": len(prompts[i]), "seconds": seconds}
        records[i].pop("input")
        tick()
    return records


def heatmap(acc: dict, tasks: list[str], lengths: list[str], path: str):
    """Task x length accuracy as a PNG (needs matplotlib; skipped with a note without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: heatmap skipped)")
        return
    # nan: no samples
    grid = [[math.nan if acc[t, n] is None else acc[t, n] for n in lengths] for t in tasks]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(lengths), 1 + 0.5 * len(tasks)))
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    p = Parser(PROG, __doc__)
    mode = "; default: none (one of --make-data, --ckpt, --score is needed)"
    p.add_argument("--make-data", metavar="DIR",
                   help="write samples in the hub layout DIR/data/qaN/LEN.json" + mode)
    p.add_argument("--ckpt", help="checkpoint to evaluate" + mode)
    p.add_argument("--data", default="babilong_data",
                   help="hub-layout folder to read, or 'hub' (needs datasets)")
    p.add_argument("--revision", default="main",
                   help="--data hub: the hub revision (a commit hash pins it)")
    p.add_argument("--prompt", choices=["trained", "official"], default="trained",
                   help="trained: the format models of this repo learn; "
                        "official: the benchmark's template")
    p.add_argument("--prompt-parts", default=None,
                   help="--prompt official: JSON {task: {instruction, examples, post_prompt}} "
                        "(default: empty)")
    p.add_argument("--score", metavar="CSV",
                   help="score a CSV of outputs (columns target, output, question)" + mode)
    p.add_argument("--tasks", type=names(TASK_LABELS), default="qa1,qa2,qa3,qa4,qa5",
                   help="comma-separated tasks")
    p.add_argument("--lengths", type=names(babilong.LENGTHS), default="0k,1k,2k,4k",
                   help="comma-separated lengths (Nk = N*1000 GPT-2 tokens)")
    p.add_argument("--n", type=number(int, 1), default=100, help="samples per task and length")
    p.add_argument("--haystack", default="synthetic",
                   help="--make-data haystack: synthetic, pg19 or a folder of .txt")
    p.add_argument("--babi-dir", default=None,
                   help="--make-data: real bAbI test files instead of the generator "
                        "(default: the generator)")
    p.add_argument("--mask", choices=["hybrid", "causal"], default=None,
                   help="prompt mask; default: as trained")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype of the model; default bf16 on cuda (as train.py trains), "
                        "fp32 on cpu")
    p.add_argument("--out", default=None,
                   help="folder for predictions.json and heatmap.png (default: beside --ckpt)")
    p.add_argument("--seed", type=int, default=0, help="seed of --make-data")
    args = p.parse_args(argv)
    if args.score:
        if len(args.tasks) != 1:
            p.error("--score needs exactly one task, e.g. --tasks qa5 (it picks the labels)")
        try:
            correct, total = score_file(args.score, args.tasks[0])
        except (OSError, ValueError) as e:
            p.error(f"--score: {e}")
        print(f"{args.tasks[0]}: {correct}/{total} = {correct / max(total, 1):.3f}")
        return
    if args.make_data is None and args.ckpt is None:
        p.error("give --make-data DIR, --ckpt CKPT or --score CSV")
    try:
        enc = tokenizer.gpt2()
    except RuntimeError as e:
        p.error(str(e))
    if args.make_data is not None:
        make_data(args, enc, args.tasks, args.lengths)
    else:
        run_eval(args, enc, args.tasks, args.lengths)


def make_data(args, enc, tasks, lengths):
    """--make-data: samples of every task and length, written only once everything they need has
    been read (a missing bAbI file or book folder leaves no files behind)."""
    problem = output_problem("--make-data", args.make_data)
    if problem:
        refuse(PROG, problem)
    try:
        hay = books.haystack(args.haystack, args.seed)
    except (OSError, ValueError, RuntimeError) as e:
        refuse(PROG, f"--haystack: {e}")
    try:
        stories = {t: babi.read_babi(babi.babi_file(args.babi_dir, t, "test"))
                      if args.babi_dir else None
                   for t in tasks}
    except (OSError, ValueError) as e:
        refuse(PROG, f"--babi-dir: {e}")
    budgets = [babilong.budget(n) for n in lengths if babilong.budget(n) > 0]
    # what every length fits
    max_facts = min(budgets) // babilong.TOKENS_PER_FACT if budgets else None
    for task in tasks:
        for length in lengths:   # the same questions at every length, in order
            questions = babilong.distinct_questions(random.Random(f"{args.seed}-{task}"), task,
                                                    stories[task], max_facts)
            # its haystack and where the facts go
            rng = random.Random(f"{args.seed}-{task}-{length}")
            samples = babilong.make_samples(enc, rng, task, length, args.n, hay,
                                            questions=questions)
            babilong.write_hub(args.make_data, task, length, samples)
            print(f"wrote {len(samples)} samples: {args.make_data}/data/{task}/{length}.json")


def reading_accuracy(records: list[dict]) -> float | None:
    """Accuracy on the samples the not-reading baseline gets wrong: echoing the last-named label
    scores 0 there, reading the facts scores as anywhere else. None if the baseline gets every
    sample right."""
    return mean([float(r["correct"]) for r in records if not r["baseline_correct"]])


def mean(values: list) -> float | None:
    """The mean of the values that exist (None: a cell without samples)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def cell(value: float | None) -> str:
    return f"{value:>7.2f}" if value is not None else f"{'-':>7}"


def run_eval(args, enc, tasks, lengths):
    """--ckpt: every input checked (--prompt-parts, then as checked_run: the device, --out, the
    checkpoint, every sample file) before the model is built or anything written; then the tables,
    predictions.json and heatmap.png."""
    parts = {}
    if args.prompt_parts:
        try:
            with open(args.prompt_parts) as f:
                parts = json.load(f)
        except (OSError, ValueError) as e:
            refuse(PROG, f"--prompt-parts: {e}")
    if not (isinstance(parts, dict) and all(isinstance(v, dict) for v in parts.values())):
        refuse(PROG, "--prompt-parts: expected a JSON object "
                     "{task: {instruction, examples, post_prompt}}")
    model, mask_kind, bos, autocast, todo, out = checked_run(PROG, args, lambda: {
        (t, n): read_samples(args.data, t, n, args.revision)[:args.n]
        for n in lengths for t in tasks})
    total, done, bar = sum(len(v) for v in todo.values()), 0, sys.stderr.isatty()
    def tick():   # a progress bar on a terminal (nothing in a log file); task, length: the loop's
        nonlocal done
        done += 1
        if bar:
            print(f"\r{progress(done, total)} {task} {length}", end="", file=sys.stderr, flush=True)
    acc, base, reading, records = {}, {}, {}, []
    for length in lengths:
        first = None
        for task in tasks:
            samples = todo[task, length]
            first = first or ((task, samples[0]) if samples else None)
            with autocast:
                recs = evaluate(model, enc, samples, task, mask_kind, args.device, args.prompt,
                                parts, tick, bos)
            acc[task, length] = mean([float(r["correct"]) for r in recs])   # None: no samples
            base[task, length] = mean([float(r["baseline_correct"]) for r in recs])
            reading[task, length] = reading_accuracy(recs)
            records += [{"task": task, "length": length, **r} for r in recs]
            sec = sum(r["seconds"] for r in recs) / max(len(recs), 1)
            if bar:                                 # wipe the bar's line before a result line
                print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
            print(f"{task} {length:>4}: acc{cell(acc[task, length])} over {len(recs)} "
                  f"({sec:.2f} s/sample)", flush=True)
        if first is None:
            continue
        with autocast:
            st = length_stats(model, enc, first[1], first[0], mask_kind, args.device, args.prompt,
                              parts, bos)
        print(f"{length:>4}: sink mass {st['sink_mass']:.3f} | sink rate {st['sink_rate']:.2f} | "
              f"engagement {st['engagement']:.3f}")
    for title, table in (("accuracy", acc),
                         ("baseline: the label named last in the context's bAbI facts", base),
                         (READING_TITLE, reading)):
        print(f"\n{title}\ntask  " + "".join(f"{n:>7}" for n in lengths))
        for t in tasks:
            print(f"{t:<6}" + "".join(cell(table[t, n]) for n in lengths))
        print("mean  " + "".join(cell(mean([table[t, n] for t in tasks])) for n in lengths))
    with open(os.path.join(out, "predictions.json.tmp"), "w") as f:
        json.dump(records, f, indent=1)
    os.replace(os.path.join(out, "predictions.json.tmp"), os.path.join(out, "predictions.json"))
    heatmap(acc, tasks, lengths, os.path.join(out, "heatmap.png"))
    print(f"wrote {out}/predictions.json")


def checked_run(prog: str, args, read) -> tuple:
    """What --ckpt evaluates, every input refused in one line naming its flag before the model is
    built or anything written: the device, --out (default: beside --ckpt), the checkpoint, then
    every sample file (read() -> the samples; all first, so a bad file fails before any work).
    Returns (model, mask, bos, autocast, samples, out): the mask the model trained with (or --mask),
    whether its prompts open with BOS as its training samples did, and the autocast of --dtype
    (default bf16 on cuda, as train.py trains)."""
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    problem = device_problem(args.device) or output_problem("--out", out)
    if problem:
        refuse(prog, problem)
    try:
        ckpt = checkpoint.load(args.ckpt)
    except checkpoint.NotACheckpoint as e:
        refuse(prog, f"--ckpt: {e}")
    try:
        samples = read()
    except (OSError, ValueError, RuntimeError) as e:
        refuse(prog, f"--data: {e}")
    model, recorded = checkpoint.model_for(ckpt, args.device), ckpt["config"]["args"]
    os.makedirs(out, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64             # one flex graph per (rows, padded size)
    autocast = model_autocast(args.device,
                              args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32"))
    return model, args.mask or recorded["mask"], bool(recorded.get("bos")), autocast, samples, out


@torch.no_grad()
def length_stats(model, enc, sample: dict, task: str, mask_kind: str, device, style: str,
                 parts: dict, bos: bool = False) -> dict:
    """Sink mass / engagement on one prompt (as evaluated) plus its target answer as the response
    turn."""
    return prompt_stats(model, prompt_for(enc, sample, task, style, parts, bos),
                        packing.answer_ids(enc, sample["target"]), mask_kind, device)


if __name__ == "__main__":
    main()
