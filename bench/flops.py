"""What a training step costs, counted rather than timed: the (q, k) pairs a mask allows, attention
FLOPs on those pairs only, and the matmul work of an SFT or a FocuSFT step, inner loop included.

bench/steps.py divides these counts by measured times (TFLOP/s, MFU, the FocuSFT / SFT work
ratio); nothing here needs a GPU. Two ideas to hold: a mask's cost is its allowed entries, never the
S x S square (the hybrid mask allows about twice the causal pairs on a BABILong row, which is nearly
all context); and the inner loop needs no base-weight gradients, so each inner step is a forward of
the adapted layers plus a backward for input gradients only.
"""
import torch

import masks
from fastweights import adapted_layers

FWD_BWD = 3.5          # forward + backward = 3.5 x forward for attention as the kernels run it (the
                       # backward's 5 matmuls against the forward's 2, QK^T recomputed:
                       # FlashAttention's benchmark counts so)
MODEL_FWD_BWD = 3.0    # the same in model FLOPs (MFU, as PaLM counts): the backward 2 x forward, no
                       # recompute


def allowed_hybrid(context: int, response: int) -> int:
    """(q, k) pairs the hybrid mask allows in a row of one context turn then one response turn."""
    return context * context + response * context + response * (response + 1) // 2


def allowed_causal(seq_len: int) -> int:                 # 1 + 2 + ... + S
    return seq_len * (seq_len + 1) // 2


def attention_flops(allowed: int, head_dim: int, heads: int,
                    times_forward: float = FWD_BWD) -> float:
    """Forward: QK^T and PV, 2 FLOPs per multiply-add each, on allowed entries only;
    times_forward = 1 for the forward alone, FWD_BWD for forward and backward as run, MODEL_FWD_BWD
    as MFU counts them."""
    return times_forward * 4 * allowed * head_dim * heads


def allowed_in_batch(batch: dict, hybrid: bool) -> int:
    """Allowed pairs of a packed batch's mask (train.mask_mod_for), in O(S): documents and turns are
    contiguous and padding ends a row, so a query sees keys from its document's start up to itself
    (causal, or a response token) or up to the end of its own turn (a context token under the hybrid
    mask)."""
    docs, valid = batch["document_ids"], batch["attention_mask"].bool()
    B, S = docs.shape
    pos = torch.arange(S, device=docs.device).expand(B, S)      # (B, S)
    new_doc = torch.ones_like(valid)
    new_doc[:, 1:] = docs[:, 1:] != docs[:, :-1]
    start = torch.where(new_doc, pos, 0).cummax(dim=1).values   # (B, S) document start
    stop = pos + 1                                              # (B, S) one past last key
    if hybrid:
        turn = masks.turn_ids(batch["loss_mask"], docs)         # (B, S)
        end = torch.zeros(B, S, dtype=torch.long, device=docs.device).scatter_reduce(
            1, turn, torch.where(valid, pos + 1, 0), "amax")    # (B, S) by turn id
        stop = torch.where(batch["loss_mask"].bool(), stop, end.gather(1, turn))
    return int(((stop - start) * valid).sum())


def step_work(n_layer: int, layer_params: int, down_params: int, upper: int, inner_steps: int,
              tokens: int, allowed: int, head_dim: int, heads: int) -> float:
    """Matmul FLOPs of one training step, inner loop included. Outer: forward + backward of every
    layer (linear 3 x forward, attention FWD_BWD x forward). Each inner step: a forward of the
    `upper` adapted layers and a backward for input gradients only (base weights frozen: no dW). The
    lowest adapted layer's input is a constant, so its backward is only `down`'s input gradient
    (which the gate/up fast weights need). LoRA (rank << width) and logits are left out."""
    linear, attn = (2 * layer_params * tokens,
                    attention_flops(allowed, head_dim, heads, times_forward=1))
    outer = n_layer * (3 * linear + FWD_BWD * attn)
    inner = upper * (linear + attn) + (upper > 0) * 2 * down_params * tokens
    inner += max(upper - 1, 0) * (linear + (FWD_BWD - 1) * attn)
    return outer + inner_steps * inner


def batch_work(args, cfg, inner, allowed: float) -> float:
    """step_work of a train.py configuration whose batch allows `allowed` (q, k) pairs."""
    C, H, head_dim = cfg.n_embd, cfg.mlp_hidden, cfg.n_embd // cfg.n_head
    # q, c_proj, kv, gate/up/down
    layer_params = 2 * C * C + C * 2 * cfg.n_kv_head * head_dim + 3 * C * H
    upper = len(adapted_layers(cfg.n_layer, inner.fraction)) if args.method == "focusft" else 0
    return step_work(cfg.n_layer, layer_params, H * C, upper, inner.steps,
                     args.batch_size * args.ctx, allowed, head_dim, cfg.n_head)
