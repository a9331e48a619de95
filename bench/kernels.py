"""Attention kernels on one GPU: flex_attention under FocuSFT's masks against SDPA, and flex's
kernel options.

`python -m bench`'s section 1 (`--sections attention`: forward + backward of flex under the hybrid
mask, flex causal, SDPA causal = flash, the ceiling, SDPA with the hybrid mask as a dense bool
tensor, and flex through FlashAttention-4's kernels where flash-attn-4 is installed) and its tuning
section (`--sections tune`: flex's forward, then its backward, under each of several kernel options
on a real training batch's masks), and ATTN_CONFIGS: the ways `python -m bench --attn-config`
compiles the model's attention. Two ideas to hold: FLOPs count only the (q, k) entries a mask
allows, never the S x S square (bench/flops.py counts them), and flex is always timed compiled
(eager flex materialises the scores).
"""
import contextlib
import gc

import torch
import torch.nn.functional as F

import masks
from attention import BACKENDS, HEAD64_TILES, Kernels, flash_backend_available, flex, gqa_kv
from bench.flops import FWD_BWD, allowed_causal, allowed_hybrid, allowed_in_batch, attention_flops
from model import preset

CONTEXT_PERCENT = 90  # attention benchmark rows: the first 90 % context, the rest one response turn
HEAD_SHAPES = ((64, 16), (128, 8))  # (head dim, heads), both 1024 wide: the NOTES.md kernel shapes
# the forward's tiles: BLOCK_M (queries) x BLOCK_N (keys), warps, stages; each also an --attn-config
FWD_TILES = {
    f"fwd-{m}x{n}-w{w}-s{st}": {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_warps": w,
                                "fwd_num_stages": st}
    for m, n, w, st in ((128, 128, 8, 2), (128, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
                        (64, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4))}
# flex through FlashAttention-4's kernels (attention.flash_backend_available)
FLASH = BACKENDS["flash"].options
# --sections tune: flex kernel_options tried on a training batch's own masks, forward alone.
TUNE_OPTIONS = {
    "model": None,                         # what the model uses (Kernels().flex_options)
    "torch": {},                           # torch's tiles for this head size and GPU
    **FWD_TILES,
    "PRESCALE_QK": {"PRESCALE_QK": True},  # fold 1/sqrt(d) into q: fewer multiplies, more rounding
    "USE_TMA": {"USE_TMA": True},          # Hopper's bulk tensor copies for the K/V tiles
}   # Left out, as packed rows break their promise: BLOCKS_ARE_CONTIGUOUS (the partial blocks at a
    # document's start and its turn's end are not adjacent) and ROWS_GUARANTEED_SAFE (padding rows
    # see nothing)
# --sections tune: the backward's tiles, on top of the model's forward options. M1 x N1 = the dK/dV
# programs' query x key tiles, M2 x N2 the dQ programs'. The first is torch's on an H100/H200 at
# head size <= 128; the "model" row's backward is attention.HEAD64_TILES' (64 x 64 both, 4 warps, 3
# stages) at head size 64. Each is also a `python -m bench --attn-config`.
BWD_TUNE_OPTIONS = {
    f"bwd-{m1}x{n1}-{m2}x{n2}-w{w}-s{st}": {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1,
                                             "bwd_BLOCK_M2": m2, "bwd_BLOCK_N2": n2,
                                             "bwd_num_warps": w, "bwd_num_stages": st}
    for m1, n1, m2, n2, w, st in ((64, 128, 128, 64, 8, 3), (64, 128, 128, 64, 4, 3),
                                  (64, 128, 128, 64, 8, 2), (32, 128, 128, 32, 4, 3),
                                  (32, 64, 64, 32, 4, 3))}
# --attn-config: how the model's attention compiles: (inductor config, attention.Kernels fields)
ATTN_CONFIGS = {
    # the model's choices (attention.Kernels' defaults)
    "default": ({}, {}),
    # torch's own tiles at every head size
    "torch": ({}, {"options": {}}),
    # q/k/v's view, split, RoPE out of flex
    "no-prologue": ({"prologue_fusion": False}, {"options": {}}),
    # max-autotune's pick, 4 warps
    "fwd-64x128": ({}, {"options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128}}),
    # the tuning section's forward tiles (torch's backward) and backward tiles
    # (bwd-M1xN1-M2xN2-wW-sS), the same way
    **{name: ({}, {"options": fwd}) for name, fwd in FWD_TILES.items()},
    **{name: ({}, {"options": {**HEAD64_TILES, **bwd}})
       for name, bwd in BWD_TUNE_OPTIONS.items()},
    # GQA's K/V repeated per query head
    "expand-kv": ({}, {"expand_kv": True}),
    # flex's own GQA in the backward too
    "shared-kv": ({}, {"expand_kv": False}),
    # compiled graphs launch their kernels from C++, not Python: less host time
    "cpp-wrapper": ({"cpp_wrapper": True}, {}),
    # independent kernels of a graph launched as one (the inner update's 54 tensors)
    "combo-kernels": ({"combo_kernels": True}, {}),
    # each compiled graph replayed as a CUDA graph (torch.compile's reduce-overhead)
    "cudagraphs": ({"triton.cudagraphs": True}, {}),
    # flash-attn-4's CuTe kernels (needs flash_attn.cute, not a requirement)
    "flash-backend": ({}, {"options": FLASH}),
    # inductor times candidate tiles for every kernel (slow compile)
    "max-autotune": ({"max_autotune": True}, {"options": {}}),
    # flex's tiles timed, matmuls left to cuBLAS (shorter compile)
    "autotune-flex": ({"max_autotune": True, "max_autotune_gemm_backends": "ATEN"},
                      {"options": {}}),
}
BENCH_WARMUP_MS, BENCH_REP_MS = 100, 500  # do_bench budgets: enough repetitions for a stable median


def qkv(S: int, head_dim: int, heads: int, kv_heads: int = 0, batch: int = 1):
    """Random bf16 q (batch, nh, S, hs) and k, v (batch, kv_heads or nh, S, hs) that require grad,
    and an upstream gradient dy shaped like q."""
    shapes = [(batch, heads, S, head_dim)] + [(batch, kv_heads or heads, S, head_dim)] * 2
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for shape in shapes)
    return q, k, v, torch.randn(batch, heads, S, head_dim, device="cuda", dtype=torch.bfloat16)


def median_ms(fn) -> float:
    """Median milliseconds of fn() by triton's do_bench (call fn once first if it compiles)."""
    from triton.testing import do_bench  # GPU path only: triton need not exist on a CPU machine
    return do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median")


def fwd_bwd_ms(attn, q, k, v, dy) -> float:
    """Median milliseconds of attn's forward and backward (the first call compiles and is not
    timed)."""
    def fwd_bwd():
        torch.autograd.grad(attn(q, k, v), (q, k, v), dy)
    fwd_bwd()
    return median_ms(fwd_bwd)


def hybrid_row(S: int):
    """One row of CONTEXT_PERCENT context then one response turn: its mask_mod and allowed
    entries."""
    C = S * CONTEXT_PERCENT // 100
    return (masks.hybrid((torch.arange(S, device="cuda") >= C).long()[None]),
            allowed_hybrid(C, S - C))


def tiles(q) -> dict | None:  # the kernel options the model would use at q's head size
    return Kernels().flex_options(q.shape[-1])


def flash_attn_version() -> str | None:
    """flash-attn-4's version where flex can use its kernels (attention.flash_backend_available),
    else None."""
    if not flash_backend_available():
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("flash-attn-4")
    except PackageNotFoundError:  # importable, but installed without metadata
        return "unknown"


def bench_attention(sizes) -> list[dict]:
    rows = []
    for S in sizes:
        hybrid_mod, hybrid_n = hybrid_row(S)
        hybrid_bm = masks.block_mask(hybrid_mod, 1, S, "cuda")  # compiled, O(S) memory
        causal_bm = masks.block_mask(masks.causal(), 1, S, "cuda")
        dense = masks.dense_mask(hybrid_mod, 1, S, "cuda")  # (1, 1, S, S) bool
        sdpa, causal_n = F.scaled_dot_product_attention, allowed_causal(S)
        # the compiled flex under bm, with the model's options unless given
        def flex_on(bm, options=None):
            return lambda q, k, v: flex(q)(q, k, v, block_mask=bm,
                                           kernel_options=options or tiles(q))
        kernels = {  # name: (attention(q, k, v), allowed entries)
            "flex hybrid": (flex_on(hybrid_bm), hybrid_n),
            "flex causal": (flex_on(causal_bm), causal_n),
            "sdpa causal (flash)": (lambda q, k, v: sdpa(q, k, v, is_causal=True), causal_n),
            "sdpa dense hybrid": (lambda q, k, v, dense=dense: sdpa(q, k, v, attn_mask=dense),
                                  hybrid_n),
        }
        if flash_backend_available():  # flex's FLASH backend: FlashAttention-4's CuTe kernels
            kernels["flex hybrid (FLASH)"] = (flex_on(hybrid_bm, FLASH), hybrid_n)
            kernels["flex causal (FLASH)"] = (flex_on(causal_bm, FLASH), causal_n)
        for head_dim, heads in HEAD_SHAPES:
            q, k, v, dy = qkv(S, head_dim, heads)
            for name, (attn, allowed) in kernels.items():
                row = {"S": S, "head_dim": head_dim, "heads": heads, "kernel": name,
                       "allowed": allowed}
                try:  # a kernel that fails (FLASH is a beta) is reported alone
                    row["ms"] = fwd_bwd_ms(attn, q, k, v, dy)
                    row["tflops"] = attention_flops(allowed, head_dim, heads) / row["ms"] / 1e9
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
        del kernels, dense, hybrid_bm, causal_bm
        free_memory()
    return rows


def bench_tuning(model_name: str, batch: dict) -> list[dict]:
    """Flex on the masks of a real training batch (packed documents, so many partly masked tiles;
    bench/sections.py passes the batch its training section profiles) with the model's head shape
    and its K/V as a training step passes them (attention.gqa_kv): the forward under each of
    TUNE_OPTIONS and, with the model's options, the backward (fwd+bwd minus the forward in grad
    mode). The sweep's forward runs under no_grad, so it skips the logsumexp store (4 bytes per
    query and head; a forward-only compile is quicker). Inside the model prologue fusion may fold
    q/k/v's producers into the kernel; here q, k, v are plain tensors, so a gap between this forward
    and --profile's shows that cost; "model, BSHD" lays them out in memory as (B, S, H, D), the
    projections' layout (whether the compiled model keeps it through RoPE is inductor's choice).
    Then the backward under each of BWD_TUNE_OPTIONS, the forward's options the model's. `diff` =
    relative difference of the output (forward options) or of the largest of dq, dk, dv (backward
    options) from the model options' (bf16): an option that breaks the result shows there, not only
    in speed. About 40 compilations per call."""
    torch._dynamo.reset()  # each call starts with the whole recompile budget (cache_size_limit)
    cfg = preset(model_name, "flex")
    (B, ctx), hd = batch["idx"].shape, cfg.n_embd // cfg.n_head
    q, k, v, dy = qkv(ctx, hd, cfg.n_head, cfg.n_kv_head, B)
    kf, vf, gqa = gqa_kv(k, v, cfg.n_head, expand=Kernels().expand_kv)
    # (B, S, H, D) memory
    bshd = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, kf, vf)]
    variants = [(name, opts, (q, kf, vf)) for name, opts in TUNE_OPTIONS.items()]
    variants.append(("model, BSHD", None, bshd))
    rows = []
    for mask in ("causal", "hybrid"):
        # as the training step's
        bm = masks.block_mask(masks.for_batch(mask, batch), B, ctx, "cuda")
        allowed, ref, ref_grads = allowed_in_batch(batch, mask == "hybrid"), None, None
        for name, opts, (qq, kk, vv) in variants:
            row = {"model": model_name, "ctx": ctx, "batch": B, "mask": mask, "options": name}
            options = tiles(q) if opts is None else (opts or None)
            attn = lambda bm=bm: flex(qq)(qq, kk, vv, block_mask=bm, enable_gqa=gqa,
                                          kernel_options=options)
            try:                          # an option this torch or GPU does not support fails alone
                with torch.no_grad():
                    out = attn()
                    ref = out if ref is None else ref
                    row["diff"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    row["fwd_ms"] = median_ms(attn)
                row["fwd_tflops"] = (attention_flops(allowed, hd, cfg.n_head, 1) / row["fwd_ms"]
                                     / 1e9)
                if name == "model":
                    ref_grads = time_backward(row, attn, q, kf, vf, dy, allowed)
            except Exception as e:        # noqa: BLE001 (reported in the table, not raised)
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(report(row))
        for name, bwd in BWD_TUNE_OPTIONS.items():  # the backward alone under other tiles
            row = {"model": model_name, "ctx": ctx, "batch": B, "mask": mask, "options": name}
            options = {**(tiles(q) or {}), **bwd}
            attn = lambda bm=bm: flex(q)(q, kf, vf, block_mask=bm, enable_gqa=gqa,
                                         kernel_options=options)
            try:
                time_backward(row, attn, q, kf, vf, dy, allowed, ref_grads)
            except Exception as e:        # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(report(row))
        del bm, ref, ref_grads
        free_memory()
    return rows


def time_backward(row: dict, attn, q, k, v, dy, allowed: int, ref_grads=None) -> tuple:
    """row's backward: attn()'s forward + backward minus its forward (both in grad mode, as in
    training). Returns the gradients of q, k, v; with ref_grads, row["diff"] = the largest relative
    difference from them, so that tiles that break the backward show in the table, not only in its
    speed."""
    grads = torch.autograd.grad(attn(), (q, k, v), dy)
    if ref_grads is not None:
        row["diff"] = max(((g.float() - r.float()).norm() / r.float().norm()).item()
                          for g, r in zip(grads, ref_grads))
    row["bwd_ms"] = fwd_bwd_ms(lambda *_: attn(), q, k, v, dy) - median_ms(attn)
    row["bwd_tflops"] = (attention_flops(allowed, q.size(-1), q.size(1), FWD_BWD - 1)
                         / row["bwd_ms"] / 1e9)
    return grads


def report(row: dict) -> dict:
    """Print one tuning row as it is measured (a compile per row: the section takes minutes)."""
    parts = [f"forward {row['fwd_ms']:.3f} ms"] if "fwd_ms" in row else []
    parts += [f"backward {row['bwd_ms']:.3f} ms"] if "bwd_ms" in row else []
    parts += [row["error"]] if "error" in row else []
    print(f"  tune {row['model']} {row['ctx']} {row['mask']} {row['options']}: "
          f"{', '.join(parts)}", flush=True)
    return row


@contextlib.contextmanager
def attn_config(name: str):
    """Compile under ATTN_CONFIGS[name] ("a+b" joins several: their settings in force together,
    their kernel options merged over torch's tiles, a later part's winning): inductor settings
    patched for the duration, and the Kernels to build the model with yielded; dynamo starts
    afresh, so nothing compiled under another configuration is reused."""
    import torch._inductor.config as inductor_config
    parts = [ATTN_CONFIGS[part] for part in name.split("+")]
    inductor = {k: v for settings, _ in parts for k, v in settings.items()}
    fields = {k: v for _, f in parts for k, v in f.items() if k != "options"}
    options = [f["options"] for _, f in parts if "options" in f]
    if options:
        fields["options"] = {k: v for o in options for k, v in o.items()}
    torch._dynamo.reset()
    try:
        with inductor_config.patch(inductor):
            yield Kernels(**fields)
    finally:
        torch._dynamo.reset()


def free_memory():  # between configurations: start each from the same state
    gc.collect()
    torch.cuda.empty_cache()
