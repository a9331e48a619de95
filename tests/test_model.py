"""The GPT: logits only where needed, chunked loss, backends and attention statistics against dense
references.

Run: python -m pytest -q tests/test_model.py
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, tiny_config
from torch.nn.attention.flex_attention import create_block_mask

import attention
import masks
import model as M
import stats
from stats import attention_stats


def full_logits(model, idx, pos, mask):
    x = model.blocks(model.wte(idx), model.rope(pos), mask, range(model.config.n_layer))
    return model.lm_head(model.ln_f(x)).float()                                # (B, S, vocab)


def test_logits_at_positions_equal_full_logits_sliced(tiny_model):
    b = random_batch()
    mask = masks.dense_mask(masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"]),
                            2, 70, "cpu")
    full = full_logits(tiny_model, b["idx"], b["pos"], mask)
    positions = torch.tensor([[0, 5, 69], [3, 3, 40]])
    x = tiny_model.blocks(tiny_model.wte(b["idx"]), tiny_model.rope(b["pos"]), mask, range(4))
    got = tiny_model.logits_at(x, positions)
    want = torch.stack([full[i, positions[i]] for i in range(2)])
    torch.testing.assert_close(got, want)


def test_loss_equals_cross_entropy_of_full_logits_and_chunking_changes_nothing(tiny_model,
                                                                              monkeypatch):
    b = random_batch()
    mask = masks.dense_mask(masks.causal(b["attention_mask"], b["document_ids"]), 2, 70, "cpu")
    full = full_logits(tiny_model, b["idx"], b["pos"], mask)
    want = F.cross_entropy(full.flatten(0, 1), b["targets"].flatten(), ignore_index=M.IGNORE)
    one = tiny_model(b["idx"], b["pos"], mask, b["targets"])
    torch.testing.assert_close(one, want)
    g_one = torch.autograd.grad(one, tiny_model.wte.weight)[0]
    monkeypatch.setattr(M, "LOSS_CHUNK", 3)  # many checkpointed chunks
    chunked = tiny_model(b["idx"], b["pos"], mask, b["targets"])
    torch.testing.assert_close(chunked, want)
    torch.testing.assert_close(torch.autograd.grad(chunked, tiny_model.wte.weight)[0], g_one)


def test_flex_and_sdpa_backends_agree_on_the_model():
    torch.manual_seed(0)
    m = M.GPT(tiny_config())
    b = random_batch(S=140)
    mod = masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"])
    with torch.no_grad():
        a = full_logits(m, b["idx"], b["pos"], masks.dense_mask(mod, 2, 140, "cpu"))
        f = full_logits(m, b["idx"], b["pos"],
                        create_block_mask(mod, 2, None, 140, 140, device="cpu"))
    valid = b["attention_mask"]
    torch.testing.assert_close(f[valid], a[valid], atol=2e-5, rtol=1e-4)


def test_expanded_kv_is_grouped_query_attention_with_its_gradients():
    """attention.gqa_kv: K/V repeated so query head h reads KV head h // group (the enable_gqa
    rule); attention on the copies gives enable_gqa's output and, summed back by autograd, its K/V
    gradients, and flex's grouping is the same."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 50, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 50, 8, generator=g, requires_grad=True) for _ in range(2))
    assert attention.gqa_kv(k, v, 6, expand=False) == (k, v, True)  # flex's own GQA
    assert attention.gqa_kv(q, q, 6, expand=True) == (q, q, False)  # multi-head: nothing to do
    ke, ve, gqa = attention.gqa_kv(k, v, 6, expand=True)
    assert (not gqa and torch.equal(ke, k.repeat_interleave(3, dim=1))
            and torch.equal(ve, v.repeat_interleave(3, dim=1)))
    dy = torch.randn(2, 6, 50, 8, generator=g)
    out = F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dy),
                    torch.autograd.grad(ref, (q, k, v), dy)):
        torch.testing.assert_close(a, b)
    # flex (forward only on a CPU)
    bm = create_block_mask(masks.causal(), 2, None, 50, 50, device="cpu")
    q, k, v, ke, ve = (t.detach() for t in (q, k, v, ke, ve))
    torch.testing.assert_close(attention.flex(q)(q, ke, ve, block_mask=bm),
                               attention.flex(q)(q, k, v, block_mask=bm, enable_gqa=True))


@pytest.mark.parametrize("expand", [True, False])
def test_attention_expands_kv_only_for_flex_calls_that_will_be_differentiated(monkeypatch,
                                                                               expand):
    """With Kernels(expand_kv=True) (the default) the model asks for the repeated K/V exactly when
    a backward will follow (grad on, weights trainable), never in a no-grad forward or in
    generation, whose cache keeps the shared KV heads; with expand_kv=False, never. The kernel
    options reach every call from the Kernels the model was built with."""
    heads, options = [], {"fwd_BLOCK_M": 32}

    def fake_flex(q):
        def call(q, k, v, block_mask, enable_gqa, kernel_options):
            heads.append((k.size(1), enable_gqa))
            assert kernel_options == options
            return q.new_zeros(q.shape)                            # (B, nh, T, hs)
        return call
    monkeypatch.setattr(attention, "flex", fake_flex)
    torch.manual_seed(0)
    kernels = attention.Kernels(options=options, expand_kv=expand)
    m, b = M.GPT(tiny_config(attn="flex"), kernels), random_batch(S=64)  # 4 q heads, 2 KV heads
    bm = create_block_mask(masks.causal(), 2, None, 64, 64, device="cpu")
    run = lambda cache=None: m.blocks(m.wte(b["idx"]), m.rope(b["pos"]), bm, range(1), caches=cache)
    run()
    with torch.no_grad():
        run()
    m.requires_grad_(False)
    run()
    caches = [{}]
    with torch.no_grad():
        run(caches)
    first = (4, False) if expand else (2, True)
    assert heads == [first, (2, True), (2, True), (2, True)] and caches[0]["k"].size(1) == 2


def test_rope_is_relative():
    """Shifting every position by a constant leaves q.k unchanged: positions enter only as
    differences."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    pos = torch.arange(5)[None]
    dots = [(M.apply_rope(q, M.rope_tables(p, 16, 1e4))
             @ M.apply_rope(k, M.rope_tables(p, 16, 1e4)).transpose(-1, -2))
            for p in (pos, pos + 37)]
    torch.testing.assert_close(dots[0], dots[1], atol=1e-4, rtol=1e-4)


def dense_stats(model, b, mask_mod):
    """The three statistics from explicit softmax probabilities (the S x S way)."""
    B, S = b["idx"].shape
    dense = masks.dense_mask(mask_mod, B, S, "cpu")                           # (B, 1, S, S)
    x, rope = model.wte(b["idx"]), model.rope(b["pos"])
    first = torch.arange(S) - b["pos"]
    valid, lm, pos = b["attention_mask"], b["loss_mask"], b["pos"]
    ctx_key = (lm == 0) & (pos != 0) & valid
    head_sink, early, eng = [], [], []
    for block in model.h:
        q, k, v = block.attn.qkv(block.ln_1(x), rope)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~dense,
                                                                                float("-inf"))
        p = torch.softmax(scores, -1).nan_to_num(0.0)                          # (B, nh, S, S)
        sink_q = valid & (pos != 0)
        # (B, nh, S)
        p_first = p.gather(3, first[:, None, :, None].expand(B, p.size(1), S, 1))[..., 0]
        head_sink.append(torch.stack([p_first[:, h][sink_q].mean() for h in range(p.size(1))]))
        early.append(torch.stack([p_first[:, h][sink_q & (pos < 64)].mean()
                                  for h in range(p.size(1))]))
        resp_q = valid & (lm == 1)
        p_ctx = (p * ctx_key[:, None, None, :]).sum(-1)                          # (B, nh, S)
        eng.append(torch.stack([p_ctx[:, h][resp_q].mean() for h in range(p.size(1))]).mean())
        x = block(x, rope, dense, {}, 1.0)
    hs, he = torch.stack(head_sink), torch.stack(early)                        # (n_layer, nh)
    return {"sink_mass": hs.mean().item(), "sink_mass_64": he.mean().item(),
            "engagement": torch.stack(eng).mean().item()}, hs, he


def test_dense_logsumexp_stays_fp32_under_a_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 16, generator=g) * 3, torch.randn(1, 1, 40, 16, generator=g) * 3
    allowed = torch.ones(1, 1, 40, 40, dtype=torch.bool).tril()
    want = stats.dense_lse(q, k, k, allowed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(stats.dense_lse(q, k, k, allowed), want)


def test_attention_stats_from_logsumexp_match_dense_softmax(monkeypatch):
    monkeypatch.setattr(stats, "QUERY_BLOCK", 64)                           # several query blocks
    torch.manual_seed(0)
    m = M.GPT(tiny_config())
    with torch.no_grad():  # larger activations: heads differ in their sinks
        m.wte.weight[:] += 0.5 * torch.randn_like(m.wte.weight)
    b = random_batch(S=150)
    mods = (masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"]),
            masks.causal(b["attention_mask"], b["document_ids"]))
    for mod, backend in itertools.product(mods, ("flex", "dense")):
        with torch.no_grad():
            want, heads, early = dense_stats(m, b, mod)
        # half the heads above it
        eps = heads.flatten().sort().values[heads.numel() // 2].item() - 1e-6
        monkeypatch.setattr(stats, "SINK_EPS", eps)
        want["sink_rate"] = (heads > eps).float().mean().item()
        want["sink_rate_64"] = (early > eps).float().mean().item()
        # fewer queries
        assert (b["pos"] >= 64).any() and abs(want["sink_mass_64"] - want["sink_mass"]) > 1e-4
        got = attention_stats(m, b["idx"], b["pos"], mod, b["loss_mask"], b["attention_mask"],
                              backend)
        for key in want:
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-6), (key, got, want)
        assert 0 < got["engagement"] < 1 and 0 < got["sink_mass"] < 1 and 0 < got["sink_rate"] < 1


def test_grouped_mm_splits_more_runs_than_one_kernel_call_takes_by_whole_rows(monkeypatch):
    """Rows of runs (batches.sample_groups' layout, a row's last run ending at its end, some runs
    empty) give the same product and gradients whether they go in one call or in calls of whole
    rows, as they must past the grouped kernel's limit of runs a call (lowered here so that the loop
    path splits too)."""
    import model
    torch.manual_seed(0)
    rows, S, per_row = 5, 12, 3
    x, w = (torch.randn(rows * S, 4, requires_grad=True),
            torch.randn(rows * per_row, 4, 2, requires_grad=True))
    # ends inside a row
    within = torch.tensor([[0, 5, 12], [4, 4, 12], [12, 12, 12], [1, 2, 12], [7, 11, 12]])
    ends = (within + torch.arange(rows)[:, None] * S).flatten().to(torch.int32)
    want = torch.cat([x[r * S:(r + 1) * S][a:b] @ w[r * per_row + i] for r in range(rows)
                      for i, (a, b) in enumerate(zip([0, *within[r, :-1].tolist()],
                                                     within[r].tolist()))])
    up = torch.randn(rows * S, 2)
    grads = None
    for limit in (1000, 7, 5, 3):                                # one call; 2, 1 and 1 rows a call
        monkeypatch.setattr(model, "GROUPED_MM_GROUPS", limit)
        out = model.grouped_mm(x, w, ends, rows)
        assert torch.allclose(out, want, atol=1e-6), limit
        g = torch.autograd.grad((out * up).sum(), [x, w])
        grads = grads or g
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, grads)), limit
    monkeypatch.setattr(model, "GROUPED_MM_GROUPS", 1000)
    rotated = model.grouped_mm(x, w.roll(1, dims=0), ends, rows)  # the check can fail
    assert not torch.allclose(rotated, want, atol=1e-3)
