"""Greedy decoding with a KV cache, under the mask the model was trained with.

    tokens = generate(model, prompt_ids, "hybrid", "cuda", max_new=20, stop=(NEWLINE, PAD_ID))

Used by every evaluation (eval_babilong.py; any later benchmark). Two ideas to hold:
  1. The prompt is run once (prefill) under the chosen mask: with `hybrid` it is one context turn, so every
     prompt token sees every other one, as context did in training; with `causal`, as in SFT. Each layer keeps
     the prompt's keys and values. Each new token is then one response token: it attends to all cached keys
     and to itself (a response sees everything before it), and appends its own key and value.
  2. The prompt is padded to a multiple of PAD_TO tokens, so the compiled kernels see a few shapes, not one per
     prompt length; the padding neither sees nor is seen, and is cut from the caches before decoding.
"""
import torch

import data
import masks
from model import GPT

PAD_TO = 1024          # prompt lengths are rounded up to this: few compiled shapes


def prompt_mask(kind: str, n_real: int, padded: int, device):
    """Mask of a prompt of n_real tokens padded to `padded`: one context turn (hybrid) or causal."""
    valid = (torch.arange(padded, device=device) < n_real)[None]                    # (1, S)
    zeros = torch.zeros(1, padded, dtype=torch.long, device=device)                 # all context, no response
    return masks.by_name(kind, zeros, valid)


def padded(ids: list[int], device) -> tuple[torch.Tensor, int]:
    """(1, S) tokens padded with PAD_ID to S, the next multiple of PAD_TO: few shapes for compiled kernels."""
    S = -(-len(ids) // PAD_TO) * PAD_TO
    idx = torch.full((1, S), data.PAD_ID, device=device)
    idx[0, :len(ids)] = torch.tensor(ids, device=device)
    return idx, S


@torch.no_grad()
def prefill(model: GPT, prompt: list[int], mask_kind: str, device) -> tuple[torch.Tensor, list[dict]]:
    """Run the prompt once, padded to a multiple of PAD_TO; return the last token's logits (vocab,) and the
    per-layer K/V caches with the padding cut off."""
    n = len(prompt)
    idx, S = padded(prompt, device)
    mask = masks.for_backend(model.config.attn, prompt_mask(mask_kind, n, S, device), 1, S, device)
    caches = [{} for _ in model.h]
    x = model.blocks(model.wte(idx), model.rope(torch.arange(S, device=device)[None]), mask,
                     range(model.config.n_layer), caches=caches)
    for cache in caches:                                                              # forget the padding
        cache["k"], cache["v"] = cache["k"][:, :, :n], cache["v"][:, :, :n]
    return model.logits_at(x, torch.tensor([[n - 1]], device=device))[0, 0], caches


@torch.no_grad()
def decode_step(model: GPT, token: int, position: int, caches: list[dict], device) -> torch.Tensor:
    """One new token at `position`: it attends to every cached key (a response sees all before it)."""
    x = model.blocks(model.wte(torch.tensor([[token]], device=device)),
                     model.rope(torch.tensor([[position]], device=device)), None, range(model.config.n_layer),
                     caches=caches)
    return model.logits_at(x, torch.zeros(1, 1, dtype=torch.long, device=device))[0, 0]   # (vocab,)


def generate(model: GPT, prompt: list[int], mask_kind: str, device, max_new: int, stop: tuple) -> list[int]:
    """Greedy continuation of `prompt`, ending at a `stop` token or after max_new tokens."""
    logits, caches = prefill(model, prompt, mask_kind, device)
    out = []
    for i in range(max_new):
        token = int(logits[:data.PAD_ID + 1].argmax())                                # real GPT-2 ids only
        if token in stop:
            break
        out.append(token)
        if len(out) < max_new:                                                          # else nothing to read
            logits = decode_step(model, token, len(prompt) + i, caches, device)
    return out
