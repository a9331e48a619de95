"""generate.py: prefill plus cached one-token steps against re-running the whole sequence; greedy stopping.

Run: python -m pytest -q tests/test_generate.py
"""
import pytest
import torch

import generate
import masks
from conftest import tiny_config
from model import GPT


@pytest.mark.parametrize("mask_kind,attn", [("hybrid", "sdpa"), ("causal", "sdpa"), ("hybrid", "flex")])
def test_kv_cache_logits_equal_recomputing_everything(monkeypatch, mask_kind, attn):
    """Prefill + one-token decode steps == re-running the whole sequence for every token, where the prompt
    is one context turn and the continuation a response turn (causal, seeing the prompt)."""
    monkeypatch.setattr(generate, "PAD_TO", 64)                # the prompt gets padded: the cache must drop it
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304, attn=attn)).eval()
    with torch.no_grad():                                      # sharp attention: positions and keys matter
        for block in model.h:
            block.attn.q_proj.weight.mul_(20)
            block.attn.kv_proj.weight.mul_(20)
    prompt = torch.randint(0, 50000, (45,)).tolist()
    continuation = torch.randint(0, 50000, (6,)).tolist()
    got = [generate.prefill(model, prompt, mask_kind, "cpu")]
    caches = got[0][1]
    got = [got[0][0]] + [generate.decode_step(model, t, len(prompt) + i, caches, "cpu")
                         for i, t in enumerate(continuation)]
    with torch.no_grad():
        ids = prompt + continuation
        loss_mask = torch.tensor([[0] * len(prompt) + [1] * len(continuation)])
        mod = masks.hybrid(loss_mask) if mask_kind == "hybrid" else masks.causal()
        x = model.blocks(model.wte(torch.tensor([ids])), model.rope(torch.arange(len(ids))[None]),
                         masks.dense_mask(mod, 1, len(ids), "cpu"), range(4))
        want = model.lm_head(model.ln_f(x[0, len(prompt) - 1:]))               # (7, vocab)
    for step, logits in enumerate(got):
        torch.testing.assert_close(logits, want[step], atol=2e-4, rtol=1e-4)
    assert (want[0] - want[-1]).abs().max() > 0.1                              # the steps really differ


def test_generate_is_greedy_over_real_ids_and_stops(monkeypatch):
    """generate takes the argmax over real GPT-2 ids (the padded vocabulary's extra rows never win), passes
    each token on at the next position, and ends at a stop token (not returned) or after max_new tokens."""
    script = [7, 9, 3, 5]                                   # the token each step's logits prefer
    seen = []

    def logits_for(step):
        out = torch.zeros(50304)
        out[script[step]], out[50300] = 1.0, 5.0             # 50300: a padding row, larger but not a real id
        return out
    monkeypatch.setattr(generate, "prefill", lambda model, prompt, kind, device: (logits_for(0), []))

    def decode_step(model, token, position, caches, device):
        seen.append((token, position))
        return logits_for(len(seen))
    monkeypatch.setattr(generate, "decode_step", decode_step)
    assert generate.generate(None, [1, 2], "hybrid", "cpu", max_new=10, stop=(3,)) == [7, 9]
    assert seen == [(7, 2), (9, 3)]
    seen.clear()
    assert generate.generate(None, [1, 2], "hybrid", "cpu", max_new=2, stop=(4,)) == [7, 9]
    assert seen == [(7, 2)]                                  # no forward pass for a token that will not come
