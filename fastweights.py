"""Fast weights and FocuSFT's bilevel step.

Every training step FocuSFT (1) resets small LoRA "fast weights" phi on the MLPs of the top 35 % of layers,
(2) adapts them to the sample with a few SGD steps (the inner loop), and (3) takes the ordinary SFT step on the
base weights theta with the adapted phi active (the outer loop); then phi is thrown away. Each batch row gets
its own phi, adapted on that row's own mean loss (the authors adapt per sample; rows packed with several
samples share one phi: train.py --data synthetic --min-len = --ctx gives one sample per row; BABILong rows
are always packed). Ideas to hold:
  1. The inner loop is first-order: phi_k+1 = phi_k - lr * clip(grad_phi L_inner(theta, phi_k)), with phi_k
     treated as a constant. No graph runs through the update, so the outer gradient is grad_theta L(theta, phi_K)
     without the d phi_K / d theta term (as in the authors' code; flex attention has no double backward anyway).
  2. Nothing is computed twice that need not be: the layers below the adapted ones do not depend on phi, so
     they run once, with grad, for the outer step, and the inner loop re-runs only the upper layers on a
     detached copy of their output; the inner backward asks for gradients of phi alone, and the base weights
     are frozen meanwhile, so a compiled block's backward does not compute their gradients either.
"""
import contextlib
import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from model import GPT

PROJECTIONS = ("gate", "up", "down")   # the SwiGLU projections the paper adapts
CLIP_EPS = 1e-6                        # keeps the clip coefficient finite for an all-zero gradient


@dataclass
class InnerConfig:
    steps: int = 2                       # inner SGD steps per training step (authors: 2)
    lr: float = 1.0                      # inner SGD learning rate (authors: 1.0)
    clip: float = 1.0                    # max norm of each fast-weight gradient, per tensor (authors: 1.0)
    rank: int = 32                       # LoRA rank (authors: 32)
    alpha: float = 64.0                  # LoRA alpha; the delta is scaled by alpha / rank (authors: 64)
    fraction: float = 0.35               # adapt the top 35 % of layers (authors: 0.35)
    targets: tuple = PROJECTIONS         # which MLP projections carry fast weights
    loss: str = "response"               # "response": the outer SFT loss; "context": next-token loss on context

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def adapted_layers(n_layer: int, fraction: float) -> range:
    """The top `fraction` of layers, as the authors choose them: start = int(n_layer * (1 - fraction))."""
    return range(int(n_layer * (1 - fraction)), n_layer)


def init_fast(model: GPT, cfg: InnerConfig, rows: int) -> dict[str, Tensor]:
    """Fresh fast weights for `rows` batch rows: A (rows, r, in) kaiming-uniform as nn.Linear's (a = sqrt 5:
    U(-1/sqrt(in), 1/sqrt(in)), fan_in = in for each row's (r, in) matrix), B (rows, out, r) = 0, so the delta
    B A x starts at exactly 0."""
    fast = {}
    for i in adapted_layers(model.config.n_layer, cfg.fraction):
        for name in cfg.targets:
            linear = getattr(model.h[i].mlp, name)
            bound = 1 / math.sqrt(linear.in_features)      # kaiming_uniform_(a=sqrt 5) of each row, in one call
            A = torch.empty(rows, cfg.rank, linear.in_features, device=linear.weight.device).uniform_(-bound, bound)
            fast[f"h.{i}.mlp.{name}.A"] = A
            fast[f"h.{i}.mlp.{name}.B"] = torch.zeros(rows, linear.out_features, cfg.rank, device=A.device)
    return fast


def clip_per_tensor(g: Tensor, max_norm: float, norm: Tensor) -> Tensor:
    """Scale each row's g[b] down to norm max_norm if it is longer (clip_grad_norm_ on one tensor of one row);
    norm: (rows,), each row's norm of g."""
    norm = norm.view(-1, *[1] * (g.dim() - 1))                                          # (rows, 1, 1)
    return g * (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)


def func_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of sum(loss_fn(fast)) with torch.func, and the per-row losses (SDPA backend). Under no_grad,
    so no graph is kept through the base weights (func.grad itself ignores the outer no_grad)."""
    def total(f):
        rows = loss_fn(f)                                       # (rows,)
        return rows.sum(), rows
    with torch.no_grad():
        return torch.func.grad(total, has_aux=True)(fast)


def autograd_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The same with torch.autograd.grad. Needed on the flex backend: torch.func.grad cannot differentiate
    through flex_attention (pytorch issue #144810), but autograd through compiled flex is exact."""
    leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
    rows = loss_fn(leaves)                                      # (rows,)
    grads = torch.autograd.grad(rows.sum(), list(leaves.values()))   # asks for phi only, not base weights
    return dict(zip(leaves, grads)), rows.detach()


@contextlib.contextmanager
def frozen(model: GPT):
    """Base weights as constants for a while. Eager autograd.grad skips gradients nobody asked for, but a
    compiled block's backward is one graph that computes the gradient of every input requiring it: without
    this, the inner backward would also pay for dW of every base matrix of the upper layers."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def sgd_step(fast: dict[str, Tensor], grads: dict[str, Tensor], rows: Tensor, lr: float,
             clip: float) -> dict[str, Tensor]:
    """phi - lr * clip(grad) for every fast-weight tensor and row, except that a row whose inner loss (rows,) or
    any of whose gradients is NaN/inf keeps its phi (bf16 can overflow in the backward of a finite loss);
    decided on the device, no host sync. The clip's norms find those gradients: a NaN/inf entry makes its
    row's norm NaN/inf. About 10 small ops per tensor: on a GPU adapt runs it compiled."""
    norms = {k: g.flatten(1).norm(dim=1) for k, g in grads.items()}                     # (rows,) each
    ok = torch.isfinite(rows)                                                             # (rows,)
    for norm in norms.values():
        ok = ok & torch.isfinite(norm)
    return {k: torch.where(ok.view(-1, *[1] * (phi.dim() - 1)), phi - lr * clip_per_tensor(grads[k], clip, norms[k]),
                           phi)
            for k, phi in fast.items()}


@functools.cache
def compiled_sgd_step():
    """sgd_step as fused kernels. Eager, it launches ~900 ops per inner step on the Qwen2-0.5B shape (54
    fast-weight tensors), host time that leaves the GPU idle at batch 1. Compiled, it still launched 352
    kernels; combo_kernels has inductor launch independent ones together (one H200, Qwen 8K, batch 1,
    2026-11-29, in different calls: the FocuSFT step 148.0 -> 131.4 ms back to back). Only here: in the
    blocks' graphs too they did not help."""
    return torch.compile(sgd_step, dynamic=False, options={"combo_kernels": True})


def adapt(loss_fn, fast: dict[str, Tensor], cfg: InnerConfig, grad_fn=func_grad):
    """The inner loop. loss_fn(fast) -> (rows,) losses, row b depending on fast[...][b] alone, so the gradient
    of their sum gives each row the gradient of its own loss. Returns the adapted fast weights and the inner
    losses before each step, (steps, rows)."""
    losses = []
    step = compiled_sgd_step() if next(iter(fast.values())).is_cuda else sgd_step
    for _ in range(cfg.steps):
        grads, rows = grad_fn(loss_fn, fast)
        with torch.no_grad():              # phi <- phi - lr * clip(grad): first-order, no graph through it
            fast = step(fast, grads, rows, cfg.lr, cfg.clip)
        losses.append(rows)
    return fast, torch.stack(losses)                                   # (steps, rows)


def focusft_loss(model: GPT, idx: Tensor, pos: Tensor, mask, targets: Tensor, cfg: InnerConfig,
                 inner_mask=None, inner_targets: Tensor | None = None, index: Tensor | None = None,
                 inner_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One FocuSFT forward: adapt fresh fast weights on each row, then the outer loss with them active.
    Returns the outer loss and the inner losses (steps, rows).

    The inner loss uses `inner_targets` under `inner_mask` (default: the outer targets and mask). A different
    inner mask (the causal one of the "context" inner loss) needs its own pass over the lower layers.
    `index`, `inner_index`: the flat positions of `targets`, `inner_targets` that have one, if known
    (model.loss)."""
    rope = model.rope(pos)
    upper = adapted_layers(model.config.n_layer, cfg.fraction)
    lower = range(upper.start)
    x = model.blocks(model.wte(idx), rope, mask, lower)          # shared: the outer step backprops through it
    if inner_mask is None:
        inner_mask, x_inner = mask, x.detach()
    else:
        with torch.no_grad():
            x_inner = model.blocks(model.wte(idx), rope, inner_mask, lower)
    inner_targets, inner_index = (targets, index) if inner_targets is None else (inner_targets, inner_index)

    def inner_loss(fast: dict[str, Tensor]) -> Tensor:                 # (rows,): each row's own mean loss
        x_top = model.blocks(x_inner, rope, inner_mask, upper, fast, cfg.scale)
        return model.loss(x_top, inner_targets, per_row=True, index=inner_index)

    grad_fn = func_grad if isinstance(mask, Tensor) else autograd_grad
    with frozen(model):
        fast, inner_losses = adapt(inner_loss, init_fast(model, cfg, idx.size(0)), cfg, grad_fn)
    return model.loss(model.blocks(x, rope, mask, upper, fast, cfg.scale), targets, index=index), inner_losses
