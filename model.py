"""A small GPT for long-context fine-tuning, with slots for FocuSFT's fast weights.

nanoGPT's shape with today's parts: rotary positions (RoPE), RMSNorm, a SwiGLU MLP whose three
projections are named `gate`, `up`, `down` (the projections the paper adapts), optional
grouped-query attention, GPT-2's vocabulary. Two ideas to hold:
  1. Attention takes the batch's mask, built once per batch from a masks.py predicate, and passed
     unchanged to every layer: a flex_attention BlockMask (backend "flex", compiled fused kernels on
     the GPU) or a dense (B, 1, S, S) bool tensor (backend "sdpa", CPU and reference). Same
     predicate, same numbers.
  2. The forward pass is cut into pieces, `embed -> blocks(range) -> loss`, so FocuSFT can run the
     lower layers once and re-run only the adapted upper layers in its inner loop. Fast weights are
     a plain dict of LoRA factors, one pair per batch row, `{"h.9.mlp.gate.A": (B, r, in),
     "h.9.mlp.gate.B": (B, out, r), ...}`, added as deltas in the MLP.
     Logits are computed only where a target exists: SFT never builds an S x vocab tensor.
"""
import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from attention import Kernels, attend

IGNORE = -100      # target value of positions without a loss (PyTorch's cross_entropy default)
LOSS_CHUNK = 8192  # positions per logits chunk: bounds the (N, vocab) tensor the loss materialises


@dataclass
class GPTConfig:
    vocab_size: int = 50304    # GPT-2's 50257 tokens, padded to a multiple of 128 for fast matmuls
    n_layer: int = 8           # transformer blocks
    n_head: int = 8            # query heads
    n_kv_head: int = 8         # key/value heads; fewer than n_head = grouped-query attention
    n_embd: int = 512          # residual width; head size = n_embd // n_head
    mlp_hidden: int = 1408     # SwiGLU hidden width (about 8/3 * n_embd, a multiple of 128)
    rope_base: float = 10000.0 # RoPE wavelength base
    # "flex" (fused kernels, GPU) or "sdpa" (dense mask; CPU and reference)
    attn: str = "sdpa"

    def to_dict(self) -> dict:
        return asdict(self)


# size presets: (n_layer, n_head, n_kv_head, n_embd, mlp_hidden)
PRESETS = {
    # a CPU default: an 8K-token FocuSFT step in seconds on 2 cores
    "tiny": (4, 2, 2, 128, 384),
    "small": (8, 4, 4, 512, 1408),     # the GPU default: head size 128, the fast flex kernel shape
    "qwen05b": (24, 14, 2, 896, 4864),  # Qwen2-0.5B's shape, to compare with the authors' timings
}


def preset(name: str, attn: str) -> GPTConfig:
    n_layer, n_head, n_kv_head, n_embd, mlp_hidden = PRESETS[name]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                     mlp_hidden=mlp_hidden, attn=attn)


def autocast(device: str, dtype: str):
    """The forward's precision: bf16 autocast on the device for "bf16", a no-op context for
    "fp32"."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")


def rope_tables(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin of each token's position: (B, 1, S, head_dim/2), broadcast over heads."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32)
                        / head_dim)
    angles = pos.float()[:, None, :, None] * inv_freq                      # (B, 1, S, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)                                     # 2 x (B, nh, S, hd/2)
    # (B, nh, S, hd)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head attention under an arbitrary mask (the name is nanoGPT's; the mask decides
    causality)."""

    def __init__(self, cfg: GPTConfig, kernels: Kernels):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = (cfg.n_head, cfg.n_kv_head,
                                                      cfg.n_embd // cfg.n_head)
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.kernels = kernels  # the GPU kernels of flex calls (attention.py)

    def qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        # (B, 2 nkv, T, hs)
        kv = self.kv_proj(x).view(B, T, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        k, v = kv.chunk(2, dim=1)                                   # 2 x (B, nkv, T, hs)
        return apply_rope(q, rope), apply_rope(k, rope), v          # k, v: (B, nkv, T, hs)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: BlockMask | Tensor | None,
                cache: dict | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)
        # generation: prefill stores K, V; each later token appends its own and sees all
        if cache is not None:
            if "k" in cache:
                # (B, nkv, S+T, hs)
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attend(q, k, v, mask, self.kernels)                        # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))                 # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Fast weights add a LoRA delta scale * B(A x) to any
    projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def proj(self, name: str, x: Tensor, fast: dict[str, Tensor], scale: float,
             group_ends: Tensor | None = None) -> Tensor:
        out = getattr(self, name)(x)
        if name + ".A" in fast:
            if group_ends is None:                                    # one pair per row: G = B
                # (B, r, in), (B, out, r)
                A, B = fast[name + ".A"].to(x.dtype), fast[name + ".B"].to(x.dtype)
                delta = (x @ A.mT) @ B.mT                                  # (B, T, out)
            else:
                # one pair per group of consecutive tokens; autocast does not cover grouped_mm: cast
                # here, before the transposes (the kernel's layout)
                dtype = (torch.get_autocast_dtype("cuda")
                         if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype)
                # (G, r, in), (G, out, r)
                A, B = fast[name + ".A"].to(dtype), fast[name + ".B"].to(dtype)
                flat = x.flatten(0, 1).to(dtype)                           # (B*T, in)
                rows = x.size(0)                                           # G / rows runs a row
                low = grouped_mm(flat, A.mT, group_ends, rows)             # (B*T, r)
                # (B, T, out)
                delta = grouped_mm(low, B.mT, group_ends, rows).view(*x.shape[:2], -1)
            out = out + scale * delta
        return out

    def forward(self, x: Tensor, fast: dict[str, Tensor], scale: float,
                group_ends: Tensor | None = None) -> Tensor:
        h = (F.silu(self.proj("gate", x, fast, scale, group_ends))
             * self.proj("up", x, fast, scale, group_ends))
        return self.proj("down", h, fast, scale, group_ends)                             # (B, T, C)


# torch._grouped_mm takes fewer than 1024 groups a call (one thread per group)
GROUPED_MM_GROUPS = 1023


def grouped_mm(x: Tensor, w: Tensor, ends: Tensor, rows: int = 1) -> Tensor:
    """x (N, in) cut into G runs of consecutive rows, run g ending (exclusive) at ends[g]; w (G, in,
    out). Returns (N, out): each row of x times its run's matrix. On an H100-class GPU in bf16, one
    grouped GEMM (torch._grouped_mm: no launch per run, empty runs cost nothing; w as a transposed
    view, K contiguous); elsewhere a loop over the runs. x may be `rows` batch rows of equal length,
    each with G / rows runs that end at its end (batches.sample_groups); then more runs than one
    kernel call takes go in calls of whole rows, each row's runs and ends found by slicing alone (no
    host sync)."""
    per_row, S = w.size(0) // rows, x.size(0) // rows
    if w.size(0) > GROUPED_MM_GROUPS and per_row <= GROUPED_MM_GROUPS:
        n = GROUPED_MM_GROUPS // per_row                                  # rows per call
        return torch.cat([grouped_mm(x[r * S:(r + n) * S], w[r * per_row:(r + n) * per_row],
                                     ends[r * per_row:(r + n) * per_row] - r * S)
                          for r in range(0, rows, n)])
    if (x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return torch._grouped_mm(x, w, offs=ends)
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # host values: a sync on a GPU
    return torch.cat([run @ wg for run, wg in zip(x.split(sizes), w)])   # (N, out)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: Kernels):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(cfg.n_embd), CausalSelfAttention(cfg, kernels)
        self.ln_2, self.mlp = RMSNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: BlockMask | Tensor | None,
                fast: dict[str, Tensor], scale: float, cache: dict | None = None,
                group_ends: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x), fast, scale, group_ends)


def group_mean(values: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Mean of values (N,) per group (N,) -> (n_groups,); 0 for a group without values. Counted with
    index_add (bincount would wait for the device)."""
    per = lambda v: (torch.zeros(n_groups, device=values.device, dtype=v.dtype)  # noqa: E731
                     .index_add(0, group, v))
    return per(values) / per(torch.ones_like(values)).clamp(min=1)


def target_positions(targets: Tensor) -> Tensor:
    """Flat positions (B * S indexing) that have a target: (N,). On a GPU, nonzero() waits for the
    device."""
    return (targets != IGNORE).flatten().nonzero().squeeze(1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, kernels: Kernels = Kernels()):
        super().__init__()
        # kernels: how flex calls run on the GPU (attention.py); the model's numbers do not depend
        # on them, so they are not part of cfg (nor of a checkpoint)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight    # tied input/output embedding, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("c_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- the forward pass, in pieces -------------------------------------------------------------
    def rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        return rope_tables(pos, cfg.n_embd // cfg.n_head, cfg.rope_base)

    def blocks(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: BlockMask | Tensor | None,
               layers: range, fast: dict[str, Tensor] | None = None, scale: float = 1.0,
               caches: list[dict] | None = None, group_ends: Tensor | None = None) -> Tensor:
        """Run blocks `layers` on the residual stream x (B, S, C); fast weights apply where named,
        one pair per row, or with `group_ends` (G,) one per group of consecutive tokens of the
        flattened batch (grouped_mm). With `caches` (one dict per layer) keys and values are kept
        for generation: mask None = see every key."""
        fast = fast or {}
        for i in layers:
            prefix = f"h.{i}.mlp."
            mine = {k[len(prefix):]: v for k, v in fast.items() if k.startswith(prefix)}
            x = self.h[i](x, rope, mask, mine, scale, caches[i] if caches else None, group_ends)
        return x

    def loss(self, x: Tensor, targets: Tensor, index: Tensor | None = None,
             groups: tuple[Tensor, int] | None = None, recompute: bool = True) -> Tensor:
        """Mean cross-entropy at positions with a target: over the batch, or per group (groups =
        ((B, S) group of each position, G)) -> (G,). Logits exist only at those positions,
        LOSS_CHUNK at a time. `index`: those positions, flat (N,), if known (batches.to_device finds
        them on the host; nonzero() here waits for the GPU). `recompute`: see token_losses."""
        losses, sel = self.token_losses(x, targets, index, recompute)
        if groups is not None:
            return group_mean(losses, groups[0].flatten().index_select(0, sel), groups[1])
        return losses.sum() / max(len(sel), 1)

    def token_losses(self, x: Tensor, targets: Tensor, index: Tensor | None = None,
                     recompute: bool = True) -> tuple[Tensor, Tensor]:
        """Cross-entropy at each position with a target, (N,), and those flat positions (N,) (see
        loss). With more than LOSS_CHUNK of them and `recompute`, each chunk's logits are recomputed
        in the backward instead of kept (activation checkpointing); torch.func transforms refuse
        checkpoint's hooks, so a loss under torch.func.grad passes recompute=False."""
        sel = target_positions(targets) if index is None else index              # (N,)
        # (N, C), (N,)
        h, y = x.flatten(0, 1).index_select(0, sel), targets.flatten().index_select(0, sel)
        chunk_loss = (functools.partial(checkpoint, self._chunk_loss, use_reentrant=False)
                      if recompute and len(sel) > LOSS_CHUNK else self._chunk_loss)
        losses = torch.cat([chunk_loss(hc, yc)
                            for hc, yc in zip(h.split(LOSS_CHUNK), y.split(LOSS_CHUNK))]
                           or [h.new_zeros(0)])                                   # (N,)
        return losses, sel

    def _chunk_loss(self, h: Tensor, y: Tensor) -> Tensor:
        logits = self.lm_head(self.ln_f(h)).float()                              # (n, vocab)
        return F.cross_entropy(logits, y, reduction="none")                      # (n,)

    def logits_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """Logits of selected positions, x (B, S, C), positions (B, P) -> (B, P, vocab)."""
        h = x.gather(1, positions[..., None].expand(-1, -1, x.size(-1)))         # (B, P, C)
        return self.lm_head(self.ln_f(h)).float()

    def forward(self, idx: Tensor, pos: Tensor, mask: BlockMask | Tensor, targets: Tensor,
                fast: dict[str, Tensor] | None = None, scale: float = 1.0,
                index: Tensor | None = None) -> Tensor:
        x = self.blocks(self.wte(idx), self.rope(pos), mask, range(self.config.n_layer), fast,
                        scale)
        return self.loss(x, targets, index=index)
