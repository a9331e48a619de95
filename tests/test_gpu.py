"""GPU-only checks: compiled flex against SDPA in bf16 (forward and backward), and compiled training
steps.

Skipped without CUDA. Run on a GPU machine: python -m pytest -q tests/test_gpu.py
"""
import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch

import attention
import masks
from attention import flex

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend", ["model", "FLASH"])
@pytest.mark.parametrize("S,heads,kv_heads,hd,expand", [(1000, 8, 8, 64, False),
                                                        (1000, 14, 2, 64, False),
                                                        (1000, 14, 2, 64, True),
                                                        (2305, 8, 2, 128, False)])
def test_compiled_flex_matches_sdpa_forward_and_backward_bf16(S, heads, kv_heads, hd, expand,
                                                              backend):
    """With the kernel options the model uses at this head size (attention.Kernels' defaults), or
    through flex's FLASH backend (FlashAttention-4's kernels, where flash-attn-4 is installed);
    `expand`: grouped K/V repeated per query head as the model does with Kernels.expand_kv."""
    if backend == "FLASH" and not attention.flash_backend_available():
        pytest.skip(f"flex's FLASH backend needs flash_attn.cute ({attention.FLASH_INSTALL}) and "
                    "SM90+")
    b = {k: v.cuda() for k, v in random_batch(B=2, S=S, seed=S).items()}
    mod = masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"])
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, heads, S, hd, device="cuda", dtype=torch.bfloat16,
                    generator=g).requires_grad_()
    k = torch.randn(2, kv_heads, S, hd, device="cuda", dtype=torch.bfloat16,
                    generator=g).requires_grad_()
    v = torch.randn(2, kv_heads, S, hd, device="cuda", dtype=torch.bfloat16,
                    generator=g).requires_grad_()
    kf, vf, flex_gqa = attention.gqa_kv(k, v, heads, expand=expand)
    kernels = attention.BACKENDS["flash" if backend == "FLASH" else "triton"]
    out = flex(q)(q, kf, vf, block_mask=masks.block_mask(mod, 2, S, "cuda"), enable_gqa=flex_gqa,
                  kernel_options=kernels.flex_options(hd))
    gqa = heads != kv_heads
    dense = masks.dense_mask(mod, 2, S, "cuda")
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=dense,
                                         enable_gqa=gqa)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy.float())
    assert not out.isnan().any() and not any(gr.isnan().any() for gr in grads)
    assert rel_err(out, ref) < 1e-2
    for gr, rg in zip(grads, ref_grads):
        assert rel_err(gr, rg) < 2e-2


@pytest.mark.parametrize("method,backend", [("focusft", "triton"), ("sft", "triton"),
                                            ("focusft", "flash")])
def test_compiled_training_steps_run_fused(tmp_path, method, backend):
    """A few compiled bf16 steps of each method: finite falling loss and no fallback to unfused
    flex; through FlashAttention-4's kernels too where they are installed (train.py --flex-backend
    flash)."""
    import train
    if backend == "flash" and not attention.flash_backend_available():
        pytest.skip(f"--flex-backend flash needs flash_attn.cute ({attention.FLASH_INSTALL}) and "
                    "SM90+")
    out = tmp_path / method
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(["--ctx", "2048", "--method", method, "--steps", "12", "--batch-size", "4",
                    "--model", "tiny", "--lr", "3e-3", "--device", "cuda", "--out", str(out),
                    "--stats-every", "6", "--flex-backend", backend])
    assert not [w for w in caught if "unfused" in str(w.message)]
    steps = [r for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    losses = [s["loss"] for s in steps]
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) < sum(losses[:3])
    if method == "focusft":
        # before each step, after
        assert all(len(s["inner"]) == 3 and s["moved"] > 0 for s in steps)
    assert (out / "ckpt.pt").exists()


def test_kv_cache_prefill_and_decode_on_flex_match_sdpa():
    """Evaluation's compiled-flex prefill and cached decode give the logits of the dense SDPA
    path."""
    from conftest import tiny_config

    import generate
    from model import GPT
    torch.manual_seed(0)
    flex_model = GPT(tiny_config(vocab_size=50304, n_embd=64, attn="flex")).cuda().eval()
    sdpa_model = GPT(tiny_config(vocab_size=50304, n_embd=64, attn="sdpa")).cuda().eval()
    sdpa_model.load_state_dict(flex_model.state_dict())
    prompt = torch.randint(0, 50000, (1500,)).tolist()
    for kind in ("hybrid", "causal"):
        (a, ca) = generate.prefill(flex_model, prompt, kind, "cuda")
        (b, cb) = generate.prefill(sdpa_model, prompt, kind, "cuda")
        assert rel_err(a, b) < 1e-3
        a = generate.decode_step(flex_model, 17, len(prompt), ca, "cuda")
        b = generate.decode_step(sdpa_model, 17, len(prompt), cb, "cuda")
        assert rel_err(a, b) < 1e-3


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_compiled_block_without_grad_matches_eager(heads, kv_heads):
    """Evaluation's path: a compiled block under no_grad (K/V shared, v a strided view into the
    projection's output) gives the eager block's output, under both masks (on a CPU, compiled flex
    in this setting was seen to differ from eager by 5 % of the output's scale, torch 2.13)."""
    from conftest import tiny_config

    from model import GPT
    torch.manual_seed(0)
    m = GPT(tiny_config(vocab_size=50304, n_embd=128, n_head=heads, n_kv_head=kv_heads,
                        attn="flex")).cuda()
    b = {k: v.cuda() for k, v in random_batch(B=2, S=300, seed=4).items()}
    x, rope = m.wte(b["idx"]).detach(), m.rope(b["pos"])
    bms = [masks.block_mask(mod, 2, 300, "cuda") for mod in (
        masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"]),
        masks.causal(b["attention_mask"], b["document_ids"]))]
    with torch.no_grad():
        # eager blocks, compiled flex (attention.flex)
        eager = [m.blocks(x, rope, bm, range(4)) for bm in bms]
        for block in m.h:
            block.compile(dynamic=False)
        compiled = [m.blocks(x, rope, bm, range(4)) for bm in bms]
    for name, c, e in zip(("hybrid", "causal"), compiled, eager):
        assert rel_err(c, e) < 1e-4, name


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_compiled_focusft_step_gives_every_base_weight_its_eager_gradient(heads, kv_heads):
    """The inner loop freezes the base weights (fastweights.frozen) and compiled blocks keep one
    graph per requires_grad state: the outer step must still reach every base weight, with the
    gradients of the same step on SDPA with the dense mask (an independent reference). Grouped-query
    heads (K/V repeated before flex) and plain heads (K/V strided views into the projection's
    output, as in the GPU default model)."""
    from conftest import tiny_config

    from fastweights import InnerConfig, focusft_loss
    from model import GPT
    torch.manual_seed(0)
    shape = dict(vocab_size=50304, n_embd=64, n_head=heads, n_kv_head=kv_heads)
    inner = InnerConfig(rank=4, alpha=8, lr=0.5)
    eager, compiled = (GPT(tiny_config(**shape, attn="flex")).cuda() for _ in range(2))
    sdpa = GPT(tiny_config(**shape, attn="sdpa")).cuda()
    compiled.load_state_dict(eager.state_dict())
    sdpa.load_state_dict(eager.state_dict())
    for block in compiled.h:
        block.compile(dynamic=False)
    b = {k: v.cuda() for k, v in random_batch(B=2, S=300, seed=3).items()}
    mod = masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"])
    block_mask, dense = masks.block_mask(mod, 2, 300, "cuda"), masks.dense_mask(mod, 2, 300, "cuda")
    results = []
    for model, mask in ((sdpa, dense), (eager, block_mask), (compiled, block_mask),
                        (compiled, block_mask)):
        # the same fresh fast weights; compiled twice: cached
        torch.manual_seed(1)
        loss, _ = focusft_loss(model, b, mask, inner)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    for loss, grads in results[1:]:
        assert abs(loss.item() - results[0][0].item()) < 1e-4
        for g, ref in zip(grads, results[0][1]):
            assert rel_err(g, ref) < 1e-3


def test_compiled_sgd_step_matches_eager():
    """The inner loop's update as adapt runs it on a GPU (compiled) against the eager function: the
    same new fast weights, and a row with a non-finite gradient keeps its old ones."""
    import fastweights as fw
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"a.A": (3, 8, 96), "a.B": (3, 200, 8), "b.A": (3, 8, 200), "b.B": (3, 96, 8)}
    fast = {k: torch.randn(*s, device="cuda", generator=g) for k, s in shapes.items()}
    grads = {k: torch.randn(*s, device="cuda", generator=g) * (0.01 if k.startswith("a") else 10.0)
             for k, s in shapes.items()}          # "a" under the clip norm, "b" over it
    # row 1: a gradient entry; row 2: its loss
    grads["b.B"][1, 5, 2] = float("nan")
    rows = torch.tensor([0.5, 1.0, float("inf")], device="cuda")
    with torch.no_grad():                                         # as adapt calls it
        new = fw.compiled_sgd_step()(fast, grads, rows, 1.0, 1.0)
    ref = fw.sgd_step(fast, grads, rows, 1.0, 1.0)
    for k in shapes:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(new[k][1:], fast[k][1:]) and not torch.equal(new[k][0], fast[k][0])


def test_bench_times_steps_back_to_back_and_one_at_a_time():
    """steps.time_steps on the tiny model: both timings of real steps, a model-FLOP utilisation that
    is a fraction, and the peak memory of the timed steps."""
    from bench import steps
    args = steps.make_args("tiny", "focusft", "hybrid", 2048, 5, 8192)
    prebuilt = steps.section_batches("tiny", 2048, range(5), 8192, "cuda")
    row = steps.time_steps(args, prebuilt, warmup=2)
    assert row["ms"] > 0 and row["ms_alone"] > 0 and 0 < row["mfu"] < 1 and row["peak_gib"] > 0
    # back to back is never much slower than one at a time
    assert row["ms"] < 3 * row["ms_alone"]


def test_log_step_waits_for_its_own_step_only(tmp_path):
    """train.py's step line on a GPU (steplog.py): printed from host copies once its step is done,
    while the work queued after it (the next step) is still running, so the GPU never waits for the
    host's print."""
    import steplog
    x = torch.randn(4096, 4096, device="cuda") / 64
    record = steplog.step_record(0, 1e-3, (x @ x).square().mean(), (x @ x).mean().repeat(3),
                                 x.norm(), tokens=4096)
    # the next step: ~30 ms of matmuls queued behind the record
    for _ in range(200):
        x = torch.tanh(x @ x)
    queued = torch.cuda.Event()
    queued.record()
    with open(tmp_path / "log.jsonl", "w") as log:
        steplog.log_step(1, log, record, time.perf_counter())
    # .item() on the device loss would have waited for all of it
    assert not queued.query()
    line = json.loads(open(tmp_path / "log.jsonl").read())
    assert (line["step"] == 0 and line["loss"] > 0 and len(line["inner"]) == 2
            and line["moved"] == line["inner"][0])


def test_grouped_mm_on_the_gpu_matches_a_loop_over_the_groups():
    """model.grouped_mm in bf16 on a GPU (torch._grouped_mm, one kernel) against the loop it
    replaces, in fp32: the product and both gradients, with empty groups among the full ones."""
    from model import grouped_mm
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 128, device="cuda", generator=g)
    # (G, out, in), as a LoRA factor is kept
    w = torch.randn(6, 32, 128, device="cuda", generator=g) / 11
    ends = torch.tensor([300, 300, 710, 710, 990, 1000], device="cuda", dtype=torch.int32)
    up = torch.randn(1000, 32, device="cuda", generator=g)
    results = []
    # the grouped kernel, then the loop (fp32)
    for dtype in (torch.bfloat16, torch.float32):
        xd, wd = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        out = grouped_mm(xd, wd.mT, ends)                          # as MLP.proj calls it
        results.append((out, *torch.autograd.grad((out.float() * up).sum(), [xd, wd])))
    for got, want in zip(*results):
        assert rel_err(got, want) < 1e-2
    assert rel_err(results[0][0][300:710], x[300:710] @ w[2].T) < 1e-2   # the loop itself, by hand


def test_grouped_mm_past_the_kernels_limit_of_runs_matches_the_loop():
    """train.py's GPU default has 8 rows x 128 slots = 1,024 runs, one more than torch._grouped_mm
    takes a call (it failed so on an H100): model.grouped_mm splits them by whole rows; bf16 kernel
    against the fp32 loop."""
    import model
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, S, per_row = 8, 1024, 128
    x = torch.randn(rows * S, 64, device="cuda", generator=g)
    w = torch.randn(rows * per_row, 64, 16, device="cuda", generator=g) / 8
    within = torch.sort(torch.randint(0, S + 1, (rows, per_row), device="cuda", generator=g),
                        dim=1).values
    # a row's last run ends at its end
    within[:, -1] = S
    ends = (within + torch.arange(rows, device="cuda")[:, None] * S).flatten().to(torch.int32)
    got = model.grouped_mm(x.bfloat16(), w.bfloat16(), ends, rows)
    assert (w.size(0) > model.GROUPED_MM_GROUPS
            and rel_err(got, model.grouped_mm(x, w, ends, rows)) < 1e-2)


def test_compiled_per_sample_focusft_step_in_bf16_matches_sdpa_fp32():
    """Per-sample fast weights as train.py runs them on a GPU (compiled blocks, flex, bf16 autocast,
    so the grouped GEMM kernel) against the same step on SDPA in fp32 (the loop over samples): loss
    and gradients within bf16's error, and far from those of one set of fast weights per row."""
    from conftest import tiny_config

    from data import batches
    from fastweights import InnerConfig, focusft_loss
    from model import GPT
    torch.manual_seed(0)
    shape = dict(vocab_size=50304, n_embd=128, n_head=2, n_kv_head=2, mlp_hidden=256)
    inner = InnerConfig(rank=8, alpha=16, lr=0.5)
    flex_model, sdpa = (GPT(tiny_config(**shape, attn="flex")).cuda(),
                        GPT(tiny_config(**shape, attn="sdpa")).cuda())
    sdpa.load_state_dict(flex_model.state_dict())
    for block in flex_model.h:
        block.compile(dynamic=False)
    b = random_batch(B=2, S=300, seed=3)
    per_sample = {k: v.cuda() for k, v in batches.to_device(b, "cpu", slots=3).items()}
    per_row = {k: v.cuda() for k, v in b.items()}
    mod = masks.hybrid(per_row["loss_mask"], per_row["attention_mask"], per_row["document_ids"])
    block_mask, dense = masks.block_mask(mod, 2, 300, "cuda"), masks.dense_mask(mod, 2, 300, "cuda")
    results = []
    for model, mask, batch, dtype in ((sdpa, dense, per_sample, None),
                                      (flex_model, block_mask, per_sample, "bf16"),
                                      (sdpa, dense, per_row, None)):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss, _ = focusft_loss(model, batch, mask, inner)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (ref_loss, ref), (loss, grads), (_, row_grads) = results
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    errors = [rel_err(g, r) for g, r in zip(grads, ref)]
    far = [rel_err(g, r) for g, r in zip(row_grads, ref)]
    assert max(errors) < 5e-2 and max(far) > 4 * max(errors)
