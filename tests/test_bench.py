"""bench/ (sections.py, steps.py, kernels.py, flops.py) on the CPU: allowed-entry counts, FLOP and
work formulas, each section's bookkeeping with the GPU work faked, the benchmark's one-line refusal
without a GPU.

Run: python -m pytest -q tests/test_bench.py   (a few seconds; the benchmark itself needs a GPU)
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_batch, refused

import masks
from bench import flops
from bench import kernels as bench_kernels
from bench import sections as bench
from bench import steps as bench_steps


def dense_count(mask_mod, batch: int, S: int) -> int:
    return int(masks.dense_mask(mask_mod, batch, S, "cpu").sum())


@pytest.mark.parametrize("S", [100, 232, 257])
def test_closed_form_allowed_entries_match_a_dense_mask(S):
    C = S * bench_kernels.CONTEXT_PERCENT // 100
    loss_mask = (torch.arange(S) >= C).long()[None]  # context, then one response turn
    assert flops.allowed_hybrid(C, S - C) == dense_count(masks.hybrid(loss_mask), 1, S)
    assert flops.allowed_causal(S) == dense_count(masks.causal(), 1, S)


def test_all_context_or_all_response_rows():
    assert flops.allowed_hybrid(10, 0) == 100  # one bidirectional turn: the full square
    assert flops.allowed_hybrid(0, 10) == flops.allowed_causal(10) == 55


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_count_matches_the_training_masks(seed):
    """Packed rows with documents, several turns and padding: the O(S) count against train's dense
    masks."""
    b = random_batch(B=3, S=150, seed=seed)
    hybrid = masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"])
    causal = masks.causal(b["attention_mask"], b["document_ids"])
    assert flops.allowed_in_batch(b, hybrid=True) == dense_count(hybrid, 3, 150)
    assert flops.allowed_in_batch(b, hybrid=False) == dense_count(causal, 3, 150)


def test_batch_count_on_a_real_packed_batch():
    import config
    from data import batches, tokenizer
    args = config.get_args(["--ctx", "1024", "--data", "synthetic", "--batch-size", "2",
                            "--device", "cpu", "--min-len", "200"])
    config.apply_defaults(args)
    cfg = config.data_config(args)
    b = batches.get_batch(cfg, tokenizer.gpt2(), batches.data_source(cfg), 0, 0)
    for hybrid in (True, False):
        mod = masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"]) if hybrid else \
            masks.causal(b["attention_mask"], b["document_ids"])
        assert flops.allowed_in_batch(b, hybrid) == dense_count(mod, 2, 1024)


def test_flop_formulas_by_hand():
    # S = 4 causal: 4 + 3 + 2 + 1 = 10 entries; head dim 2, 3 heads:
    # forward = 2 matmuls x 2 FLOPs x 10 entries x 2 x 3 = 240; backward 2.5x -> 600; total 840
    assert flops.allowed_causal(4) == 10
    assert flops.attention_flops(10, 2, 3, times_forward=1) == 240
    assert (flops.attention_flops(10, 2, 3) == 840
            and flops.attention_flops(10, 2, 3, flops.MODEL_FWD_BWD) == 720)
    # hybrid, C = 3, R = 2: 9 + 6 + 3 = 18 entries
    assert flops.allowed_hybrid(3, 2) == 18


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="checks the refusal on a machine without CUDA")


@NO_CUDA
def test_no_cuda_is_one_line_as_a_process(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bench", "--out", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # (-m finds the package
                                                                     # from anywhere)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2                                    # cli.REFUSED
    assert len(lines) == 1 and "CUDA" in lines[0] and lines[0].startswith("python -m bench: error:")
    assert not out.exists()


@NO_CUDA
@pytest.mark.parametrize("argv,needle", [(["--models", "gpt5"], "--models"),
                                          (["--tokens", "0"], "--tokens"),
                                          (["--sections", "speed"], "speed"),
                                          (["--attn-config", "turbo"], "--attn-config"),
                                          (["--attn-config", "default,fwd-64x128+turbo"],
                                           "--attn-config"),
                                          (["--variants", "sft-hybrid,focusft-causal"],
                                           "--variants")])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "bench.json"
    line = refused(capsys, bench.main, ["--out", str(out), *argv])
    assert needle in line and line.startswith("python -m bench: error:"), line
    assert not out.exists()


def test_step_work_by_hand():
    # 2 layers of 10 matmul params (4 of them in `down`), 3 tokens, 4 allowed pairs, head dim 1,
    # 1 head: linear forward = 2*10*3 = 60 per layer; attention forward = 4*4*1*1 = 16 per layer
    # SFT: 2 * (3*60 + 3.5*16) = 472
    assert flops.step_work(2, 10, 4, 0, 2, 3, 4, 1, 1) == 472
    # one adapted layer, 2 inner steps: each = forward 60+16, then only down's input gradient
    # 2*4*3 = 24 (the layer's input is a constant) -> 472 + 2 * 100 = 672
    assert flops.step_work(2, 10, 4, 1, 2, 3, 4, 1, 1) == 672
    # two adapted layers: each inner step = 2*76 forward + 24 (lowest) + 60 + 2.5*16 (the upper
    # one's input gradient through linear layers and attention) = 276 -> 472 + 552
    assert flops.step_work(2, 10, 4, 2, 2, 3, 4, 1, 1) == 1024


def test_training_rows_are_ratios_over_causal_sft(monkeypatch):
    """Section 2's bookkeeping on the CPU (the timing itself needs a GPU): every variant of every
    model is timed once on the same pre-built batches, and its ratios are over that model's
    causal-SFT row."""
    from data import batches
    seen = []

    def fake_time(args, prebuilt, warmup, kernels, profile, trace=None):
        seen.append((args.model, args.method, args.mask, id(prebuilt)))
        ms = {"causal": 10.0, "hybrid": 15.0}[args.mask] * (2 if args.method == "focusft" else 1)
        return {"ms": ms, "ms_alone": ms + 1,
                "work": {"causal": 4.0, "hybrid": 5.0}[args.mask]
                        * (2 if args.method == "focusft" else 1)}
    # it would refuse --device cuda here
    monkeypatch.setattr(bench_steps.run_config, "check_args", lambda args: None)
    monkeypatch.setattr(batches, "to_device", lambda batch, device, slots=0: batch)
    monkeypatch.setattr(bench_steps, "time_steps", fake_time)
    monkeypatch.setattr(bench_steps, "free_memory", lambda: None)
    rows = bench_steps.bench_training([1024], ["tiny", "small"], 1, 1, 2048, False)
    assert [(r["model"], r["method"], r["mask"]) for r in rows] == [
        (m, meth, mask) for m in ("tiny", "small") for meth, mask in bench_steps.VARIANTS]
    # one set of batches
    assert len({s[3] for s in seen}) == 1 and all(r["batch"] == 2 for r in rows)
    assert [(r["ratio"], r["work_ratio"]) for r in rows[:3]] == [(1.0, 1.0), (1.5, 1.25),
                                                                 (3.0, 2.5)]
    rows = bench_steps.bench_training([1024], ["tiny"], 1, 1, 2048, False,
                                      variants=bench_steps.VARIANTS[1:])
    assert ([r["method"] for r in rows] == ["sft", "focusft"]
            and not [r for r in rows if "ratio" in r])  # no base


def test_work_section_runs_without_a_gpu(tmp_path):
    """--sections work needs no GPU: the FocuSFT step does more matmul work than hybrid SFT, which
    does more than causal SFT (its contexts attend both ways), and the written JSON holds the same
    rows."""
    import json
    out = tmp_path / "work.json"
    bench.main(["--sections", "work", "--sizes", "1024", "--models", "tiny", "--tokens", "2048",
                "--out", str(out)])
    rows = json.loads(out.read_text())["work"]
    assert ([(r["method"], r["mask"]) for r in rows] == list(bench_steps.VARIANTS)
            and all(r["batch"] == 2 for r in rows))
    ratios = [r["work_ratio"] for r in rows]
    assert ratios[0] == 1 and 1 < ratios[1] < ratios[2]


def test_each_attn_config_is_active_while_its_rows_are_timed(monkeypatch):
    """--attn-config: every configuration times every variant with a model built with its own
    kernels, and its ratios are over its own causal-SFT row."""
    from data import batches
    seen = []

    def fake_time(args, prebuilt, warmup, kernels, profile, trace=None):
        seen.append(kernels.options)
        slow = 2.0 if kernels.options else 1.0
        ms = slow * (3.0 if args.method == "focusft" else 1.0)
        return {"ms": ms, "ms_alone": ms, "work": 1.0}
    monkeypatch.setattr(bench_steps.run_config, "check_args", lambda args: None)
    monkeypatch.setattr(batches, "to_device", lambda batch, device, slots=0: batch)
    monkeypatch.setattr(bench_steps, "time_steps", fake_time)
    monkeypatch.setattr(bench_steps, "free_memory", lambda: None)
    rows = bench_steps.bench_training([1024], ["tiny"], 1, 1, 1024, False,
                                      ("default", "fwd-64x128"))
    options = bench_kernels.ATTN_CONFIGS["fwd-64x128"][1]["options"]
    assert seen == [None] * 3 + [options] * 3
    assert [r["config"] for r in rows] == ["default"] * 3 + ["fwd-64x128"] * 3
    assert [r["ratio"] for r in rows] == [1.0, 1.0, 3.0] * 2


def test_attention_passes_flex_options_to_the_kernel(monkeypatch):
    """Every flex_attention call gets the kernel options of the Kernels the model was built with:
    by default the head-64 tiles at head size 64 and torch's choice (None) otherwise; options given
    override it ({} = torch's choice everywhere)."""
    import attention
    import model
    from masks import block_mask, causal
    calls = []

    def fake_flex(q, k, v, block_mask=None, enable_gqa=False, kernel_options=None):
        calls.append(kernel_options)
        return q
    monkeypatch.setattr(attention, "flex", lambda q: fake_flex)
    bm = block_mask(causal(), 1, 16, "cpu")

    def run(n_embd, kernels=attention.Kernels()):   # two layers, two heads: head size n_embd / 2
        m = model.GPT(model.GPTConfig(n_layer=2, n_head=2, n_kv_head=2, n_embd=n_embd,
                                      mlp_hidden=64, attn="flex"), kernels)
        m.blocks(m.wte(torch.zeros(1, 16, dtype=torch.long)), m.rope(torch.arange(16)[None]), bm,
                 range(2))
    run(32)
    run(128)
    run(128, attention.Kernels(options={"fwd_BLOCK_M": 32}))
    run(128, attention.Kernels(options={}))
    assert calls == ([None] * 2 + [attention.HEAD64_TILES] * 2 + [{"fwd_BLOCK_M": 32}] * 2
                     + [None] * 2)


@pytest.mark.parametrize("available", [False, True])
def test_attention_rows_add_flex_flash_backend_where_it_runs(monkeypatch, available):
    """The attention section (timing and CUDA faked): flex with the model's options, SDPA, and flex
    through FlashAttention-4's kernels only where attention.flash_backend_available() says flex can
    use them."""
    import attention
    options = []

    def fake_flex(q):
        def call(q, k, v, block_mask=None, kernel_options=None):
            options.append(kernel_options)
            if kernel_options == {"BACKEND": "FLASH"} and block_mask == "causal block mask":
                raise RuntimeError("CuteDSL template failed")  # one kernel fails: reported alone
            return q
        return call
    monkeypatch.setattr(bench_kernels, "hybrid_row",
                        lambda S: (masks.hybrid((torch.arange(S) >= S // 2).long()[None]),
                                   S * (S + 1) // 2))
    monkeypatch.setattr(masks, "block_mask", lambda mod, B, S, device: f"{mod.__name__} block mask")
    monkeypatch.setattr(masks, "dense_mask",
                        lambda mod, B, S, device: torch.ones(1, 1, S, S, dtype=torch.bool))
    monkeypatch.setattr(bench_kernels, "qkv",
                        lambda S, hd, heads: [torch.randn(1, heads, S, hd)] * 4)
    monkeypatch.setattr(bench_kernels, "flex", fake_flex)
    monkeypatch.setattr(bench_kernels, "fwd_bwd_ms",
                        lambda attn, q, k, v, dy: attn(q, k, v).shape[-1] / 32)
    monkeypatch.setattr(bench_kernels, "free_memory", lambda: None)
    monkeypatch.setattr(bench_kernels, "flash_backend_available", lambda: available)
    rows = bench_kernels.bench_attention([16])
    flash = ["flex hybrid (FLASH)", "flex causal (FLASH)"] if available else []
    names = ["flex hybrid", "flex causal", "sdpa causal (flash)", "sdpa dense hybrid"] + flash
    assert [(r["head_dim"], r["kernel"]) for r in rows] == [
        (hd, n) for hd, _ in bench_kernels.HEAD_SHAPES for n in names]
    assert options == [o for hd, _ in bench_kernels.HEAD_SHAPES
                       for o in [attention.Kernels().flex_options(hd)] * 2
                       + [{"BACKEND": "FLASH"}] * len(flash)]
    for r in rows:
        if r["kernel"] == "flex causal (FLASH)":
            assert r["error"] == "RuntimeError: CuteDSL template failed" and "ms" not in r
        else:
            assert r["ms"] == r["head_dim"] / 32 and "error" not in r


@pytest.mark.parametrize("package,cuda,capability,expected", [
    ("absent", True, (9, 0), False), ("flash_attn only", True, (9, 0), False),
    ("cute", False, None, False),
    ("cute", True, (8, 0), False), ("cute", True, (9, 0), True), ("cute", True, (10, 0), True),
    ("cute", True, (12, 0), False)])
def test_flash_backend_needs_flash_attn_cute_and_hopper(monkeypatch, package, cuda, capability,
                                                        expected):
    """flex's FLASH backend is offered only with flash_attn.cute importable and an SM90 or SM100 GPU
    (import lookups and the GPU faked; without such a GPU nothing is looked up); bench then records
    flash-attn-4's version, and None otherwise."""
    import importlib.util

    import attention

    def find_spec(name):
        assert cuda and capability[0] in (9, 10)  # looked up only on such a GPU
        if package == "absent":
            # as for a missing parent
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return object() if package == "cute" or name == "flash_attn" else None
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert attention.flash_backend_available() is expected
    assert (bench_kernels.flash_attn_version() is not None) is expected


def test_joined_attn_configs_merge_their_options_and_settings(monkeypatch):
    """"a+b": both configurations' kernel options (over torch's tiles, b's winning) and inductor
    settings in force at once, the Kernels to build with yielded; "default" is the model's own
    choice; inductor's settings restored after."""
    import torch._inductor.config as inductor_config

    from attention import HEAD64_TILES, Kernels
    # a later part's option wins
    with bench_kernels.attn_config("bwd-32x64-64x32-w4-s3+fwd-64x128+no-prologue") as kernels:
        assert kernels.options == {**HEAD64_TILES, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64,
                                   "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "fwd_BLOCK_N": 128}
        assert inductor_config.prologue_fusion is False
    with bench_kernels.attn_config("default") as kernels:
        assert kernels == Kernels()
    with bench_kernels.attn_config("torch+default") as kernels:
        assert kernels.options == {} and kernels.flex_options(64) is None
    with bench_kernels.attn_config("shared-kv+fwd-64x128") as kernels:
        assert kernels == Kernels(options={"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128},
                                  expand_kv=False)
    assert inductor_config.prologue_fusion is not False


def test_tuning_times_each_forward_option_on_the_batch_masks(monkeypatch):
    """--sections tune on the CPU (timing faked): both masks of one real training batch, every
    option's forward with its own kernel options (the model's = Kernels().flex_options), the
    backward with the model's and under each backward option (over the model's forward options),
    FLOPs on the batch's allowed entries, and an option that fails reported alone."""
    from attention import HEAD64_TILES
    from bench.flops import FWD_BWD, allowed_in_batch
    seen, bwd_seen, built, layouts = [], [], {}, set()
    # a backward option that breaks dq
    bad_name, bad_bwd = list(bench_kernels.BWD_TUNE_OPTIONS.items())[1]

    def fake_block_mask(mask_mod, batch_size, seq_len, device):
        built[mask_mod.__name__] = (batch_size, seq_len)
        return mask_mod.__name__
    def fake_qkv(S, head_dim, heads, kv_heads=0, batch=1):
        q, k, v = (torch.randn(batch, h, S, head_dim, requires_grad=True)
                   for h in (heads, kv_heads, kv_heads))
        return q, k, v, torch.randn_like(q)
    def fake_flex(q):
        def call(q, k, v, block_mask, enable_gqa, kernel_options):
            if kernel_options == {"USE_TMA": True}:
                raise RuntimeError("not on this GPU")
            # sweep: no_grad
            (bwd_seen if torch.is_grad_enabled() else seen).append((block_mask, kernel_options))
            layouts.add((q.transpose(1, 2).is_contiguous(), k.transpose(1, 2).is_contiguous()))
            broken = kernel_options in ({"PRESCALE_QK": True}, {**HEAD64_TILES, **bad_bwd})
            # (k, v in the graph for autograd)
            return q * (1.5 if broken else 1.0) + 0 * (k.sum() + v.sum())
        return call
    monkeypatch.setattr(masks, "block_mask", fake_block_mask)
    monkeypatch.setattr(bench_kernels, "qkv", fake_qkv)
    monkeypatch.setattr(bench_kernels, "flex", fake_flex)
    monkeypatch.setattr(bench_kernels, "median_ms", lambda fn: 2.0)
    monkeypatch.setattr(bench_kernels, "fwd_bwd_ms", lambda attn, q, k, v, dy: 7.0)
    monkeypatch.setattr(bench_kernels, "free_memory", lambda: None)
    batch = bench_steps.section_batches("tiny", 1024, range(1, 2), 2048, "cpu")[0]
    rows = bench_kernels.bench_tuning("tiny", batch)          # tiny: 2 heads of size 64
    names = (list(bench_kernels.TUNE_OPTIONS) + ["model, BSHD"]
             + list(bench_kernels.BWD_TUNE_OPTIONS))
    assert [(r["mask"], r["options"]) for r in rows] == [
        (m, n) for m in ("causal", "hybrid") for n in names]
    assert (built == {"causal": (2, 1024), "hybrid": (2, 1024)}
            and all(r["batch"] == 2 for r in rows))
    calls = [o for mask, o in seen if mask == "causal"]
    expected = ([HEAD64_TILES, None]
                + [o for n, o in bench_kernels.TUNE_OPTIONS.items()
                   if n not in ("model", "torch", "USE_TMA")]
                + [HEAD64_TILES])
    assert calls == expected  # tiny's head size is 64: the model's options are the head-64 tiles
    # the model's, then each
    assert [o for mask, o in bwd_seen if mask == "causal"] == [HEAD64_TILES] + [
        {**HEAD64_TILES, **o} for o in bench_kernels.BWD_TUNE_OPTIONS.values()]
    for r in rows:
        allowed = allowed_in_batch(batch, r["mask"] == "hybrid")
        if r["options"] == "USE_TMA":
            assert "not on this GPU" in r["error"] and "fwd_ms" not in r
            continue
        # the backward alone, under its own tiles
        if r["options"] in bench_kernels.BWD_TUNE_OPTIONS:
            assert "fwd_ms" not in r and r["bwd_ms"] == 5.0
            # dq's, vs the model's
            assert r["diff"] == pytest.approx(0.5 if r["options"] == bad_name else 0.0)
            continue
        assert r["fwd_tflops"] == pytest.approx(4 * allowed * 64 * 2 / 2.0 / 1e9)
        assert r["diff"] == pytest.approx(0.5 if r["options"] == "PRESCALE_QK" else 0.0)
        if r["options"] == "model":  # the backward as a training step runs it
            assert r["bwd_ms"] == 5.0
            assert r["bwd_tflops"] == pytest.approx((FWD_BWD - 1) * 4 * allowed * 64 * 2 / 5.0
                                                    / 1e9)
        else:
            assert "bwd_ms" not in r
    assert layouts == {(False, False), (True, True)}  # (B, H, S, D) memory, then (B, S, H, D)


def test_every_tuning_tile_choice_is_an_attn_config():
    """A tile choice the tuning section likes can be timed in training under the same name: a
    forward one with torch's backward tiles, a backward one with the model's head-64 forward
    tiles."""
    from attention import HEAD64_TILES
    for name, fwd in bench_kernels.FWD_TILES.items():
        assert bench_kernels.TUNE_OPTIONS[name] == fwd
        with bench_kernels.attn_config(name) as kernels:
            assert kernels.flex_options(64) == kernels.flex_options(128) == fwd
    for name, bwd in bench_kernels.BWD_TUNE_OPTIONS.items():
        with bench_kernels.attn_config(name) as kernels:  # what the model's flex calls get
            assert kernels.flex_options(64) == {**HEAD64_TILES, **bwd}
        # --trace DIR makes a folder of each config's name
        assert "/" not in name and " " not in name
