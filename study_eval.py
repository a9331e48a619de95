"""One model's evaluation in the study, as a command of its own: study.py runs one per model, beside
its training runs, and records each command so that any evaluation can be run again by hand.

    python study_eval.py --ckpt runs/study/arms/sft_s1/ckpt.pt --babilong runs/study/test_data \
        --cwe runs/study/cwe_data --lengths 0k,1k,2k,4k,8k,16k,32k --stats-lengths 4k,16k \
        --cwe-lengths 4k,8k,16k,32k --out runs/study/eval/sft_1.json

What it writes (one JSON file, whole or not at all): BABILong qa1-qa5 at every length under the
model's own mask and under the causal one (each answer and whether it is right, for paired tests);
sink mass, sink rate and engagement at the --stats-lengths, averaged over --stats-n samples; RULER
CWE at every --cwe-lengths under the model's own mask, with the same statistics per length; and the
seconds each part took (compilation included: the first call at each shape compiles) with the number
of graphs compiled.
"""
import shlex
import sys
import time
from pathlib import Path

import torch

import checkpoint
import eval_babilong
import eval_ruler
from cli import Parser, names, number, output_problem, refuse
from data import babilong, tokenizer
from model import autocast
from study_report import TASKS, mean, write_json

PROG = "study_eval.py"


def evaluate(model, enc, args, own: str, device: str, bos: bool) -> dict:
    """The whole evaluation of one loaded model (see the module's docstring)."""
    result = {"mask": own, "records": {}, "stats": {}, "seconds": {}}
    for mask in dict.fromkeys([own, "causal"]):     # one pass when the model's own is causal
        start = time.perf_counter()
        result["records"][mask] = [
            {"task": task, "length": length, "correct": r["correct"], "output": r["output"]}
            for length in args.lengths for task in TASKS
            for r in eval_babilong.evaluate(model, enc, babilong.read_hub(args.babilong, task,
                                                                          length),
                                            task, mask, device, bos=bos)]
        result["seconds"][f"babilong {mask}"] = time.perf_counter() - start
        start = time.perf_counter()
        result["stats"][mask] = {n: babilong_stats(model, enc, args, n, mask, device, bos)
                                 for n in args.stats_lengths}
        result["seconds"][f"stats {mask}"] = time.perf_counter() - start
    start = time.perf_counter()
    result["cwe"] = cwe_results(model, enc, args, own, device, bos)
    result["seconds"]["cwe"] = time.perf_counter() - start
    return result


def babilong_stats(model, enc, args, length: str, mask: str, device, bos: bool) -> dict:
    """Sink mass, sink rate and engagement, averaged over --stats-n test samples of one length (the
    tasks in turn)."""
    rows = [eval_babilong.length_stats(model, enc,
                                       babilong.read_hub(args.babilong, TASKS[i % 5],
                                                         length)[i // 5],
                                       TASKS[i % 5], mask, device, "trained", {}, bos=bos)
            for i in range(args.stats_n)]
    return {k: mean(r[k] for r in rows) for k in rows[0]}


def cwe_results(model, enc, args, mask: str, device, bos: bool) -> dict:
    """RULER CWE under one mask: each sample's score and output, and at each length the attention
    statistics averaged over its first --stats-n samples."""
    records, stats = [], {}
    for length in args.cwe_lengths:
        samples = eval_ruler.read_cwe(args.cwe, length)
        records += [{"length": length, "score": r["score"], "output": r["output"]}
                    for r in eval_ruler.evaluate(model, enc, samples, mask, device, bos)]
        rows = [eval_ruler.length_stats(model, enc, s, mask, device, bos)
                for s in samples[:args.stats_n]]
        stats[length] = {k: mean(r[k] for r in rows) for k in rows[0]}
    return {"records": records, "stats": stats}


def get_args(argv=None):
    p = Parser(PROG, __doc__)
    p.add_argument("--ckpt", required=True, help="the checkpoint to evaluate")
    p.add_argument("--babilong", required=True,
                   help="BABILong samples in the hub layout (eval_babilong.py --make-data)")
    p.add_argument("--cwe", required=True, help="RULER CWE samples (eval_ruler.py --make-data)")
    lengths = names(["0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k"])
    p.add_argument("--lengths", type=lengths, required=True, help="BABILong's test lengths")
    p.add_argument("--stats-lengths", type=lengths, required=True,
                   help="lengths of BABILong's attention statistics")
    p.add_argument("--stats-n", type=number(int, 1), default=5,
                   help="samples averaged for each length's attention statistics")
    p.add_argument("--cwe-lengths", type=lengths, required=True, help="CWE's test lengths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    problem = output_problem("--out", args.out, folder=False)
    if problem:
        p.error(problem)
    for flag, folder in (("--babilong", args.babilong), ("--cwe", args.cwe)):
        if not Path(folder).is_dir():
            p.error(f"{flag}: no folder {folder}")
    return args


def main(argv=None):
    args = get_args(argv)
    try:
        model, config = checkpoint.load_model(args.ckpt, args.device)
    except (FileNotFoundError, checkpoint.NotACheckpoint) as e:
        refuse(PROG, f"--ckpt: {e}")
    # compiled flex: one graph per (rows, padded length, mask)
    torch._dynamo.config.cache_size_limit = 64
    own, bos = config["args"]["mask"], bool(config["args"].get("bos"))
    start = time.perf_counter()
    with autocast(args.device, "bf16" if args.device.startswith("cuda") else "fp32"):
        result = evaluate(model, tokenizer.gpt2(), args, own, args.device, bos)
    result["seconds"]["all"] = time.perf_counter() - start
    # graphs dynamo compiled in this process (flex and its block masks, one per shape): where the
    # seconds above went, when they are many
    result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    result["command"] = shlex.join(["python", PROG, *(sys.argv[1:] if argv is None else argv)])
    # whole or not at all: a stopped evaluation leaves no file, and a rerun does it again
    write_json(Path(args.out), result)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()),
          flush=True)


if __name__ == "__main__":
    main()
