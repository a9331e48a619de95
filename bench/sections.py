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

import config as run_config  # train.py's command line (`config` below is an --attn-config)
import eval_babilong
import generate
import training_step
from attention import FLASH_INSTALL, Kernels
from bench.flops import MODEL_FWD_BWD, allowed_causal, allowed_in_batch, attention_flops, batch_work
from bench.kernels import (
    ATTN_CONFIGS,
    attn_config,
    bench_attention,
    bench_tuning,
    flash_attn_version,
    free_memory,
)
from cli import Parser, names, number, output_problem
from data import batches, tokenizer
from model import GPT, PRESETS, preset
from model import autocast as model_autocast

# H200 (= H100 SXM) dense bf16 tensor-core peak, no sparsity: the MFU denominator
PEAK_FLOPS = 989e12
SIZES = (8192, 16384, 32768)  # sequence lengths of sections 1 and 2: FocuSFT's long-context range
# "tune" and "work" run only when asked for
SECTIONS = ("attention", "tune", "training", "work", "eval")
# training batch * ctx, fixed so every size does the same token work (train.py's)
TOKENS_PER_STEP = 65536
PROFILE_ROWS = 25  # --profile: kernels listed per configuration, by total GPU time
# the middle one: the mask's own cost
VARIANTS = (("sft", "causal"), ("sft", "hybrid"), ("focusft", "hybrid"))
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
# 2. training steps

def make_args(model: str, method: str, mask: str, ctx: int, steps: int, tokens: int,
              device: str = "cuda"):
    system = ("--attn flex --compile 1 --dtype bf16" if device == "cuda"
              else "--attn sdpa --compile 0 --dtype fp32")
    args = run_config.get_args(f"--model {model} --method {method} --mask {mask} --ctx {ctx} "
                               f"--steps {steps} --batch-size {max(1, tokens // ctx)} "
                               f"--device {device} --curriculum 0 {system}".split())
    run_config.apply_defaults(args)
    run_config.check_args(args)
    return args


def preset_model(name: str, seed: int, kernels: Kernels = Kernels()) -> GPT:
    """A PRESETS model on the GPU with flex attention run by `kernels`, seeded (the same weights for
    SFT and FocuSFT)."""
    torch.manual_seed(seed)
    return GPT(preset(name, "flex"), kernels).cuda()


def section_batches(model: str, ctx: int, steps: range, tokens: int, device: str) -> list[dict]:
    """train.py's batches of these steps, the same for every model and method (the data depend on
    neither), with each sample's fast-weight slot marked: FocuSFT's rows time per-sample fast
    weights, train.py's default."""
    args = make_args(model, "sft", "causal", ctx, steps.stop, tokens, device)
    cfg = run_config.data_config(args)
    source = batches.data_source(cfg)
    return [batches.to_device(batches.get_batch(cfg, tokenizer.gpt2(), source, step, 0), device,
                              cfg.docs_per_row)
            for step in steps]


def bench_training(sizes, models, warmup: int, timed: int, tokens: int, profile: bool,
                   configs=("default",), trace: str | None = None, variants=VARIANTS) -> list[dict]:
    rows = []
    for ctx in sizes:
        prebuilt = section_batches(models[0], ctx, range(warmup + timed), tokens, "cuda")
        for name, config in ((n, c) for n in models for c in configs):
            base = None  # the causal SFT row, if timed: ratios are over it
            for method, mask in variants:
                args = make_args(name, method, mask, ctx, warmup + timed, tokens)
                row = {"model": name, "ctx": ctx, "batch": args.batch_size, "config": config,
                       "method": method, "mask": mask}
                try:
                    with attn_config(config) as kernels:
                        row.update(time_steps(args, prebuilt, warmup, kernels, profile,
                                              trace and os.path.join(trace, config)))
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                except Exception as e:  # noqa: BLE001 (a configuration this torch lacks fails
                                        # alone, in the table)
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                if (method, mask) == VARIANTS[0] and "ms" in row:
                    base = row
                # over plain causal SFT: measured time, and matmul work (the floor)
                if base and "ms" in row:
                    row["ratio"], row["work_ratio"] = (row["ms"] / base["ms"],
                                                       row["work"] / base["work"])
                rows.append(row)
                print(f"  {name} ctx {ctx} {config} {method} {mask}: " +
                      (f"{row['ms']:.1f} ms ({row['ms_alone']:.1f} alone)" if "ms" in row
                       else row["error"]), flush=True)
                free_memory()
        del prebuilt
    return rows


def bench_work(sizes, models, warmup: int, timed: int, tokens: int) -> list[dict]:
    """Section 2's matmul work and work ratios with no GPU: the same batches (those of the timed
    steps), FLOPs counted, nothing run. The ratio a perfect implementation of each variant would
    reach."""
    rows = []
    for ctx in sizes:
        timed_batches = section_batches(models[0], ctx, range(warmup, warmup + timed), tokens,
                                        "cpu")
        allowed = {mask: statistics.mean(allowed_in_batch(b, mask == "hybrid")
                                         for b in timed_batches)
                   for mask in ("causal", "hybrid")}
        for name in models:
            work = {}
            for method, mask in VARIANTS:  # VARIANTS[0], causal SFT, is the denominator
                args = make_args(name, method, mask, ctx, warmup + timed, tokens, "cpu")
                work[method, mask] = batch_work(args, preset(name, "sdpa"),
                                                training_step.inner_config(args), allowed[mask])
                rows.append({"model": name, "ctx": ctx, "batch": args.batch_size, "method": method,
                             "mask": mask,
                             "work_tflop": work[method, mask] / 1e12,
                             "work_ratio": work[method, mask] / work[VARIANTS[0]]})
    return rows


def time_steps(args, prebuilt, warmup: int, kernels: Kernels = Kernels(), profile: bool = False,
               trace: str | None = None) -> dict:
    model, inner = preset_model(args.model, args.seed, kernels), training_step.inner_config(args)
    for block in model.h:  # as train.main: compiled blocks, one graph per shape
        block.compile(dynamic=False)
    optimizer, autocast = (training_step.make_optimizer(args, model),
                           model_autocast(args.device, args.dtype))
    def step(batch):                                # train.py's step, one micro-batch
        torch.compiler.cudagraph_mark_step_begin()  # --attn-config cudagraphs: a new step (a no-op
                                                    # otherwise)
        training_step.optimizer_step(args, model, inner, optimizer, [batch], autocast)

    assert warmup >= 1, "the back-to-back timing starts from the end of a warm-up step"
    for batch in prebuilt[:warmup]:                                 # the warm-up steps compile
        step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    alone = []  # each timed step alone: nothing queued before it, waited for after
    for batch in prebuilt[warmup:]:
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        alone.append(time.perf_counter() - t0)
    # the same steps back to back, as train.py runs them: the host queues a step while the GPU runs
    # the last; timed from the end of one step to the end of the next (the first, a warm-up batch,
    # only starts it)
    ends = []
    for batch in prebuilt[warmup - 1:]:
        step(batch)
        ends.append(torch.cuda.Event(enable_timing=True))
        ends[-1].record()
    torch.cuda.synchronize()
    times = [a.elapsed_time(b) / 1e3 for a, b in zip(ends, ends[1:])]   # s, one per timed batch
    sec = statistics.median(times)
    if profile or trace:  # where one more step's GPU time goes
        activities = ([torch.profiler.ProfilerActivity.CUDA]
                      + [torch.profiler.ProfilerActivity.CPU] * bool(trace))
        with torch.profiler.profile(activities=activities) as prof:
            step(prebuilt[-1])
            torch.cuda.synchronize()
        averages = prof.key_averages()
        print(f"  profile, {args.model} {args.method} {args.mask}:\n" +
              averages.table(sort_by="self_cuda_time_total", row_limit=PROFILE_ROWS), flush=True)
        # kernels, copies
        on_gpu = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in on_gpu:                                           # the attention kernels, per call
            if "flex_attention" in e.key:
                print(f"    {e.key[:90]}: {e.count} calls, "
                      f"{e.self_device_time_total / e.count / 1e3:.3f} ms each")
        busy = sum(e.self_device_time_total for e in on_gpu) / 1e3  # ms (one stream: no overlap)
        print(f"    GPU busy {busy:.1f} ms of the median step's {sec * 1e3:.1f} ms", flush=True)
        if trace:  # the CPU and GPU timelines (chrome://tracing)
            os.makedirs(trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(
                trace, f"{args.model}_{args.ctx}_{args.method}_{args.mask}.json"))
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    # lm_head is tied to wte
    n_params = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel()
    tokens = args.batch_size * args.ctx  # every position, padding too
    # per timed batch
    allowed = [allowed_in_batch(b, args.mask == "hybrid") for b in prebuilt[warmup:]]
    model_flops = [6 * n_params * tokens
                   + attention_flops(a, head_dim, cfg.n_head, MODEL_FWD_BWD) * cfg.n_layer
                   for a in allowed]
    work = [batch_work(args, cfg, inner, a) for a in allowed]
    return {"ms": sec * 1e3, "ms_alone": statistics.median(alone) * 1e3,
            "tokens_per_s": tokens / sec,
            "mfu": sum(model_flops) / sum(times) / PEAK_FLOPS,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "n_params_non_embedding": n_params,
            "allowed_fraction": statistics.mean(allowed)
                                / (args.batch_size * allowed_causal(args.ctx)),
            "work": statistics.mean(work), "work_tflops": sum(work) / sum(times) / 1e12}


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
