"""generate.py: prefill plus cached one-token steps against re-running the whole sequence; greedy
stopping; batched decoding against each prompt alone and against greedy decoding without a cache.

Run: python -m pytest -q tests/test_generate.py
"""
import pytest
import torch
from conftest import tiny_config

import generate
import masks
from data import tokenizer
from model import GPT

LENGTHS = (5, 37, 300)  # prompts of a batch: none a multiple of the PAD_TO the tests set (64)


def sharp_model(attn: str = "sdpa", device: str = "cpu", n_embd: int = 32) -> GPT:
    """A tiny random model whose attention is sharp, so that which keys a token sees and where they
    sit change what it predicts."""
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304, n_embd=n_embd, attn=attn)).to(device).eval()
    with torch.no_grad():
        for block in model.h:
            block.attn.q_proj.weight.mul_(20)
            block.attn.kv_proj.weight.mul_(20)
    return model


def random_prompts(lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_logits(model: GPT, ids: list[int], n_prompt: int, mask_kind: str) -> torch.Tensor:
    """The reference: logits (vocab,) of the last of `ids` from one uncached, unpadded forward pass,
    the first n_prompt tokens a context turn and the rest a response turn (hybrid), or all
    causal."""
    dev = model.wte.weight.device
    loss_mask = torch.tensor([[0] * n_prompt + [1] * (len(ids) - n_prompt)], device=dev)
    mod = masks.hybrid(loss_mask) if mask_kind == "hybrid" else masks.causal()
    x = model.blocks(model.wte(torch.tensor([ids], device=dev)),
                     model.rope(torch.arange(len(ids), device=dev)[None]),
                     masks.dense_mask(mod, 1, len(ids), dev), range(model.config.n_layer))
    return model.lm_head(model.ln_f(x[0, -1]))


def greedy_without_cache(model: GPT, prompt: list[int], mask_kind: str, max_new: int,
                         stop: tuple) -> list[int]:
    """The reference greedy decoder: every token from a full forward pass over the prompt and all
    tokens so far."""
    out = []
    while len(out) < max_new:
        token = int(full_logits(model, prompt + out, len(prompt), mask_kind)
                    [:tokenizer.PAD_ID + 1].argmax())
        if token in stop:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("mask_kind,attn", [("hybrid", "sdpa"), ("causal", "sdpa"),
                                            ("hybrid", "flex")])
def test_kv_cache_logits_equal_recomputing_everything(monkeypatch, mask_kind, attn):
    """Prefill + one-token decode steps == re-running the whole sequence for every token, where the
    prompt is one context turn and the continuation a response turn (causal, seeing the prompt)."""
    monkeypatch.setattr(generate, "PAD_TO", 64)  # the prompt gets padded: the cache must drop it
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304, attn=attn)).eval()
    with torch.no_grad():  # sharp attention: positions and keys matter
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
    assert (want[0] - want[-1]).abs().max() > 0.1  # the steps really differ


def test_generate_batch_is_greedy_over_real_ids_per_row_and_stops(monkeypatch):
    """Scripted logits: generate_batch takes each row's argmax over real GPT-2 ids (the padded
    vocabulary's extra rows never win), feeds row b's i-th token at position n_b + i seeing its own
    prompt's keys and every new one, drops a finished row's later tokens, stops once every row is
    finished, and never runs a forward pass for a token that will not be read. generate is the
    one-row case."""
    scripts = [[7, 3, 8, 8, 8], [9, 9, 6, 2, 3]]  # the token each row's logits prefer at each step
    seen = []

    def logits_for(step):
        out = torch.zeros(len(scripts), 50304)
        out[:, 50300] = 5.0  # a padding row: larger, but not a real id
        for b, script in enumerate(scripts):
            out[b, script[step]] = 1.0
        return out
    monkeypatch.setattr(generate, "prefill_batch",
                        lambda model, prompts, kind, device: (logits_for(0), []))

    def decode_batch(model, tokens, positions, caches, keys):
        seen.append((tokens.tolist(), positions.tolist(), keys[:, 0, 0].tolist()))
        return logits_for(len(seen))
    monkeypatch.setattr(generate, "decode_batch", decode_batch)
    prompts = [[1, 2], [1, 2, 3, 4]]
    assert generate.generate_batch(None, prompts, "hybrid", "cpu", max_new=10, stop=(3,)) == [
        [7], [9, 9, 6, 2]]
    T, F = True, False
    assert seen == [([7, 9], [2, 4], [[T, T, F, F, T], [T, T, T, T, T]]),
                    ([3, 9], [3, 5], [[T, T, F, F, T, T], [T] * 6]),  # row 0 done; decoded anyway
                    ([8, 6], [4, 6], [[T, T, F, F, T, T, T], [T] * 7]),
                    # row 1 stops next: no 5th pass
                    ([8, 2], [5, 7], [[T, T, F, F, T, T, T, T], [T] * 8])]
    seen.clear()
    assert generate.generate_batch(None, prompts, "hybrid", "cpu", max_new=2, stop=()) == [
        [7, 3], [9, 9]]
    assert len(seen) == 1  # no forward pass for a token that will not come
    seen.clear()
    scripts = scripts[:1]
    assert generate.generate(None, [1, 2], "hybrid", "cpu", max_new=10, stop=(8,)) == [7, 3]
    assert [(t, p) for t, p, _ in seen] == [([7], [2]), ([3], [3])]


@pytest.mark.parametrize("mask_kind,attn", [("hybrid", "sdpa"), ("causal", "sdpa"),
                                            ("hybrid", "flex")])
def test_first_token_comes_from_each_prompts_own_last_token(monkeypatch, mask_kind, attn):
    """Batched prefill (padding, per-row masks) gives each row the logits of a full unpadded forward
    pass of its prompt alone at its last token, and generate_batch's first token is their argmax."""
    monkeypatch.setattr(generate, "PAD_TO", 64)
    model, prompts = sharp_model(attn), random_prompts()
    logits, caches = generate.prefill_batch(model, prompts, mask_kind, "cpu")
    want = torch.stack([full_logits(model, p, len(p), mask_kind) for p in prompts])  # (3, vocab)
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
    assert caches[0]["k"].size(2) == max(LENGTHS)  # padding cut
    first = [[int(w[:tokenizer.PAD_ID + 1].argmax())] for w in want]
    assert generate.generate_batch(model, prompts, mask_kind, "cpu", max_new=1, stop=()) == first
    assert len({f[0] for f in first}) == len(prompts)  # rows differ


@pytest.mark.parametrize("mask_kind,attn", [("hybrid", "sdpa"), ("causal", "sdpa"),
                                            ("hybrid", "flex")])
def test_generate_batch_equals_each_prompt_alone_and_greedy_without_cache(monkeypatch, mask_kind,
                                                                          attn):
    """Prompts of 5, 37 and 300 tokens decoded together give the tokens that generate gives each
    alone, and that greedy decoding without a cache gives: run to max_new, and with stop tokens at
    which the rows finish at different steps (then decoding ends with the last row, not at
    max_new)."""
    monkeypatch.setattr(generate, "PAD_TO", 64)
    model, prompts = sharp_model(attn), random_prompts()
    passes = []
    decode_batch = generate.decode_batch
    monkeypatch.setattr(generate, "decode_batch", lambda *a: passes.append(1) or decode_batch(*a))
    max_new = 8
    free = [greedy_without_cache(model, p, mask_kind, max_new, ()) for p in prompts]
    stop = tuple(free[b][step] for b, step in enumerate((1, 3, 5)))  # a row's token there stops it
    for stop in ((), stop):
        want = [greedy_without_cache(model, p, mask_kind, max_new, stop) for p in prompts]
        assert [generate.generate(model, p, mask_kind, "cpu", max_new, stop)
                for p in prompts] == want
        passes.clear()
        assert generate.generate_batch(model, prompts, mask_kind, "cpu", max_new, stop) == want
        if stop:
            assert len({len(w) for w in want}) == len(prompts) and max(map(len, want)) < max_new
            # the pass after the last row's stop token is skipped
            assert len(passes) == max(map(len, want))
        else:
            assert len(passes) == max_new - 1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_prefill_with_compiled_flex_matches_sdpa_on_gpu():
    """On the GPU: one compiled flex BlockMask over rows of different lengths gives the logits of
    the dense SDPA path, and the batch decodes the tokens each prompt decodes alone."""
    # head size 16: compiled flex failed to build at the CPU tests' head size 8 (torch 2.11, H200)
    flex_model, sdpa_model = sharp_model("flex", "cuda", 64), sharp_model("sdpa", "cuda", 64)
    prompts = random_prompts((5, 37, 1500))
    for kind in ("hybrid", "causal"):
        a, _ = generate.prefill_batch(flex_model, prompts, kind, "cuda")
        b, _ = generate.prefill_batch(sdpa_model, prompts, kind, "cuda")
        assert all(rel_err(a[r], b[r]) < 1e-3 for r in range(len(prompts)))
        alone = [generate.generate(flex_model, p, kind, "cuda", 8, ()) for p in prompts]
        assert generate.generate_batch(flex_model, prompts, kind, "cuda", 8, ()) == alone
