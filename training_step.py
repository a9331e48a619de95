"""One training step: the loss of each micro-batch (SFT's, or FocuSFT's bilevel loss), their
gradients accumulated, clipped, and one AdamW step on the base weights.

train.py runs this step in its loop; bench/ times it. Two ideas to hold: the mask is built once per
micro-batch and handed to every layer (masks.py), and FocuSFT's fast weights live only inside
`train_loss` (fastweights.focusft_loss): the optimizer never sees them, so they are thrown away
after each step. With several data-parallel ranks (distributed.py) the step is the same on each,
on its own rows, and the ranks' gradients are summed once, before the clip.
"""
import math

import torch

import config
import masks
from data import packing
from distributed import ALONE, World
from fastweights import InnerConfig, focusft_loss, row_seeds
from model import GPT

# nanoGPT's; beta2 < 0.999 is steadier for from-scratch training at small batch
ADAM_BETAS = (0.9, 0.95)


def build_mask(args, mask_mod, batch_size: int):
    return masks.for_backend(args.attn, mask_mod, batch_size, args.ctx, args.device)


def inner_config(args) -> InnerConfig:
    return InnerConfig(steps=args.inner_steps, lr=args.inner_lr, clip=args.inner_clip,
                       rank=args.inner_rank, alpha=args.inner_alpha, fraction=args.inner_fraction,
                       targets=tuple(args.inner_targets.split(",")), loss=args.inner_loss)


def context_targets(batch) -> torch.Tensor:
    """The "context" inner loss's targets: carried by the batch (batches.get_batch) or built
    here."""
    return (batch["context_targets"] if "context_targets" in batch
            else packing.context_targets(batch))


def train_loss(args, model, inner: InnerConfig, batch,
               seeds: list[int] | None = None) -> tuple[torch.Tensor, dict | None]:
    """Loss of one micro-batch, and the inner loop's record (fastweights.focusft_loss, its rows'
    fast weights seeded by `seeds`; None without one)."""
    B = batch["idx"].size(0)
    mask = build_mask(args, masks.for_batch(args.mask, batch), B)
    if args.method == "sft" or inner.steps == 0:
        return model(batch["idx"], batch["pos"], mask, batch["targets"],
                     index=batch.get("target_index")), None
    inner_mask = None
    if inner.loss == "context":
        # next-token prediction under a bidirectional mask would be copying: go causal
        inner_mask = build_mask(
            args, masks.causal(batch["attention_mask"], batch["document_ids"]), B)
        batch = {**batch, "context_targets": context_targets(batch)}
    return focusft_loss(model, batch, mask, inner, inner_mask, seeds)


def fast_weight_slots(args) -> int:
    """Fast-weight groups per row that batches.to_device marks: one per sample (--inner-per sample),
    or none (one per row) for --inner-per row and for runs without an inner loop."""
    return (config.data_config(args).docs_per_row
            if args.method == "focusft" and args.inner_per == "sample" else 0)


def accumulate(args, model, inner: InnerConfig, micro_batches: list[dict], autocast,
               world: World = ALONE) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of one optimizer step over its micro-batches: of the mean loss over all their
    target tokens, each micro-batch's mean weighted by its share of the targets (a micro-batch of
    few answers counts as few); with several ranks, its share of all the ranks' targets, so that the
    sum of the ranks' gradients is the gradient of the world's mean loss. Returns this rank's share
    of that loss () and of the inner loop's record (steps + 2,): the inner loss before each inner
    step and after the last, then how far the fast weights moved, each averaged over the groups
    (samples or rows) that have inner targets and weighted the same way; empty without an inner
    loop. Device tensors, read after the optimizer step, so that nothing here waits for the GPU."""
    # found on the host (batches.to_device): no sync
    counts = [len(b["target_index"]) for b in micro_batches]
    (total,) = world.total(sum(counts))
    inner_loop = args.method == "focusft" and inner.steps > 0
    losses, inners = [], []
    for batch, count in zip(micro_batches, counts):
        # drawn before a micro-batch is skipped: every rank's generator draws alike
        seeds = row_seeds(world.rows(len(batch["idx"]))) if inner_loop else None
        if count == 0:          # nothing to learn from
            continue
        weight = count / total
        with autocast:
            loss, record = train_loss(args, model, inner, batch, seeds)
        (loss * weight).backward()
        losses.append(loss.detach().float() * weight)
        if record is not None:  # a group without inner targets (loss 0) is left out
            has = record["has"].float()                                             # (G,)
            values = torch.cat([record["losses"], record["after"][None],
                                record["moved"][None]])                             # (steps + 2, G)
            inners.append((values.detach().float() * has).sum(dim=1) / has.sum().clamp(min=1)
                          * weight)
    # (a record of the same size on every rank, also where nothing was learned from)
    empty = torch.zeros(inner.steps + 2 if inner_loop else 0)
    return sum(losses, torch.zeros(())), sum(inners) if inners else empty


def make_optimizer(args, model: GPT) -> torch.optim.AdamW:
    """AdamW over the base weights, decaying matrices only (not norms' gains); fused kernels on a
    GPU."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=ADAM_BETAS, fused=args.device.startswith("cuda"))


def optimizer_step(args, model, inner: InnerConfig, optimizer, micro_batches: list[dict], autocast,
                   world: World = ALONE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step on its micro-batches (accumulate), the ranks' gradients summed (one
    all-reduce, none in one process), gradient clipping, AdamW; returns accumulate's device tensors
    (summed over the ranks too: the world's) and the gradient's norm before clipping (a device
    tensor too). bench/ times this function."""
    loss_sum, inner_sum = accumulate(args, model, inner, micro_batches, autocast, world)
    loss_sum, inner_sum = world.sum_gradients(model.parameters(), loss_sum, inner_sum)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               args.clip if args.clip > 0 else math.inf)
    optimizer.step()  # (--clip 0: measured, not clipped)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, inner_sum, grad_norm
