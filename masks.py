"""Attention masks for FocuSFT: the hybrid (dilution-aware) mask and the causal SFT baseline.

FocuSFT trains with a *hybrid* mask, the same one in the inner and the outer loop. The loss mask
cuts a sequence into turns: a run of context tokens (system / user / tool text, `loss_mask == 0`) is
one turn, a run of response tokens (`loss_mask == 1`) is the next. Then:

    context turn   -> bidirectional within itself (every context token sees the whole turn)
    response turn  -> causal within itself
    any token      -> sees every earlier turn in full, never a later one
    padding        -> sees nothing and is seen by nothing; packed documents never see each other

Two ideas to hold:
  1. Every mask here is a `mask_mod(b, h, q_idx, kv_idx) -> bool` predicate, composed with
     `and_masks` (attention-gym style). Per-token facts (turn id, response flag, document id) are
     tensors the predicate captures, so one compiled kernel serves every batch without recompiling.
  2. One predicate feeds both attention backends: `block_mask()` turns it into a sparse
     flex_attention BlockMask (GPU, O(S) memory), `dense_mask()` into a (B, 1, S, S) bool tensor for
     SDPA (CPU, reference).

Run `python masks.py` to see the masks of a 16-token example drawn in the terminal.
"""
import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks, create_block_mask, create_mask

# --------------------------------------------------------------------------------------------------
# predicates

def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def padding_mask(attention_mask: Tensor):
    """Tokens with attention_mask == 0 neither see nor are seen."""
    valid = attention_mask.bool()

    def padding(b, h, q_idx, kv_idx):
        return valid[b, q_idx] & valid[b, kv_idx]
    return padding


def document_mask(document_ids: Tensor):
    """Packed samples: attention never crosses a document boundary."""
    def document(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]
    return document


def turn_mask(turn: Tensor, response: Tensor):
    """Earlier turns fully visible; inside a turn, context is bidirectional and a response is
    causal."""
    def turns(b, h, q_idx, kv_idx):
        same = turn[b, q_idx] == turn[b, kv_idx]
        inside = same & (~response[b, q_idx] | (kv_idx <= q_idx))
        return (turn[b, kv_idx] < turn[b, q_idx]) | inside
    return turns


def key_in_set(keys: Tensor):
    """Only keys with keys[b, kv_idx] True (used to measure where attention lands)."""
    def key_in(b, h, q_idx, kv_idx):
        return keys[b, kv_idx]
    return key_in


# --------------------------------------------------------------------------------------------------
# factories: the two masks a run trains with

def turn_ids(loss_mask: Tensor, document_ids: Tensor | None = None) -> Tensor:
    """(B, S) turn index: it steps up wherever the loss mask flips or a new document starts."""
    change = loss_mask[:, 1:] != loss_mask[:, :-1]                             # (B, S-1)
    if document_ids is not None:
        change = change | (document_ids[:, 1:] != document_ids[:, :-1])
    first = torch.zeros_like(loss_mask[:, :1], dtype=torch.long)             # (B, 1)
    return torch.cat([first, change.long()], dim=1).cumsum(dim=1)           # (B, S)


def _with_padding_and_documents(mod, attention_mask, document_ids, name):
    mods = [mod]
    if attention_mask is not None:
        mods.append(padding_mask(attention_mask))
    if document_ids is not None:
        mods.append(document_mask(document_ids))
    out = and_masks(*mods)  # a new function even for one predicate: safe to rename
    out.__name__ = name
    return out


def hybrid(loss_mask: Tensor, attention_mask: Tensor | None = None,
           document_ids: Tensor | None = None):
    """The FocuSFT mask as a mask_mod. All arguments are (B, S); loss_mask is 1 on response
    tokens."""
    turn = turn_ids(loss_mask, document_ids)
    return _with_padding_and_documents(turn_mask(turn, loss_mask.bool()), attention_mask,
                                       document_ids, "hybrid")


def causal(attention_mask: Tensor | None = None, document_ids: Tensor | None = None):
    """The SFT baseline: plain causal attention, with the same padding and document handling."""
    return _with_padding_and_documents(causal_mask, attention_mask, document_ids, "causal")


def by_name(name: str, loss_mask: Tensor, attention_mask: Tensor | None = None,
            document_ids: Tensor | None = None):
    """The mask a run names (--mask, eval's --mask): "hybrid" or "causal" (which ignores the loss
    mask)."""
    if name not in ("hybrid", "causal"):
        raise ValueError(f"unknown mask {name!r}: expected hybrid or causal")
    if name == "hybrid":
        return hybrid(loss_mask, attention_mask, document_ids)
    return causal(attention_mask, document_ids)


def for_batch(name: str, batch: dict):
    """by_name for a batch of packed rows (data.packing): its loss mask, padding and documents."""
    return by_name(name, batch["loss_mask"], batch["attention_mask"], batch["document_ids"])


# --------------------------------------------------------------------------------------------------
# materialising a predicate for each attention backend

@functools.cache
def _compiled_create_block_mask():
    # Eager create_block_mask evaluates the predicate on the full S x S grid (~10 GiB at 32K);
    # compiled it works block by block in O(S) memory.
    return torch.compile(create_block_mask)


def block_mask(mask_mod, batch: int, seq_len: int, device: torch.device | str):
    """flex_attention BlockMask, built once per batch and shared by every layer (heads
    broadcast)."""
    build = (_compiled_create_block_mask() if torch.device(device).type == "cuda"
             else create_block_mask)
    return build(mask_mod, batch, None, seq_len, seq_len, device=device)


def dense_mask(mask_mod, batch: int, seq_len: int, device: torch.device | str) -> Tensor:
    """(B, 1, S, S) bool mask for scaled_dot_product_attention, from the same predicate."""
    return create_mask(mask_mod, batch, 1, seq_len, seq_len, device=device)


def for_backend(attn: str, mask_mod, batch: int, seq_len: int, device: torch.device | str):
    """The mask the model's attention backend takes: a BlockMask for "flex", a dense bool mask for
    "sdpa"."""
    return (block_mask if attn == "flex" else dense_mask)(mask_mod, batch, seq_len, device)


# --------------------------------------------------------------------------------------------------
# python masks.py: draw the masks of a short example

def draw(mask: Tensor, loss_mask: Tensor, attention_mask: Tensor, title: str) -> str:
    """Text picture of one (S, S) mask: rows are queries, columns keys; C context, R response,
    _ pad."""
    kind = ["_" if not a else ("R" if r else "C")
            for r, a in zip(loss_mask.tolist(), attention_mask.tolist())]
    lines = [title, "    " + " ".join(kind)]
    for q, row in enumerate(mask.tolist()):
        lines.append(f" {kind[q]}  " + " ".join("■" if v else "·" for v in row))
    return "\n".join(lines)


def _demo():
    S = 16
    one = lambda xs: torch.tensor([xs])                       # noqa: E731  (1, S)
    single = one([0] * 9 + [1] * 5 + [0] * 2)                 # prompt, answer, 2 pads
    multi = one([0] * 5 + [1] * 3 + [0] * 4 + [1] * 3 + [0])  # two question/answer turns
    docs = one([0] * 8 + [1] * 8)                             # two packed samples
    packed = one([0] * 5 + [1] * 3 + [0] * 6 + [1] * 2)
    pad = one([1] * 14 + [0] * 2)
    full = torch.ones(1, S, dtype=torch.long)
    cases = [
        ("causal (SFT baseline), 2 pads", causal(pad), single, pad),
        ("hybrid, one turn: context then response, 2 pads", hybrid(single, pad), single, pad),
        ("hybrid, two turns (context, response, context, response, pad)",
         hybrid(multi, one([1] * 15 + [0])), multi, one([1] * 15 + [0])),
        ("hybrid, two packed documents of 8 tokens", hybrid(packed, None, docs), packed, full),
    ]
    for title, mod, lm, am in cases:
        print(draw(dense_mask(mod, 1, S, "cpu")[0, 0], lm[0], am[0], title), end="\n\n")


if __name__ == "__main__":
    _demo()
