"""A timed training step: train.py's own optimizer step (training_step.optimizer_step) on a
PRESETS model, SFT and FocuSFT on the same weights and the same batches, its time turned into
tokens/s, MFU and TFLOP/s of matmul work; `python -m bench`'s section 2 (`--sections training`) and
its GPU-free count (`--sections work`).

Three ideas to hold: the batches are built beforehand, so data generation is never timed; the first
(warm-up) steps compile, one graph per block variant, and are not counted; and the timed steps run
back to back, as train.py runs them: the host queues a step while the GPU runs the last, each timed
from the end of one step to the end of the next (the same steps one at a time give ms_alone).
FLOPs count only the (q, k) entries a batch's own mask allows (bench/flops.py).
"""
import os
import statistics
import time

import torch

import config as run_config  # train.py's command line (`config` below is an --attn-config)
import training_step
from attention import Kernels
from bench.flops import MODEL_FWD_BWD, allowed_causal, allowed_in_batch, attention_flops, batch_work
from bench.kernels import attn_config, free_memory
from data import batches, tokenizer
from model import GPT, preset
from model import autocast as model_autocast

# H200 (= H100 SXM) dense bf16 tensor-core peak, no sparsity: the MFU denominator
PEAK_FLOPS = 989e12
PROFILE_ROWS = 25  # --profile: kernels listed per configuration, by total GPU time
# the middle one: the mask's own cost
VARIANTS = (("sft", "causal"), ("sft", "hybrid"), ("focusft", "hybrid"))


def make_args(model: str, method: str, mask: str, ctx: int, steps: int, tokens: int,
              device: str = "cuda"):
    """train.py's arguments for one row: its defaults and checks, a batch of `tokens` // ctx
    rows; compiled flex in bf16 on the GPU, eager SDPA in fp32 on the CPU (--sections work)."""
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
    """Section 2: every variant of every model under every --attn-config timed on one set of
    batches per size; a row that fails (out of memory, an option this torch lacks) keeps its
    error."""
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
    """One row of section 2: a fresh model compiled in `warmup` steps, then the rest of
    `prebuilt` timed one at a time and back to back; with `profile` or `trace`, one more step
    profiled."""
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
