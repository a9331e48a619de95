"""Fast weights and FocuSFT's bilevel step.

Every training step FocuSFT (1) resets small LoRA "fast weights" phi on the MLPs of the top 35 % of layers,
(2) adapts them to the sample with a few SGD steps (the inner loop), and (3) takes the ordinary SFT step on the
base weights theta with the adapted phi active (the outer loop); then phi is thrown away. Ideas to hold:
  1. The inner loop is first-order: phi_k+1 = phi_k - lr * clip(grad_phi L_inner(theta, phi_k)), with phi_k
     treated as a constant. No graph runs through the update, so the outer gradient is grad_theta L(theta, phi_K)
     without the d phi_K / d theta term (as in the authors' code; flex attention has no double backward anyway).
  2. Nothing is computed twice that need not be: the layers below the adapted ones do not depend on phi, so
     they run once, with grad, for the outer step, and the inner loop re-runs only the upper layers on a
     detached copy of their output; the inner backward asks for gradients of phi alone.
"""
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


def init_fast(model: GPT, cfg: InnerConfig) -> dict[str, Tensor]:
    """Fresh fast weights: A kaiming-uniform (a=sqrt 5, as nn.Linear), B = 0, so the delta B A x starts at 0."""
    fast = {}
    for i in adapted_layers(model.config.n_layer, cfg.fraction):
        for name in cfg.targets:
            linear = getattr(model.h[i].mlp, name)
            A = torch.empty(cfg.rank, linear.in_features, device=linear.weight.device)
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            fast[f"h.{i}.mlp.{name}.A"] = A
            fast[f"h.{i}.mlp.{name}.B"] = torch.zeros(linear.out_features, cfg.rank, device=A.device)
    return fast


def clip_per_tensor(g: Tensor, max_norm: float) -> Tensor:
    """Scale g down to norm max_norm if it is longer (clip_grad_norm_ applied to one tensor)."""
    return g * (max_norm / (g.norm() + CLIP_EPS)).clamp(max=1.0)


def func_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """d loss / d fast with torch.func: the functional reading of the update rule (SDPA backend)."""
    grads, loss = torch.func.grad_and_value(loss_fn)(fast)
    return grads, loss.detach()


def autograd_grad(loss_fn, fast: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """The same gradient with torch.autograd.grad. Needed on the flex backend: torch.func.grad cannot
    differentiate through flex_attention (pytorch issue #144810), but autograd through compiled flex is exact."""
    leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()))   # phi only: no base-weight gradients
    return dict(zip(leaves, grads)), loss.detach()


def adapt(loss_fn, fast: dict[str, Tensor], cfg: InnerConfig, grad_fn=func_grad):
    """The inner loop. Returns the adapted fast weights and the inner loss before each step, (steps,)."""
    losses = []
    for _ in range(cfg.steps):
        grads, loss = grad_fn(loss_fn, fast)
        ok = torch.isfinite(loss)          # a NaN/inf inner loss skips the step (decided on device: no sync)
        fast = {k: torch.where(ok, phi - cfg.lr * clip_per_tensor(grads[k], cfg.clip), phi).detach()
                for k, phi in fast.items()}
        losses.append(loss)
    return fast, torch.stack(losses) if losses else torch.zeros(0)


def focusft_loss(model: GPT, idx: Tensor, pos: Tensor, mask, targets: Tensor, cfg: InnerConfig,
                 inner_mask=None, inner_targets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One FocuSFT forward: adapt fresh fast weights on the sample, then the outer loss with them active.

    The inner loss uses `inner_targets` under `inner_mask` (default: the outer targets and mask). A different
    inner mask (the causal one of the "context" inner loss) needs its own pass over the lower layers."""
    rope = model.rope(pos)
    upper = adapted_layers(model.config.n_layer, cfg.fraction)
    lower = range(upper.start)
    x = model.blocks(model.wte(idx), rope, mask, lower)          # shared: the outer step backprops through it
    if inner_mask is None:
        inner_mask, x_inner = mask, x.detach()
    else:
        with torch.no_grad():
            x_inner = model.blocks(model.wte(idx), rope, inner_mask, lower)
    inner_targets = targets if inner_targets is None else inner_targets

    def inner_loss(fast: dict[str, Tensor]) -> Tensor:
        return model.loss(model.blocks(x_inner, rope, inner_mask, upper, fast, cfg.scale), inner_targets)

    grad_fn = func_grad if isinstance(mask, Tensor) else autograd_grad
    fast, inner_losses = adapt(inner_loss, init_fast(model, cfg), cfg, grad_fn)
    return model.loss(model.blocks(x, rope, mask, upper, fast, cfg.scale), targets), inner_losses
