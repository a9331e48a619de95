"""The hybrid mask against a reference written the slow, obvious way; flex against SDPA on the same
predicate.

Run: python -m pytest -q tests/test_masks.py
"""
import random

import pytest
import torch
from conftest import random_batch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import masks


def reference_hybrid(loss_mask, attention_mask, document_ids):
    """Dense (S, S) mask of one row, straight from the rule's wording, with Python loops."""
    S = len(loss_mask)
    # 1. cut the row into turns: maximal runs of equal (document, loss flag)
    turn_of, turns = [], []
    for i in range(S):
        key = (document_ids[i], loss_mask[i])
        if not turns or turns[-1]["key"] != key:
            turns.append({"key": key, "start": i})
        turn_of.append(len(turns) - 1)
    mask = torch.zeros(S, S, dtype=torch.bool)
    for q in range(S):
        for k in range(S):
            if not (attention_mask[q] and attention_mask[k]) or document_ids[q] != document_ids[k]:
                continue                                        # padding, or another document
            tq, tk = turn_of[q], turn_of[k]
            if tk < tq:
                mask[q, k] = True                               # an earlier turn: fully visible
            elif tk == tq:
                is_response = loss_mask[q] == 1
                # causal response, bidirectional context
                mask[q, k] = (k <= q) if is_response else True
    return mask


def reference_causal(attention_mask, document_ids):
    S = len(attention_mask)
    return torch.tensor([[bool(attention_mask[q] and attention_mask[k]
                               and document_ids[q] == document_ids[k] and k <= q)
                          for k in range(S)] for q in range(S)])


def random_layout(rng: random.Random, S: int):
    """Random turns, a random number of packed documents and trailing padding."""
    loss_mask, docs = [], []
    n_docs = rng.randint(1, 3)
    for i in range(S):
        loss_mask.append(loss_mask[-1] if loss_mask and rng.random() < 0.8 else rng.randint(0, 1))
    cuts = sorted(rng.sample(range(1, S), min(n_docs - 1, S - 1))) if S > 1 else []
    d = 0
    for i in range(S):
        d += i in cuts
        docs.append(d)
    n_pad = rng.randint(0, S // 3)
    attention = [1] * (S - n_pad) + [0] * n_pad
    return loss_mask, attention, docs


def as_batch(*rows):
    return [torch.tensor([row]) for row in rows]


@pytest.mark.parametrize("seed", range(300))
def test_hybrid_matches_reference_small(seed):
    rng = random.Random(seed)
    S = rng.randint(1, 40)
    lm, am, docs = random_layout(rng, S)
    got = masks.dense_mask(masks.hybrid(*as_batch(lm, am, docs)), 1, S, "cpu")[0, 0]
    assert torch.equal(got, reference_hybrid(lm, am, docs))


@pytest.mark.parametrize("S", [130, 232, 300])
def test_hybrid_and_causal_match_reference_at_odd_lengths(S):
    rng = random.Random(S)
    lm, am, docs = random_layout(rng, S)
    got = masks.dense_mask(masks.hybrid(*as_batch(lm, am, docs)), 1, S, "cpu")[0, 0]
    assert torch.equal(got, reference_hybrid(lm, am, docs))
    got = masks.dense_mask(masks.causal(*as_batch(am, docs)), 1, S, "cpu")[0, 0]
    assert torch.equal(got, reference_causal(am, docs))


def test_degenerate_layouts():
    S = 12
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    all_response = masks.dense_mask(
        masks.hybrid(torch.ones(1, S, dtype=torch.long)), 1, S, "cpu")[0, 0]
    all_context = masks.dense_mask(
        masks.hybrid(torch.zeros(1, S, dtype=torch.long)), 1, S, "cpu")[0, 0]
    assert torch.equal(all_response, causal)
    assert all_context.all()


def test_batch_rows_are_independent():
    rng = random.Random(7)
    rows = [random_layout(rng, 64) for _ in range(3)]
    lm, am, docs = (torch.tensor([r[i] for r in rows]) for i in range(3))
    got = masks.dense_mask(masks.hybrid(lm, am, docs), 3, 64, "cpu")[:, 0]
    for b, (l, a, d) in enumerate(rows):
        assert torch.equal(got[b], reference_hybrid(l, a, d))


@pytest.mark.parametrize("S,gqa", [(232, False), (256, True)])
def test_flex_forward_matches_sdpa(S, gqa):
    """Same predicate through flex (eager, forward only on CPU) and SDPA with the dense mask."""
    torch.manual_seed(0)
    rng = random.Random(S)
    rows = [random_layout(rng, S) for _ in range(2)]
    lm, am, docs = (torch.tensor([r[i] for r in rows]) for i in range(3))
    mod = masks.hybrid(lm, am, docs)
    q = torch.randn(2, 4, S, 16)
    k, v = torch.randn(2, 2 if gqa else 4, S, 16), torch.randn(2, 2 if gqa else 4, S, 16)
    block = create_block_mask(mod, 2, None, S, S, device="cpu")
    out_flex = flex_attention(q, k, v, block_mask=block, enable_gqa=gqa)
    dense = masks.dense_mask(mod, 2, S, "cpu")
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                enable_gqa=gqa)
    assert not out_sdpa.isnan().any()
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-5, rtol=1e-5)
    padded = ~am.bool()  # rows that see nothing: zeros on both paths
    assert out_sdpa.transpose(1, 2)[padded].abs().max() == 0 if padded.any() else True


def test_turn_ids_step_at_flips_and_documents():
    lm = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 1]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    assert masks.turn_ids(lm, docs).tolist() == [[0, 0, 1, 1, 2, 3, 3, 4]]


def test_demo_draws_every_mask(capsys):
    masks._demo()
    out = capsys.readouterr().out
    assert out.count("■") > 100 and "hybrid, two turns" in out and "packed" in out


def test_by_name_picks_the_named_mask():
    """masks.by_name: "hybrid" is the hybrid mask, "causal" the causal one (the loss mask unused);
    else an error."""
    b = random_batch(B=2, S=40, seed=2)
    args = (b["loss_mask"], b["attention_mask"], b["document_ids"])
    dense = lambda mod: masks.dense_mask(mod, 2, 40, "cpu")                       # noqa: E731
    assert torch.equal(dense(masks.by_name("hybrid", *args)), dense(masks.hybrid(*args)))
    assert torch.equal(dense(masks.by_name("causal", *args)), dense(masks.causal(*args[1:])))
    assert not torch.equal(dense(masks.hybrid(*args)), dense(masks.causal(*args[1:])))
    with pytest.raises(ValueError, match="unknown mask"):
        masks.by_name("bidirectional", *args)
