"""Speed on one GPU: attention kernels, SFT against FocuSFT training steps, evaluation decoding.

    python -m bench [--out bench.json]   # attention, training, eval (mostly compilation);
                                           tables + JSON
    python -m bench --quick            # smoke run: 8K only, few steps

1. attention fwd+bwd: flex under the hybrid mask, flex causal, SDPA causal (flash, the ceiling),
   SDPA with the hybrid mask as a dense bool tensor, and flex through FlashAttention-4's kernels
   where flash-attn-4 is installed (bench/kernels.py); 2. a whole training step from train.py's own
   pieces, same model and data for both methods; 3. generate.py's prefill and KV-cache decode; and,
   asked for with --sections tune, flex's forward and backward under each of several kernel options
   on a training batch's masks (bench/kernels.py), and with --sections work (no GPU), each step's
   matmul work.
   Two ideas to hold: FLOPs count only the (q, k) entries a mask allows, never the S x S square
   (bench/flops.py counts them); timed regions hold GPU work only (batches are built beforehand,
   compilation happens in warm-up), and training steps are timed back to back, as train.py runs
   them.
"""
import argparse
import datetime
import json
import os
import statistics
import time
import warnings

import torch

import eval_babilong
import generate
from attention import FLASH_INSTALL
from bench.kernels import (
    ATTN_CONFIGS,
    bench_attention,
    bench_tuning,
    flash_attn_version,
    free_memory,
)
from bench.steps import (
    PEAK_FLOPS,
    VARIANTS,
    bench_training,
    bench_work,
    preset_model,
    section_batches,
)
from cli import Parser, names, number, output_problem
from data import tokenizer
from model import PRESETS

SIZES = (8192, 16384, 32768)  # sequence lengths of sections 1 and 2: FocuSFT's long-context range
# "tune" and "work" run only when asked for
SECTIONS = ("attention", "tune", "training", "work", "eval")
# training batch * ctx, fixed so every size does the same token work (train.py's)
TOKENS_PER_STEP = 65536
MODELS = ("small", "qwen05b")  # PRESETS: the GPU default and Qwen2-0.5B's shape (the authors')
# the first steps compile (one graph per block variant); then median
WARMUP_STEPS, TIMED_STEPS = 3, 10
# prompt tokens of the evaluation section (multiples of generate.PAD_TO)
EVAL_PROMPTS = (8192, 32768)
EVAL_REPEATS = 3  # timed prefill + decode repeats (after one warm-up repeat that compiles)
# tokens decoded per repeat: the benchmark's answer budget
DECODE_TOKENS = eval_babilong.MAX_NEW_TOKENS
# --quick: enough to compile and run every path once
QUICK_WARMUP, QUICK_TIMED, QUICK_REPEATS = 2, 2, 1
FORMULAS = {
    "attention_flops": "fwd+bwd = 3.5 * 4 * A * head_dim * heads, A = allowed (q, k) entries of "
                       "the mask",
    "allowed_hybrid": "C*C + R*C + R*(R+1)/2 for C context then R response tokens; "
                      "causal: S*(S+1)/2",
    "mfu": "sum over the timed steps of (6 * n_params_non_embedding * tokens + 3 * 4 * A "
           "* head_dim * heads * "
           f"n_layer, A of the batch's own mask) / their summed time / {PEAK_FLOPS:.3g} "
           "(bf16 dense peak); model FLOPs as PaLM counts them (attention backward 2x forward, no "
           "recompute); tokens = batch * ctx, padding included; the same model FLOPs for both "
           "methods: FocuSFT's inner loop is overhead",
    "training_timing": "batches built before timing (data generation excluded); ms: median over "
                       "the timed steps run back to back as train.py runs them (end of one step "
                       "to the end of the next, the host queueing each while the GPU runs the "
                       "last); ms_alone: the same steps one at a time, synchronised before and "
                       "after",
    "work": "matmul FLOPs the step really does, inner loop included (flops.step_work); "
            "work_ratio = over causal SFT on the same batches: the ratio a perfectly efficient "
            "implementation would reach",
}


# --------------------------------------------------------------------------------------------------
# 1. attention kernels (and --sections tune), and the --attn-config compile settings:
# bench/kernels.py

# --------------------------------------------------------------------------------------------------
# 2. training steps (and --sections work): bench/steps.py

# --------------------------------------------------------------------------------------------------
# 3. evaluation: prefill and cached decoding

def bench_eval(prompts, repeats: int) -> list[dict]:
    """generate.py as eval_babilong runs it on a GPU: bf16 autocast, uncompiled blocks, compiled
    flex prefill, SDPA decode."""
    model = preset_model("small", 0).eval()
    rows = []
    for n in prompts:
        prompt = torch.randint(0, tokenizer.PAD_ID, (n,)).tolist()
        prefill, decode = [], []
        for r in range(repeats + 1):                  # repeat 0 compiles and is not counted
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, caches = generate.prefill(model, prompt, "hybrid", "cuda")
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                for i in range(DECODE_TOKENS):
                    token = int(logits[:tokenizer.PAD_ID + 1].argmax())  # greedy, as generate()
                    logits = generate.decode_step(model, token, n + i, caches, "cuda")
            torch.cuda.synchronize()
            if r:
                prefill.append(t1 - t0)
                decode.append((time.perf_counter() - t1) / DECODE_TOKENS)
        rows.append({"prompt_tokens": n, "prefill_ms": statistics.median(prefill) * 1e3,
                     "decode_ms_per_token": statistics.median(decode) * 1e3, "repeats": repeats})
        del caches
        free_memory()
    return rows


# --------------------------------------------------------------------------------------------------

def table(title: str, rows: list[dict], columns: list[str]):
    cells = [columns] + [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c))
                          for c in columns]
                         for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}\n" + "\n".join(" | ".join(c.rjust(w) for c, w in zip(line, widths))
                                     for line in cells))


def sizes_list(text: str) -> tuple[int, ...]:
    """--sizes: comma-separated positive sequence lengths."""
    return tuple(number(int, 1)(x) for x in text.split(","))


def attn_configs(text: str) -> list[str]:
    """--attn-config: comma-separated ATTN_CONFIGS names, each maybe joined with + (a+b)."""
    configs = text.split(",")
    unknown = sorted({part for config in configs for part in config.split("+")} - set(ATTN_CONFIGS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(ATTN_CONFIGS)} "
                                         "(a+b joins two)")
    return configs


def write_json(path: str, result: dict):
    """Temp file then rename: a crash never leaves half a file (written after every section)."""
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = Parser("python -m bench", __doc__)
    p.add_argument("--out", default="bench.json",
                   help="JSON file for every number (written atomically)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8K only, fewer steps and repeats")
    p.add_argument("--sections", type=names(SECTIONS), default="attention,training,eval",
                   help=f"which of {','.join(SECTIONS)} to run (each of the default ones fits in a "
                        "10-minute job on its own; tune: give one model and one size)")
    p.add_argument("--sizes", type=sizes_list, default=None,
                   help="sequence lengths of sections 1 and 2, e.g. 8192,16384; default: 8K-32K "
                        "(--quick: 8K)")
    p.add_argument("--models", type=names(sorted(PRESETS)), default=",".join(MODELS),
                   help="section 2's models (PRESETS names)")
    p.add_argument("--tokens", type=number(int, 1), default=TOKENS_PER_STEP,
                   help="section 2's tokens per step (batch = tokens // ctx; 8192 at 8K = the "
                        "authors' batch 1)")
    p.add_argument("--variants", type=names([f"{m}-{k}" for m, k in VARIANTS]),
                   default=",".join(f"{m}-{k}" for m, k in VARIANTS),
                   help="section 2's rows, a subset of the default (method-mask); ratios need "
                        "sft-causal")
    p.add_argument("--profile", action="store_true",
                   help="section 2: print the top GPU kernels of one more step")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="section 2: --profile, and that step's CPU and GPU timeline as "
                        "DIR/CONFIG/*.json (default: none)")
    p.add_argument("--attn-config", type=attn_configs, default="default",
                   help=f"section 2: how flex compiles, one or more of {','.join(ATTN_CONFIGS)} "
                        "(compared row by row); a+b joins two (b's kernel options win), e.g. "
                        "bwd-32x64-64x32-w4-s3+fwd-64x128")
    args = p.parse_args(argv)
    sections, models, configs = set(args.sections), args.models, args.attn_config
    # in VARIANTS' order: causal SFT first
    variants = [v for v in VARIANTS if f"{v[0]}-{v[1]}" in args.variants]
    problem = output_problem("--out", args.out, folder=False)
    if problem:
        p.error(problem)
    if sections - {"work"} and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (found none); only --sections work runs without one")
    sizes, prompts = (SIZES[:1], EVAL_PROMPTS[:1]) if args.quick else (SIZES, EVAL_PROMPTS)
    sizes = args.sizes or sizes
    warmup, timed, repeats = ((QUICK_WARMUP, QUICK_TIMED, QUICK_REPEATS) if args.quick else
                              (WARMUP_STEPS, TIMED_STEPS, EVAL_REPEATS))
    # one graph per shape, mask and grad mode: more than 8
    torch._dynamo.config.cache_size_limit = 64
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    flash = flash_attn_version()
    result = {"machine": {"gpu": gpu, "torch": torch.__version__, "flash_attn_4": flash},
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "quick": args.quick, "formulas": FORMULAS, "peak_flops": PEAK_FLOPS}
    print(f"{gpu}, torch {torch.__version__}, {result['date']}")
    print("  " + "\n  ".join(FORMULAS.values()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if "attention" in sections:
            if not flash:
                print(f"attention: no rows for flex's FLASH backend: it needs flash_attn.cute "
                      f"({FLASH_INSTALL}) and a Hopper or datacenter Blackwell GPU")
            result["attention"] = bench_attention(sizes)
            table("attention fwd+bwd, batch 1, bf16 (TFLOP/s on allowed entries)",
                  result["attention"],
                  ["S", "head_dim", "heads", "kernel", "ms", "tflops"] +
                  ["error"] * any("error" in r for r in result["attention"]))
            write_json(args.out, result)  # after every section: a crash keeps the rest
        if "tune" in sections:
            profiled = range(warmup + timed - 1, warmup + timed)  # the batch section 2 profiles
            result["tuning"] = [row for model in models for ctx in sizes for row in
                                bench_tuning(model, section_batches(model, ctx, profiled,
                                                                    args.tokens, "cuda")[0])]
            table(f"flex on a training batch's masks, {args.tokens} tokens: forward per kernel "
                  "option, backward with the model's and per backward option (TFLOP/s on allowed "
                  "entries; diff = vs the model's output)", result["tuning"],
                  ["model", "ctx", "batch", "mask", "options", "fwd_ms", "fwd_tflops", "bwd_ms",
                   "bwd_tflops", "diff", "error"])
            write_json(args.out, result)
        if "training" in sections:
            result["training"] = bench_training(sizes, models, warmup, timed, args.tokens,
                                                args.profile, configs, args.trace, variants)
            table(f"training step, {args.tokens} tokens, bf16, median of {timed} steps after "
                  f"{warmup} warm-up, back to back (ms_alone: one at a time), batches pre-built "
                  "(data generation excluded)",
                  result["training"],
                  ["model", "ctx", "batch", "config", "method", "mask", "ms", "ms_alone",
                   "tokens_per_s", "mfu", "work_tflops", "peak_gib", "ratio", "work_ratio"])
            write_json(args.out, result)
        if "work" in sections:
            result["work"] = bench_work(sizes, models, warmup, timed, args.tokens)
            table(f"matmul work of a training step, {args.tokens} tokens, over causal SFT on the "
                  "same batches",
                  result["work"], ["model", "ctx", "batch", "method", "mask", "work_tflop",
                                   "work_ratio"])
            write_json(args.out, result)
        if "eval" in sections:
            result["evaluation"] = bench_eval(prompts, repeats)
            table(f"evaluation, small model, bf16 as eval_babilong runs it: prefill + "
                  f"{DECODE_TOKENS} greedy tokens (median ms)", result["evaluation"],
                  ["prompt_tokens", "prefill_ms", "decode_ms_per_token"])
    result["unfused_flex_warnings"] = [str(w.message) for w in caught
                                       if "unfused" in str(w.message)]
    if result["unfused_flex_warnings"]:  # some flex call fell back to the S x S path
        print(f"WARNING: {len(result['unfused_flex_warnings'])} flex call(s) ran unfused: "
              "their numbers are wrong")
    write_json(args.out, result)
    print(f"\nwrote {args.out}")
