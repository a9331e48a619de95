"""Evaluate a checkpoint on RULER's common-words extraction (CWE), scored as RULER scores it.

    python eval_ruler.py --make-data ruler_data --lengths 4k,8k,16k --n 50     # build the data
    python eval_ruler.py --ckpt out/ckpt.pt --data ruler_data --lengths 4k,8k,16k --n 50

CWE (RULER, Hsieh et al. 2024) asks for the 10 most common words of a long numbered list: an
aggregation over the whole context, where BABILong asks for one needle (data/cwe.py builds the
samples: RULER's recipe, "Nk" = N*1024 GPT-2 tokens with room for the answer; docs/ruler.md says
what differs from RULER). Two ideas to hold:
  1. Decoding is eval_babilong.py's: the prompt in the training format under the model's mask, then
     greedy tokens from a KV cache, in batches, up to RULER's MAX_NEW_TOKENS, ending at the newline
     that ends a trained answer.
  2. The score is RULER's string_match_all (`score`): the share of the 10 words found anywhere in
     the output, case-insensitive; a word inside a longer one counts, as in RULER.
"""
import json
import os
import random

import torch

from cli import Parser, names, number, output_problem, refuse
from data import babilong, cwe, tokenizer
from data.packing import answer_ids
from data.sample_files import read_local
from data.tokenizer import NEWLINE
from eval_babilong import cell, checked_run, mean, prompt_for
from generate import decode_all
from stats import prompt_stats

MAX_NEW_TOKENS = cwe.GENERATE     # RULER's generation budget for CWE, left in every length
FIELDS = {"input": str, "question": str, "target": list}   # target: the 10 words
PROG = "eval_ruler.py"            # the name its refusals give
PREDICTIONS = "cwe_predictions.json"   # beside eval_babilong.py's predictions.json


def score(output: str, targets: list[str]) -> float:
    """RULER's string_match_all for one output: the share of the targets that occur in it, in any
    case (as a substring: "art" counts in "party")."""
    return sum(t.lower() in output.lower() for t in targets) / len(targets)


def read_cwe(root: str, length: str) -> list[dict]:
    """The samples of a length from a folder --make-data wrote; ValueError naming the file and the
    sample if they are not CWE samples (a target is a non-empty list of words)."""
    rows = read_local(root, cwe.TASK, length, FIELDS)
    bad = next((i for i, r in enumerate(rows)
                if not r["target"] or not all(isinstance(w, str) for w in r["target"])), None)
    if bad is not None:
        where = babilong.hub_path(root, cwe.TASK, length)
        raise ValueError(f"{where}[{bad}]: 'target' must be a list of words; found "
                         f"{rows[bad]['target']!r:.40}")
    return rows


def prompt(enc, sample: dict, bos: bool) -> list[int]:
    """The sample's prompt in the training format (after BOS for a model trained with it)."""
    return prompt_for(enc, sample, cwe.TASK, "trained", {}, bos)


def evaluate(model, enc, samples: list[dict], mask_kind: str, device,
             bos: bool = False) -> list[dict]:
    """Greedy answers to the samples, decoded in batches and scored, in the samples' order."""
    prompts = [prompt(enc, s, bos) for s in samples]
    records = [None] * len(samples)
    for i, output, seconds in decode_all(model, enc, prompts, mask_kind, device, MAX_NEW_TOKENS,
                                         (NEWLINE, tokenizer.PAD_ID)):
        records[i] = {"target": samples[i]["target"], "output": output,
                      "score": score(output, samples[i]["target"]),
                      "prompt_tokens": len(prompts[i]), "seconds": seconds}
    return records


def length_stats(model, enc, sample: dict, mask_kind: str, device, bos: bool = False) -> dict:
    """Sink mass / engagement on one prompt (as evaluated) plus its answer as the response turn."""
    return prompt_stats(model, prompt(enc, sample, bos),
                        answer_ids(enc, cwe.answer_text(sample["target"])), mask_kind, device)


def main(argv=None):
    p = Parser(PROG, __doc__)
    mode = "; default: none (one of --make-data, --ckpt is needed)"
    p.add_argument("--make-data", metavar="DIR",
                   help="write samples in BABILong's layout, DIR/data/cwe/LEN.json" + mode)
    p.add_argument("--ckpt", help="checkpoint to evaluate" + mode)
    p.add_argument("--data", default="ruler_data", help="--ckpt: the folder --make-data wrote")
    p.add_argument("--lengths", type=names(cwe.LENGTHS), default="4k,8k,16k",
                   help="comma-separated lengths (Nk = N*1024 GPT-2 tokens, the answer's included)")
    p.add_argument("--n", type=number(int, 1), default=100, help="samples per length")
    p.add_argument("--mask", choices=["hybrid", "causal"], default=None,
                   help="prompt mask; default: as trained")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype of the model; default bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", default=None,
                   help=f"folder for {PREDICTIONS} (default: beside --ckpt)")
    p.add_argument("--seed", type=int, default=0, help="seed of --make-data")
    args = p.parse_args(argv)
    if (args.make_data is None) == (args.ckpt is None):
        p.error("give one of --make-data DIR, --ckpt CKPT")
    try:
        enc = tokenizer.gpt2()
    except RuntimeError as e:
        p.error(str(e))
    (make_data if args.ckpt is None else run_eval)(args, enc)


def make_data(args, enc):
    """--make-data: every length's samples built before the first file is written (a length the
    word lists cannot fill, or no wonderwords, leaves no files behind)."""
    problem = output_problem("--make-data", args.make_data)
    if problem:
        refuse(PROG, problem)
    try:
        sets = {n: cwe.make_samples(enc, random.Random(f"{args.seed}-{cwe.TASK}-{n}"), n, args.n)
                for n in args.lengths}
    except (ValueError, RuntimeError) as e:
        refuse(PROG, str(e))
    for length, samples in sets.items():
        path = babilong.write_hub(args.make_data, cwe.TASK, length, samples)
        print(f"wrote {len(samples)} samples: {path}")


def run_eval(args, enc):
    """--ckpt: every input checked before the model is built or anything written (checked_run);
    then a line per length (score, attention statistics on its first sample), the table, and
    PREDICTIONS."""
    model, mask_kind, bos, autocast, todo, out = checked_run(PROG, args, lambda: {
        n: read_cwe(args.data, n)[:args.n] for n in args.lengths})
    scores, records = {}, []
    for length in args.lengths:
        samples = todo[length]
        with autocast:
            recs = evaluate(model, enc, samples, mask_kind, args.device, bos)
        scores[length] = mean([r["score"] for r in recs])              # None: no samples
        records += [{"length": length, **r} for r in recs]
        sec = sum(r["seconds"] for r in recs) / max(len(recs), 1)
        line = f"cwe {length:>4}: score{cell(scores[length])} over {len(recs)} ({sec:.2f} s/sample)"
        if samples:
            with autocast:
                st = length_stats(model, enc, samples[0], mask_kind, args.device, bos)
            line += (f" | sink mass {st['sink_mass']:.3f} | sink rate {st['sink_rate']:.2f} | "
                     f"engagement {st['engagement']:.3f}")
        print(line, flush=True)
    print("\nRULER CWE score: share of the 10 words in the output (string_match_all)\nlength"
          + "".join(f"{n:>7}" for n in args.lengths))
    print("score " + "".join(cell(scores[n]) for n in args.lengths))
    path = os.path.join(out, PREDICTIONS)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
