"""Fast weights and the inner loop against hand-computed updates and an unoptimised reference step.

Run: python -m pytest -q tests/test_fastweights.py
"""
import math

import pytest
import torch
from conftest import random_batch

import fastweights as fw
import masks
import model


def rows(targets):
    """Each position's group is its row: model.loss's per-row means, (B,)."""
    B, S = targets.shape
    return torch.arange(B)[:, None].expand(B, S), B


def hybrid_dense(b):
    B, S = b["idx"].shape
    return masks.dense_mask(masks.hybrid(b["loss_mask"], b["attention_mask"], b["document_ids"]),
                            B, S, "cpu")


def test_adapted_layers_follow_the_authors_rule():
    assert fw.adapted_layers(24, 0.35) == range(15, 24)        # int(24 * 0.65) = 15
    assert fw.adapted_layers(28, 0.35) == range(18, 28)        # Qwen2.5-7B: int(28 * 0.65) = 18
    assert fw.adapted_layers(4, 1.0) == range(0, 4)


def test_fresh_fast_weights_compute_the_base_model_exactly(tiny_model):
    b = random_batch()
    cfg = fw.InnerConfig(rank=4, alpha=8)
    fast = fw.init_fast(tiny_model, cfg, groups=2)
    assert set(fast) == {f"h.{i}.mlp.{p}.{m}" for i in (2, 3) for p in ("gate", "up", "down")
                         for m in "AB"}
    assert fast["h.2.mlp.gate.A"].shape == (2, 4, 32) and fast["h.2.mlp.gate.B"].shape == (2, 64, 4)
    assert fast["h.3.mlp.down.A"].shape == (2, 4, 64) and fast["h.3.mlp.down.B"].shape == (2, 32, 4)
    A = fast["h.2.mlp.gate.A"]
    bound = 1 / math.sqrt(32)  # kaiming-uniform(a=sqrt 5) = U(-1/sqrt(in), ..)
    assert A.abs().max() <= bound and A.std() > bound / 3 and not torch.equal(A[0], A[1])
    mask = hybrid_dense(b)
    base = tiny_model(b["idx"], b["pos"], mask, b["targets"])
    reset = tiny_model(b["idx"], b["pos"], mask, b["targets"], fast, cfg.scale)
    assert torch.equal(base, reset)
    nudged = {k: v + 0.1 for k, v in fast.items()}  # and non-zero fast weights do change it
    assert not torch.equal(base, tiny_model(b["idx"], b["pos"], mask, b["targets"], nudged,
                                            cfg.scale))


def test_each_row_has_its_own_fast_weights(tiny_model):
    """Changing row 1's fast weights changes row 1's loss and leaves row 0's bit for bit."""
    b, cfg = random_batch(), fw.InnerConfig(rank=4, alpha=8)
    mask = hybrid_dense(b)
    fast = {k: v + 0.05 for k, v in fw.init_fast(tiny_model, cfg, groups=2).items()}
    x = tiny_model.blocks(tiny_model.wte(b["idx"]), tiny_model.rope(b["pos"]), mask, range(4), fast,
                          cfg.scale)
    before = tiny_model.loss(x, b["targets"], groups=rows(b["targets"]))
    fast = {k: torch.stack([v[0], v[1] * 3]) for k, v in fast.items()}
    x = tiny_model.blocks(tiny_model.wte(b["idx"]), tiny_model.rope(b["pos"]), mask, range(4), fast,
                          cfg.scale)
    after = tiny_model.loss(x, b["targets"], groups=rows(b["targets"]))
    assert after[0] == before[0] and after[1] != before[1]


@pytest.mark.parametrize("grad_fn", [fw.func_grad, fw.autograd_grad])
def test_one_inner_step_is_a_hand_computed_clipped_sgd_step(grad_fn):
    """Row b's loss 1/2 sum_k ||phi_k[b] - t_k[b]||^2 has gradient phi_k[b] - t_k[b]: the update by
    hand. Row 0 is near its target (no clipping), row 1 far (clipped), each tensor of each row on
    its own."""
    torch.manual_seed(0)
    tgt = {"w": torch.randn(2, 3, 4), "v": torch.randn(2, 5, 2)}
    phi = {k: torch.stack([t[0] + 0.01 * torch.randn_like(t[0]),
                           t[1] + 10 * torch.randn_like(t[1])])
           for k, t in tgt.items()}

    def loss_fn(f):                                             # (rows,)
        return sum(0.5 * (f[k] - tgt[k]).pow(2).flatten(1).sum(1) for k in f)

    cfg = fw.InnerConfig(steps=1, lr=0.5, clip=1.0)
    new, losses = fw.adapt(loss_fn, phi, cfg, grad_fn)
    clipped = []
    for k in phi:
        for row in range(2):
            g = phi[k][row] - tgt[k][row]
            n = math.sqrt(float((g * g).sum()))
            step = g if n <= 1.0 else g / n  # clip this tensor of this row to norm 1
            clipped.append(n > 1.0)
            torch.testing.assert_close(new[k][row], phi[k][row] - 0.5 * step)
    assert clipped == [False, True, False, True]  # both branches of the clip were exercised
    torch.testing.assert_close(losses, loss_fn(phi)[None])  # (steps, rows)
    assert all(not v.requires_grad and v.grad_fn is None for v in new.values())


def test_non_finite_inner_loss_skips_the_step_for_that_row_only():
    phi = {"w": torch.ones(2, 2, 2)}
    cfg = fw.InnerConfig(steps=3, lr=0.1)
    nan_in_row_0 = torch.tensor([float("nan"), 1.0])
    new, losses = fw.adapt(
        lambda f: (f["w"] * nan_in_row_0[:, None, None]).pow(2).flatten(1).sum(1), phi, cfg,
        fw.autograd_grad)
    assert torch.equal(new["w"][0], phi["w"][0]) and losses[:, 0].isnan().all()
    assert not torch.equal(new["w"][1], phi["w"][1]) and torch.isfinite(new["w"][1]).all()


def test_non_finite_gradient_of_a_finite_loss_skips_the_step_for_that_row_only():
    """sqrt(|w|) at w = 0: the loss is 0, its gradient NaN. That row keeps its weights, the other
    one steps."""
    phi = {"w": torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])}
    new, losses = fw.adapt(lambda f: f["w"].abs().sqrt().flatten(1).sum(1), phi,
                           fw.InnerConfig(steps=2, lr=0.1), fw.autograd_grad)
    assert torch.isfinite(losses).all() and torch.equal(new["w"][0], phi["w"][0])
    assert (new["w"][1] < 1).all() and torch.isfinite(new["w"]).all()


def model_inner_loss(model, b, mask, cfg, targets=None):
    """The inner loss computed the plain way: the whole model, every layer, from the tokens ->
    (rows,)."""
    targets = b["targets"] if targets is None else targets
    return lambda f: model.loss(model.blocks(model.wte(b["idx"]), model.rope(b["pos"]), mask,
                                             range(model.config.n_layer), f, cfg.scale), targets,
                                groups=rows(targets))


def test_func_grad_and_autograd_grad_give_the_same_update(tiny_model):
    b, cfg = random_batch(), fw.InnerConfig(rank=4, alpha=8, steps=2)
    mask = hybrid_dense(b)
    torch.manual_seed(1)
    fast = fw.init_fast(tiny_model, cfg, groups=2)
    a, la = fw.adapt(model_inner_loss(tiny_model, b, mask, cfg), fast, cfg, fw.func_grad)
    c, lc = fw.adapt(model_inner_loss(tiny_model, b, mask, cfg), fast, cfg, fw.autograd_grad)
    for k in fast:
        torch.testing.assert_close(a[k], c[k], atol=1e-6, rtol=1e-5)
        assert not torch.equal(a[k], fast[k])                   # both really moved
    torch.testing.assert_close(la, lc)
    assert (lc[1] < lc[0]).all()  # and each row's inner loss went down


@pytest.mark.parametrize("grad_fn", [fw.func_grad, fw.autograd_grad])
def test_inner_loop_leaves_no_gradient_on_base_weights(tiny_model, grad_fn):
    b, cfg = random_batch(), fw.InnerConfig(rank=4, alpha=8)
    fast, _ = fw.adapt(model_inner_loss(tiny_model, b, hybrid_dense(b), cfg),
                       fw.init_fast(tiny_model, cfg, 2), cfg, grad_fn)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(not v.requires_grad and v.grad_fn is None
               for v in fast.values())  # nothing to backprop into


@pytest.mark.parametrize("inner_loss,chunk", [("response", None), ("context", None),
                                              ("response", 3)])
def test_focusft_loss_equals_the_unoptimised_bilevel_step(tiny_model, inner_loss, chunk,
                                                          monkeypatch):
    """focusft_loss shares the lower layers and re-runs only the upper ones; the naive step re-runs
    the whole model everywhere. Same fast weights, same outer loss, same base-weight gradients.
    With a loss chunk of 3 targets: the outer loss recomputes its chunks' logits in the backward,
    the inner one (under torch.func.grad, which refuses checkpoint's hooks) does not."""
    if chunk:
        monkeypatch.setattr(model, "LOSS_CHUNK", chunk)
    b, cfg = random_batch(), fw.InnerConfig(rank=4, alpha=8, loss=inner_loss, steps=2, lr=0.5)
    mask = hybrid_dense(b)
    inner_mask = inner_targets = None
    if inner_loss == "context":
        from data.packing import context_targets
        inner_mask = masks.dense_mask(masks.causal(b["attention_mask"], b["document_ids"]), 2, 70,
                                      "cpu")
        inner_targets = context_targets(b)

    torch.manual_seed(5)
    batch = b if inner_targets is None else {**b, "context_targets": inner_targets}
    loss, record = fw.focusft_loss(tiny_model, batch, mask, cfg, inner_mask)
    grads = torch.autograd.grad(loss, list(tiny_model.parameters()))

    torch.manual_seed(5)
    # each row's fresh fast weights from its own seed, as focusft_loss draws them
    fast = fw.init_fast(tiny_model, cfg, groups=2, seeds=fw.row_seeds(range(2)))
    start = {k: v.clone() for k, v in fast.items()}
    naive_targets = b["targets"] if inner_targets is None else inner_targets
    naive_mask = mask if inner_mask is None else inner_mask
    for _ in range(cfg.steps):  # phi <- phi - lr * clip(grad), per row, first order
        leaves = {k: v.clone().requires_grad_() for k, v in fast.items()}
        for row in range(2):  # each row: the gradient of its own mean loss
            li = model_inner_loss(tiny_model, b, naive_mask, cfg, naive_targets)(leaves)[row]
            g = torch.autograd.grad(li, list(leaves.values()))
            for (k, v), gk in zip(leaves.items(), g):
                gk = gk[row]
                fast[k][row] = (v[row] - cfg.lr * gk
                                * min(1.0, cfg.clip / (gk.norm().item() + 1e-6))).detach()
    naive = tiny_model(b["idx"], b["pos"], mask, b["targets"], fast, cfg.scale)
    torch.testing.assert_close(loss, naive)
    for got, want in zip(grads, torch.autograd.grad(naive, list(tiny_model.parameters()))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert record["losses"].shape == (2, 2)
    assert not torch.equal(loss, tiny_model(b["idx"], b["pos"], mask, b["targets"]))
    # the record, by hand
    after = model_inner_loss(tiny_model, b, naive_mask, cfg, naive_targets)(fast)
    moved = sum((fast[k] - start[k]).flatten(1).square().sum(1) for k in fast).sqrt()
    torch.testing.assert_close(record["after"], after)
    torch.testing.assert_close(record["moved"], moved)
    assert record["has"].tolist() == [True, True] and (moved > 0).all()


def test_frozen_makes_base_weights_constants_then_restores_them(tiny_model):
    tiny_model.lm_head.weight.requires_grad_(False)  # a weight frozen by the user stays frozen
    with pytest.raises(RuntimeError, match="inside"):
        with fw.frozen(tiny_model):
            assert not any(p.requires_grad for p in tiny_model.parameters())
            raise RuntimeError("inside")
    assert [n for n, p in tiny_model.named_parameters()
            if not p.requires_grad] == ["wte.weight"]  # tied


def packed_batch(docs_per_row=((3, 30, 25), (40, 28)), S=100, vocab=128, seed=0):
    """Rows packing several documents (lengths given), each a context turn then a response turn,
    padded."""
    from model import IGNORE
    g = torch.Generator().manual_seed(seed)
    B = len(docs_per_row)
    b = {"idx": torch.randint(0, vocab, (B, S), generator=g),
         "loss_mask": torch.zeros(B, S, dtype=torch.long),
         "document_ids": torch.full((B, S), -1), "pos": torch.zeros(B, S, dtype=torch.long)}
    for row, lengths in enumerate(docs_per_row):
        start = 0
        for d, n in enumerate(lengths):
            b["document_ids"][row, start:start + n] = d
            b["pos"][row, start:start + n] = torch.arange(n)
            b["loss_mask"][row, start + n * 2 // 3:start + n] = 1
            start += n
    b["attention_mask"] = b["document_ids"] >= 0
    same = (b["document_ids"][:, 1:] == b["document_ids"][:, :-1]) & (b["loss_mask"][:, 1:] == 1)
    b["targets"] = torch.full_like(b["idx"], IGNORE)
    b["targets"][:, :-1] = torch.where(same, b["idx"][:, 1:], IGNORE)
    return b


def test_sample_groups_give_each_sample_its_slot():
    from data import batches
    b = packed_batch()
    ids, ends = batches.sample_groups(b["document_ids"], slots=4)
    # padding joins its row's last sample
    assert ends.tolist() == [3, 33, 100, 100, 140, 200, 200, 200]
    assert ids[0, :3].eq(0).all() and ids[0, 3:33].eq(1).all() and ids[0, 33:].eq(2).all()
    assert ids[1, :40].eq(4).all() and ids[1, 40:].eq(5).all()  # row 1: slots 4, 5 (6, 7 unused)
    with pytest.raises(ValueError, match="more than its 2"):
        batches.sample_groups(b["document_ids"], slots=2)


@pytest.mark.parametrize("grad_fn_name", ["func_grad", "autograd_grad"])
def test_per_sample_fast_weights_equal_a_loop_over_the_samples_one_at_a_time(tiny_model,
                                                                             monkeypatch,
                                                                             grad_fn_name):
    """Packed rows, one set of fast weights per sample (grouped LoRA, the document mask keeping
    samples apart) against each sample run alone in a batch of its own (one row, plain per-row
    LoRA), from the same starting fast weights: the same inner losses, adapted weights, outer loss
    (the answer-weighted mean of the samples') and base-weight gradients (the same weighted sum)."""
    from data import batches
    if grad_fn_name == "autograd_grad":  # the flex route's gradient function, here on SDPA
        monkeypatch.setattr(fw, "func_grad", fw.autograd_grad)
    cfg = fw.InnerConfig(rank=4, alpha=8, steps=2, lr=0.5)
    b, slots = packed_batch(), 4
    torch.manual_seed(3)
    start = fw.init_fast(tiny_model, cfg, groups=2 * slots)
    start = {k: v + 0.1 * torch.randn_like(v) if k.endswith(".B") else v
             for k, v in start.items()}  # B != 0
    params = list(tiny_model.parameters())

    def run(batch, phi):
        monkeypatch.setattr(fw, "init_fast",
                            lambda model, c, groups, seeds: {k: v.clone() for k, v in phi.items()})
        B, S = batch["idx"].shape
        loss, record = fw.focusft_loss(tiny_model, batch, hybrid_dense(batch), cfg)
        return loss, record, torch.autograd.grad(loss, params)

    loss, record, grads = run(batches.to_device(b, "cpu", slots), start)
    want_loss, want_grads, n_total = (0.0, [torch.zeros_like(p) for p in params],
                                      int((b["targets"] != -100).sum()))
    for row in range(2):
        for d in range(int(b["document_ids"][row].max()) + 1):
            cut = (b["document_ids"][row] == d).nonzero()[:, 0]
            alone = {k: v[row, cut][None] for k, v in b.items()}
            alone["document_ids"] = torch.zeros_like(alone["document_ids"])
            g = row * slots + d
            l, r, gr = run(alone, {k: v[g:g + 1] for k, v in start.items()})
            for key in ("losses", "after", "moved"):
                torch.testing.assert_close(record[key][..., g], r[key][..., 0], atol=1e-5,
                                           rtol=1e-4)
            n = int((alone["targets"] != -100).sum())
            want_loss = want_loss + l * n / n_total
            want_grads = [w + gi * n / n_total for w, gi in zip(want_grads, gr)]
    torch.testing.assert_close(loss, want_loss)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert record["has"].tolist() == [True, True, True, False, True, True, False, False]
    assert ((record["moved"][record["has"]] > 0).all()
            and (record["moved"][~record["has"]] == 0).all())
    # every sample adapted to itself
    assert (record["losses"][1] < record["losses"][0])[record["has"]].all()
