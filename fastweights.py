"""Fast weights and FocuSFT's bilevel step.

Every training step FocuSFT (1) resets small LoRA "fast weights" phi on the MLPs of the top 35 % of
layers, (2) adapts them to the sample with a few SGD steps (the inner loop), and (3) takes the
ordinary SFT step on the base weights theta with the adapted phi active (the outer loop); then phi
is thrown away. Ideas to hold:
  1. The inner loop is first-order: phi_k+1 = phi_k - lr * clip(grad_phi L_inner(theta, phi_k)),
     with phi_k treated as a constant. No graph runs through the update, so the outer gradient is
     grad_theta L(theta, phi_K) without the d phi_K / d theta term (as in the authors' code; flex
     attention has no double backward anyway).
  2. Nothing is computed twice that need not be: the layers below the adapted ones do not depend on
     phi, so they run once, with grad, for the outer step, and the inner loop re-runs only the upper
     layers on a detached copy of their output; the inner backward asks for gradients of phi alone,
     and the base weights are frozen meanwhile, so a compiled block's backward does not compute
     their gradients either.
  3. Every sample adapts its own phi, as the authors do, although rows pack many samples: phi has
     one slot per sample (a "group" of consecutive tokens, model.grouped_mm), the document mask
     keeps samples apart, so the gradient of the sum of the samples' mean losses gives each slot
     exactly its own sample's gradient, in one backward. (train.py --inner-per row shares one phi
     among a row's samples: a different method.)
"""
import contextlib
import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from model import GPT, group_mean, target_positions

PROJECTIONS = ("gate", "up", "down")   # the SwiGLU projections the paper adapts
CLIP_EPS = 1e-6                        # keeps the clip coefficient finite for an all-zero gradient


INNER_LOSSES = ("response", "context")   # what the inner loop can fit (InnerConfig.loss)


@dataclass
class InnerConfig:
    steps: int = 2                # inner SGD steps per training step (authors: 2)
    lr: float = 1.0               # inner SGD learning rate (authors: 1.0)
    clip: float = 1.0             # max norm of each fast-weight gradient, per tensor (authors: 1.0)
    rank: int = 32                # LoRA rank (authors: 32)
    alpha: float = 64.0           # LoRA alpha; the delta is scaled by alpha / rank (authors: 64)
    fraction: float = 0.35        # adapt the top 35 % of layers (authors: 0.35)
    targets: tuple = PROJECTIONS  # which MLP projections carry fast weights
    loss: str = "response"        # "response": the outer SFT loss;
                                  # "context": next-token loss on context

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def adapted_layers(n_layer: int, fraction: float) -> range:
    """The top `fraction` of layers, as the authors choose them:
    start = int(n_layer * (1 - fraction))."""
    return range(int(n_layer * (1 - fraction)), n_layer)


def row_seeds(rows: range) -> list[int]:
    """Seeds of the fast weights of a batch's rows (init_fast), `rows` their places in the world's
    batch (distributed.World.rows; range(B) in one process): one draw from torch's global
    generator, which every data-parallel rank draws alike, plus each row's place. A row so starts
    from the same fast weights whether one process holds the whole batch or a rank holds its
    part."""
    first = int(torch.randint(1 << 62, ()))
    return [first + row for row in rows]


def init_fast(model: GPT, cfg: InnerConfig, groups: int,
              seeds: list[int] | None = None) -> dict[str, Tensor]:
    """Fresh fast weights for `groups` groups (a group: a sample, or a batch row): A (G, r, in)
    kaiming-uniform as nn.Linear's (a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in)), fan_in = in for each
    group's (r, in) matrix), B (G, out, r) = 0, so the delta B A x starts at exactly 0. The groups
    are split evenly among the rows that `seeds` (row_seeds; default: one row) seed, each row's
    drawn from a generator of its own."""
    device = model.lm_head.weight.device
    generators = [torch.Generator(device).manual_seed(s) for s in seeds or row_seeds(range(1))]
    fast = {}
    for i in adapted_layers(model.config.n_layer, cfg.fraction):
        for name in cfg.targets:
            linear = getattr(model.h[i].mlp, name)
            # kaiming_uniform_(a=sqrt 5) of each group, one call per row
            bound = 1 / math.sqrt(linear.in_features)
            A = torch.empty(groups, cfg.rank, linear.in_features, device=device)
            for row, generator in zip(A.chunk(len(generators)), generators):
                row.uniform_(-bound, bound, generator=generator)
            fast[f"h.{i}.mlp.{name}.A"] = A
            fast[f"h.{i}.mlp.{name}.B"] = torch.zeros(groups, linear.out_features, cfg.rank,
                                                      device=A.device)
    return fast


def clip_per_tensor(g: Tensor, max_norm: float, norm: Tensor) -> Tensor:
    """Scale each group's g[i] down to norm max_norm if it is longer (clip_grad_norm_ on one tensor
    of one group); norm: (G,), each group's norm of g."""
    norm = norm.view(-1, *[1] * (g.dim() - 1))                                          # (G, 1, 1)
    return g * (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)


def func_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of sum(loss_fn(fast)) with torch.func, and the per-group losses (SDPA backend).
    Under no_grad, so no graph is kept through the base weights (func.grad itself ignores the outer
    no_grad)."""
    def total(f):
        losses = loss_fn(f)                                     # (G,)
        return losses.sum(), losses
    with torch.no_grad():
        return torch.func.grad(total, has_aux=True)(fast)


def autograd_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The same with torch.autograd.grad. Needed on the flex backend: torch.func.grad cannot
    differentiate through flex_attention (pytorch issue #144810), but autograd through compiled flex
    is exact."""
    leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
    losses = loss_fn(leaves)                                    # (G,)
    # asks for phi only, not base weights
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    return dict(zip(leaves, grads)), losses.detach()


@contextlib.contextmanager
def frozen(model: GPT):
    """Base weights as constants for a while. Eager autograd.grad skips gradients nobody asked for,
    but a compiled block's backward is one graph that computes the gradient of every input requiring
    it: without this, the inner backward would also pay for dW of every base matrix of the upper
    layers."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def sgd_step(fast: dict[str, Tensor], grads: dict[str, Tensor], losses: Tensor, lr: float,
             clip: float) -> dict[str, Tensor]:
    """phi - lr * clip(grad) for every fast-weight tensor and group, except that a group whose inner
    loss (G,) or any of whose gradients is NaN/inf keeps its phi (bf16 can overflow in the backward
    of a finite loss); decided on the device, no host sync. The clip's norms find those gradients: a
    NaN/inf entry makes its group's norm NaN/inf. About 10 small ops per tensor: on a GPU adapt runs
    it compiled."""
    norms = {k: g.flatten(1).norm(dim=1) for k, g in grads.items()}                     # (G,) each
    ok = torch.isfinite(losses)                                                           # (G,)
    for norm in norms.values():
        ok = ok & torch.isfinite(norm)
    return {k: torch.where(ok.view(-1, *[1] * (phi.dim() - 1)),
                           phi - lr * clip_per_tensor(grads[k], clip, norms[k]), phi)
            for k, phi in fast.items()}


@functools.cache
def compiled_sgd_step():
    """sgd_step as fused kernels. Eager, it launches ~900 ops per inner step on the Qwen2-0.5B shape
    (54 fast-weight tensors), host time that leaves the GPU idle at batch 1. Compiled, it still
    launched 352 kernels; combo_kernels has inductor launch independent ones together, which made
    the FocuSFT step at batch 1 faster (docs/speed.md). Only here: in the blocks' graphs too they
    did not help."""
    return torch.compile(sgd_step, dynamic=False, options={"combo_kernels": True})


def adapt(loss_fn, fast: dict[str, Tensor], cfg: InnerConfig, grad_fn=func_grad):
    """The inner loop. loss_fn(fast) -> (G,) losses, group g depending on fast[...][g] alone, so the
    gradient of their sum gives each group the gradient of its own loss. Returns the adapted fast
    weights and the inner losses before each step, (steps, G)."""
    history = []
    step = compiled_sgd_step() if next(iter(fast.values())).is_cuda else sgd_step
    for _ in range(cfg.steps):
        grads, losses = grad_fn(loss_fn, fast)
        with torch.no_grad():  # phi <- phi - lr * clip(grad): first-order, no graph through it
            fast = step(fast, grads, losses, cfg.lr, cfg.clip)
        history.append(losses)
    return fast, torch.stack(history)                                  # (steps, G)


def focusft_loss(model: GPT, batch: dict[str, Tensor], mask, cfg: InnerConfig, inner_mask=None,
                 seeds: list[int] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One FocuSFT forward: adapt fresh fast weights on each sample, then the outer loss with them
    active.

    batch: "idx", "pos", "targets" (B, S); "target_index" (their flat positions, if known:
    model.loss); with "group_ends" (G,) and "group_ids" (B, S) (batches.to_device), one group of
    fast weights per sample of a packed row, else one per row; for the "context" inner loss,
    "context_targets" (and "context_index") and its own `inner_mask`, which needs its own pass over
    the lower layers. `seeds`: those of the rows' fresh fast weights (row_seeds; default: drawn
    here for rows 0..B-1).
    Returns the outer loss and the inner loop's record, (G,) per group: "losses" (steps, G) before
    each inner step, "after" with the adapted weights, "moved" the fast weights' distance from their
    start, "has" whether the group has inner targets (a group without them has loss 0 and does not
    move)."""
    idx, pos, targets, index = (batch["idx"], batch["pos"], batch["targets"],
                                batch.get("target_index"))
    B, S = idx.shape
    ends = batch.get("group_ends")
    group_ids = (batch["group_ids"] if ends is not None
                 else torch.arange(B, device=idx.device)[:, None].expand(B, S))
    groups = (group_ids, B if ends is None else len(ends))
    inner_targets, inner_index = targets, index
    if cfg.loss == "context":
        inner_targets, inner_index = batch["context_targets"], batch.get("context_index")

    rope = model.rope(pos)
    upper = adapted_layers(model.config.n_layer, cfg.fraction)
    lower = range(upper.start)
    # shared: the outer step backprops through it
    x = model.blocks(model.wte(idx), rope, mask, lower)
    if inner_mask is None:
        inner_mask, x_inner = mask, x.detach()
    else:
        with torch.no_grad():
            x_inner = model.blocks(model.wte(idx), rope, inner_mask, lower)

    grad_fn = func_grad if isinstance(mask, Tensor) else autograd_grad

    def inner_loss(fast: dict[str, Tensor]) -> Tensor:  # (G,): each group's own mean loss
        x_top = model.blocks(x_inner, rope, inner_mask, upper, fast, cfg.scale, group_ends=ends)
        return model.loss(x_top, inner_targets, index=inner_index, groups=groups,
                          recompute=grad_fn is autograd_grad)   # (torch.func refuses checkpoint)

    start = init_fast(model, cfg, groups[1], seeds or row_seeds(range(B)))
    with frozen(model):
        fast, losses = adapt(inner_loss, start, cfg, grad_fn)
    token_losses, sel = model.token_losses(
        model.blocks(x, rope, mask, upper, fast, cfg.scale, group_ends=ends), targets, index)
    with torch.no_grad():  # the record: nothing here joins the graph of the outer loss
        if cfg.loss == "response":
            # the outer pass is the inner loss of the adapted weights: reuse it
            after = group_mean(token_losses.detach(), group_ids.flatten().index_select(0, sel),
                               groups[1])
        else:
            after = inner_loss(fast)
        where = target_positions(inner_targets) if inner_index is None else inner_index
        has = group_mean(torch.ones(len(where), device=idx.device),
                         group_ids.flatten().index_select(0, where), groups[1]) > 0
        moved = sum((fast[k] - start[k]).flatten(1).square().sum(1) for k in fast).sqrt()
    record = {"losses": losses, "after": after, "moved": moved, "has": has}
    return token_losses.sum() / max(token_losses.numel(), 1), record
