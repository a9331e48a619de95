"""Attention statistics: how much attention drains into the sink, and how much of it reaches the
context.

The paper's claim is that FocuSFT moves attention off "attention sinks" (positionally privileged
tokens, above all the first one) and onto the context. Its exact metric definitions were not
available to us, so we use:

  sink mass    mean attention probability on the first token of the query's own document, over every
               query but that first token, averaged over heads and layers.
  engagement   share of a response query's attention that lands on context tokens (loss_mask == 0)
               of its own document other than the first one, averaged over response queries, heads
               and layers.
  sink rate    Gu et al. (ICLR 2025, "When attention sink emerges in language models"): the share of
               (layer, head) pairs whose mean attention on the first token exceeds SINK_EPS.
  sink mass/rate _64   the same over queries in their document's first EARLY positions only: Gu
               et al. measure on sequences of 64 tokens, and over a long document the first token's
               share of a query's attention falls with the query's distance even where a sink
               exists.

The idea to hold: no S x S matrix is needed. flex_attention returns each query's logsumexp (lse)
over the keys its mask allows, so p(first) = exp(q.k_first / sqrt(d) - lse), and the mass on a key
set K is exp(lse_K - lse), where lse_K comes from a second call whose mask is and-ed with
"key in K". This works at 32K. On the CPU, where flex runs unfused, the same two logsumexps come
from the dense mask, a block of queries at a time.
"""
import math

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, and_masks

import masks
from attention import flex
from generate import padded
from model import GPT

SINK_EPS = 0.3      # Gu et al.'s threshold on a head's mean first-token attention
EARLY = 64          # Gu et al.'s sequence length for their sink measure
QUERY_BLOCK = 1024  # queries per block on the dense path: bounds the (B, nh, block, S) score tensor


def flex_lse(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    _, aux = flex(q)(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1),
                     return_aux=AuxRequest(lse=True))
    return aux.lse.float()  # (B, nh, S), natural log; -inf if nothing seen


def dense_lse(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """The same logsumexp from a (B, 1, S, S) bool mask, QUERY_BLOCK queries at a time, in fp32
    (also under a bf16 autocast, which would round the scores the first-key term is compared
    with)."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1).float()  # (B, nh, S, hs)
    out = []
    with torch.autocast(q.device.type, enabled=False):
        for s in range(0, q.size(2), QUERY_BLOCK):
            scores = (q[:, :, s:s + QUERY_BLOCK].float() @ k.transpose(-1, -2)
                      / math.sqrt(q.size(-1)))                                  # (B,nh,b,S)
            out.append(
                scores.masked_fill(~allowed[:, :, s:s + QUERY_BLOCK], float("-inf")).logsumexp(-1))
    return torch.cat(out, dim=2)                                    # (B, nh, S)


@torch.no_grad()
def attention_stats(model: GPT, idx: Tensor, pos: Tensor, mask_mod, loss_mask: Tensor,
                    attention_mask: Tensor | None = None,
                    backend: str | None = None) -> dict[str, float]:
    """Sink mass, sink rate and context engagement of `model` on one batch under `mask_mod`.

    `pos` is the position inside each token's document (0 at a document's first token). `backend`
    "flex" (the default on the GPU) or "dense" (the default on the CPU) only changes how the lse are
    computed."""
    B, S = idx.shape
    valid = (torch.ones_like(idx, dtype=torch.bool) if attention_mask is None
             else attention_mask.bool())
    first = torch.arange(S, device=idx.device) - pos       # (B, S) index of own document's start
    context_keys = (loss_mask == 0) & (pos != 0) & valid   # (B, S)
    sink_queries = (valid & (pos != 0)).float()            # (B, S)
    early_queries = sink_queries * (pos < EARLY)           # (B, S)
    response_queries = (valid & (loss_mask == 1)).float()  # (B, S)
    ctx_mod = and_masks(mask_mod, masks.key_in_set(context_keys))
    if (backend or ("flex" if idx.is_cuda else "dense")) == "flex":
        lse_fn, build = flex_lse, masks.block_mask
    else:
        lse_fn, build = dense_lse, masks.dense_mask
    seen_all, seen_ctx = build(mask_mod, B, S, idx.device), build(ctx_mod, B, S, idx.device)

    head_sink, head_early, engagement = [], [], []
    x, rope = model.wte(idx), model.rope(pos)
    for block in model.h:
        # (B, nh, S, hs), (B, nkv, S, hs) x2
        q, k, v = block.attn.qkv(block.ln_1(x), rope)
        lse, lse_ctx = lse_fn(q, k, v, seen_all), lse_fn(q, k, v, seen_ctx)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)     # (B, nh, S, hs)
        # (B, nh, S, hs) key of doc start
        k_first = k.gather(2, first[:, None, :, None].expand_as(k))
        score = (q.float() * k_first.float()).sum(-1) / math.sqrt(q.size(-1))   # (B, nh, S)
        p_sink = torch.exp(score - lse).nan_to_num(0.0)            # padding rows (lse = -inf) -> 0
        p_ctx = torch.exp(lse_ctx - lse).nan_to_num(0.0)           # (B, nh, S)
        head_sink.append((p_sink * sink_queries[:, None]).sum((0, 2))
                         / sink_queries.sum().clamp(min=1))                     # (nh,)
        head_early.append((p_sink * early_queries[:, None]).sum((0, 2))
                          / early_queries.sum().clamp(min=1))
        engagement.append((p_ctx * response_queries[:, None]).sum()
                          / (response_queries.sum() * q.size(1)).clamp(min=1))
        x = block(x, rope, seen_all, {}, 1.0)
    head_sink, head_early = torch.stack(head_sink), torch.stack(head_early)     # (n_layer, nh) each
    return {"sink_mass": head_sink.mean().item(),
            "sink_rate": (head_sink > SINK_EPS).float().mean().item(),
            f"sink_mass_{EARLY}": head_early.mean().item(),
            f"sink_rate_{EARLY}": (head_early > SINK_EPS).float().mean().item(),
            "engagement": torch.stack(engagement).mean().item()}


@torch.no_grad()
def prompt_stats(model: GPT, ids: list[int], answer: list[int], mask_kind: str,
                 device) -> dict[str, float]:
    """attention_stats on one evaluation prompt's tokens plus an answer's as the response turn
    (padded as generate pads prompts), the line eval_babilong.py and eval_ruler.py print per
    length."""
    n = len(ids) + len(answer)
    idx, S = padded([ids + answer], device)
    loss_mask = torch.zeros(1, S, dtype=torch.long, device=device)
    loss_mask[0, len(ids):n] = 1
    valid = (torch.arange(S, device=device) < n)[None]
    pos = torch.arange(S, device=device)[None]
    return attention_stats(model, idx, pos, masks.by_name(mask_kind, loss_mask, valid), loss_mask,
                           valid)
