"""Greedy decoding with a KV cache, under the mask the model was trained with, several prompts at
once.

    outputs = generate_batch(model, [ids_a, ids_b], "hybrid", "cuda", max_new=20,
                             stop=(NEWLINE, PAD_ID))
    tokens = generate(model, prompt_ids, "hybrid", "cuda", max_new=20,
                      stop=(NEWLINE, PAD_ID))   # one prompt

Used by every evaluation (eval_babilong.py; any later benchmark). Two ideas to hold:
  1. The prompts are run once (prefill) under the chosen mask, each row under its own: with `hybrid`
     a row's prompt is one context turn, so every prompt token sees every other one, as context did
     in training; with `causal`, as in SFT. Each layer keeps the prompts' keys and values. Each new
     token is then one response token: it attends to its row's prompt and to every token generated
     since (a response sees everything before it), and appends its own key and value.
  2. The prompts are right-padded to one length, a multiple of PAD_TO tokens, so the compiled
     kernels see a few shapes, not one per prompt length. Padding neither sees nor is seen: in the
     prefill through the mask, in decoding through a (B, 1, 1, K) key mask. Row b's prompt has n_b
     tokens, so its i-th new token sits at position n_b + i, whatever the other rows' lengths.
"""
import time

import torch
from torch import Tensor

import masks
from data import tokenizer
from model import GPT

# padded prompt tokens per decoding batch (decode_all): 64 rows of 1K keep a GPU busy, 2 of 32K fit
EVAL_TOKENS = 65536
PAD_TO = 1024          # prompt lengths are rounded up to this: few compiled shapes


def padded_length(n: int) -> int:
    """n rounded up to a multiple of PAD_TO: the padded size of an n-token prompt."""
    return -(-n // PAD_TO) * PAD_TO


def padded(prompts: list[list[int]], device) -> tuple[Tensor, int]:
    """(B, S) tokens right-padded with PAD_ID to S, the padded length of the longest prompt."""
    S = padded_length(max(len(ids) for ids in prompts))
    idx = torch.full((len(prompts), S), tokenizer.PAD_ID)
    for b, ids in enumerate(prompts):
        idx[b, :len(ids)] = torch.tensor(ids)
    return idx.to(device), S


def prompt_mask(kind: str, lengths: Tensor, padded: int, device):
    """Mask of prompts of lengths (B,) padded to `padded`: each row one context turn (hybrid) or
    causal."""
    valid = torch.arange(padded, device=device)[None] < lengths[:, None]              # (B, S)
    # all context, no response
    zeros = torch.zeros(len(lengths), padded, dtype=torch.long, device=device)
    return masks.by_name(kind, zeros, valid)


@torch.no_grad()
def prefill_batch(model: GPT, prompts: list[list[int]], mask_kind: str,
                  device) -> tuple[Tensor, list[dict]]:
    """Run the prompts once, padded to one multiple of PAD_TO; return each row's logits at its own
    last prompt token (B, vocab) and the per-layer K/V caches, cut after the longest prompt (the
    rest is padding)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)                  # (B,)
    idx, S = padded(prompts, device)                                                  # (B, S)
    mask = masks.for_backend(model.config.attn, prompt_mask(mask_kind, lengths, S, device),
                             len(prompts), S, device)
    caches = [{} for _ in model.h]
    x = model.blocks(model.wte(idx), model.rope(torch.arange(S, device=device)[None]), mask,
                     range(model.config.n_layer), caches=caches)                      # (B, S, C)
    longest = max(len(p) for p in prompts)
    for cache in caches:  # padding after all rows
        # (B, nkv, n_max, hs)
        cache["k"], cache["v"] = cache["k"][:, :, :longest], cache["v"][:, :, :longest]
    return model.logits_at(x, (lengths - 1)[:, None])[:, 0], caches                   # (B, vocab)


@torch.no_grad()
def decode_batch(model: GPT, tokens: Tensor, positions: Tensor, caches: list[dict],
                 keys: Tensor | None) -> Tensor:
    """One new token per row, tokens and positions (B,), appended to the caches. It attends to the
    keys that `keys` (B, 1, 1, K) marks, K counting the cache with this token in it (None: every
    key). -> (B, vocab)."""
    x = model.blocks(model.wte(tokens[:, None]), model.rope(positions[:, None]), keys,
                     range(model.config.n_layer), caches=caches)                      # (B, 1, C)
    return model.logits_at(x, torch.zeros_like(tokens)[:, None])[:, 0]                # (B, vocab)


def prefill(model: GPT, prompt: list[int], mask_kind: str, device) -> tuple[Tensor, list[dict]]:
    """One prompt: its last token's logits (vocab,) and the caches without padding."""
    logits, caches = prefill_batch(model, [prompt], mask_kind, device)
    return logits[0], caches


def decode_step(model: GPT, token: int, position: int, caches: list[dict], device) -> Tensor:
    """One new token of one prompt at `position`: it attends to every cached key. -> (vocab,)"""
    return decode_batch(model, torch.tensor([token], device=device),
                        torch.tensor([position], device=device), caches, None)[0]


@torch.no_grad()
def generate_batch(model: GPT, prompts: list[list[int]], mask_kind: str, device, max_new: int,
                   stop: tuple) -> list[list[int]]:
    """Greedy continuations of the prompts, each ending at a `stop` token (not returned) or after
    max_new tokens. A finished row is still decoded with the others (its tokens are dropped) until
    all are finished."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)      # (B,)
    logits, caches = prefill_batch(model, prompts, mask_kind, device)     # (B, vocab)
    longest = max(len(p) for p in prompts)                                # the caches' prompt part
    keys = torch.arange(longest, device=device)[None] < lengths[:, None]  # (B, n_max): real prompt
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for i in range(max_new):
        tokens = logits[:, :tokenizer.PAD_ID + 1].argmax(dim=-1)          # (B,) real GPT-2 ids only
        for b, token in enumerate(tokens.tolist()):
            if done[b]:                                                   # finished: token dropped
                continue
            if token in stop:
                done[b] = True
            else:
                out[b].append(token)
        if all(done) or i == max_new - 1:                                 # else nothing to read
            break
        keys = torch.cat([keys, keys.new_ones(len(prompts), 1)], dim=1)   # (B, n_max + i + 1)
        # keys (B, 1, 1, K)
        logits = decode_batch(model, tokens, lengths + i, caches, keys[:, None, None])
    return out


def generate(model: GPT, prompt: list[int], mask_kind: str, device, max_new: int,
             stop: tuple) -> list[int]:
    """Greedy continuation of one prompt, ending at a `stop` token or after max_new tokens."""
    return generate_batch(model, [prompt], mask_kind, device, max_new, stop)[0]


def decoding_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of prompts of these lengths, grouped by padded size and cut into batches of
    budget // size rows (at least one): full batches of one shape, so the GPU compiles flex once per
    (rows, size); a group's last batch may be smaller."""
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(padded_length(n), []).append(i)
    batches = []
    for size, rows in sorted(groups.items()):
        per_batch = max(1, budget // size)
        batches += [rows[j:j + per_batch] for j in range(0, len(rows), per_batch)]
    return batches


def decode_all(model, enc, prompts: list[list[int]], mask_kind: str, device, max_new: int,
               stop: tuple):
    """Greedy answers to the prompts, decoded in batches (decoding_batches): (index, text, seconds)
    for each prompt, batch by batch; a prompt's seconds are its batch's time over the batch's
    rows."""
    for batch in decoding_batches([len(p) for p in prompts], EVAL_TOKENS):
        t0 = time.perf_counter()
        outputs = generate_batch(model, [prompts[i] for i in batch], mask_kind, device, max_new,
                                 stop)
        outputs = [enc.decode(tokens) for tokens in outputs]
        seconds = (time.perf_counter() - t0) / len(batch)
        yield from ((i, output, seconds) for i, output in zip(batch, outputs))
