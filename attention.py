"""Attention kernels: how one masked attention call runs, on the CPU and on the GPU.

model.py hands q, k, v and the batch's mask to `attend`, with the `Kernels` the model was built
with: everything a user may tune about the GPU kernels (flex's tiles, its FlashAttention-4 backend,
how grouped-query K/V reach the kernel) is a field of that small dataclass, never a module global.
Two ideas to hold:
  1. The mask's type picks the implementation. A flex_attention BlockMask runs flex's fused
     kernels (always compiled on the GPU: eager flex materialises the S x S scores); a dense
     (B, 1, S, S) bool tensor runs PyTorch's SDPA (CPU training, references). Same predicate from
     masks.py, same numbers.
  2. Kernel options are fixed when a graph compiles: a compiled graph keeps the kernels it was
     built with. So a model is built with its Kernels (GPT(cfg, kernels)) and keeps them; to try
     other kernels, build the model again (python -m bench --attn-config does, under a fresh
     dynamo).
Why the defaults are what they are, with the timings: docs/speed.md.
"""
import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# flex's tiles at head size 64, forward and backward: the fastest of `python -m bench --sections
# tune`'s options (docs/speed.md, "Forward tiles" and "Backward tiles")
HEAD64_TILES = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64,
                "fwd_num_warps": 4, "fwd_num_stages": 3,
                "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                "bwd_num_warps": 4, "bwd_num_stages": 3}
# the package of flex's FLASH backend, at the version measured
FLASH_INSTALL = "pip install flash-attn-4==4.0.0b36"


@dataclass(frozen=True)
class Kernels:
    """How flex_attention's kernels run (the SDPA path has nothing to choose)."""
    # flex's kernel_options: None = by head size (HEAD64_TILES at 64, torch's tiles otherwise),
    # {} = torch's own at every head size, a dict = exactly these
    options: dict | None = None
    # a differentiated call gets grouped-query K/V repeated to every query head (gqa_kv)
    expand_kv: bool = True

    def flex_options(self, head_dim: int) -> dict | None:
        """kernel_options for a flex call at this head size (None = torch's choice)."""
        if self.options is not None:
            return self.options or None
        return HEAD64_TILES if head_dim == 64 else None


# train.py --flex-backend: flex's Triton kernels, or FlashAttention-4's CuTe kernels
# (flash_backend_available)
BACKENDS = {"triton": Kernels(),
            "flash": Kernels(options={"BACKEND": "FLASH"})}


def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | Tensor | None,
           kernels: Kernels) -> Tensor:
    """Attention of q (B, nh, T, hs) over k, v (B, nkv, S, hs) under the mask: a BlockMask (flex),
    a dense bool (B, 1, T, S) or None (SDPA; None = every key). -> (B, nh, T, hs). A query row that
    sees no key comes out as zeros on both paths (flex; SDPA's safe softmax)."""
    if isinstance(mask, BlockMask):
        backward = q.requires_grad or k.requires_grad
        k, v, gqa = gqa_kv(k, v, q.size(1), expand=kernels.expand_kv and backward)
        return flex(q)(q, k, v, block_mask=mask, enable_gqa=gqa,
                       kernel_options=kernels.flex_options(q.size(-1)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.size(1) != q.size(1))


def gqa_kv(k: Tensor, v: Tensor, n_head: int, expand: bool) -> tuple[Tensor, Tensor, bool]:
    """K and V as the flex call takes them, and its enable_gqa. Flex's backward computes dK and dV
    in one program per KV head and key block, which loops over all the query heads sharing that KV
    head (dQ has one program per query head and query block): with few KV heads, few long programs,
    so the backward may end on a tail of them. With `expand`, K and V are repeated to n_head heads
    (their gradients summed back by autograd): the backward sees plain multi-head attention, at the
    price of saving the repeated K and V for it (n_head / n_kv times their memory). Calls without a
    backward (the forward alone, generation) keep the shared heads: their kernels split the work by
    query head."""
    n_kv = k.size(1)
    if n_kv == n_head:
        return k, v, False
    if not expand:
        return k, v, True
    B, _, T, hs = k.shape
    repeat = lambda x: (x[:, :, None].expand(B, n_kv, n_head // n_kv, T, hs)  # noqa: E731
                        .reshape(B, n_head, T, hs))
    # (B, nh, T, hs): kv head j serves query heads j*g ... j*g+g-1
    return repeat(k), repeat(v), False


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex(q: Tensor):
    """The flex_attention to call for q. On the GPU always the compiled one: eager flex materialises
    the S x S scores. Inside an already compiled block dynamo fuses it itself. On the CPU, eager
    (forward only: flex has no CPU backward, so CPU training uses the SDPA path)."""
    if torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex() if q.is_cuda else _eager_flex


def _eager_flex(*args, **kwargs):
    # the "unfused implementation" warning is expected (and harmless) here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flash_backend_available() -> bool:
    """Whether flex_attention can run FlashAttention-4's CuTe DSL kernels (kernel_options
    {"BACKEND": "FLASH"}, experimental in torch 2.11): a Hopper or datacenter Blackwell GPU (SM90,
    SM100: the GPUs FlashAttention-4 is written for) and the `flash_attn.cute` package (PyPI's
    flash-attn-4, not a requirement of this project)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10):
        return False                           # (looked at first: no import on other machines)
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:                        # no flash_attn at all
        return False
