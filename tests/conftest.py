"""Shared test helpers: a tiny model and a random packed batch with padding, documents and several
turns."""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
if (SHARED / "tiktoken").is_dir():                 # offline GPT-2 tokenizer files, when present
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # tests never reach the hub: where `datasets` is
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # installed, its online paths fail at once, not
                                                   # on a timeout

from model import GPT, IGNORE, GPTConfig  # noqa: E402


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=64)
    return GPTConfig(**{**base, **kw})


def write_checkpoint(path, model: GPT, args: dict):
    """`model` saved as train.py saves a run (checkpoint.save), its recorded args only those
    given."""
    import checkpoint
    config = {"args": args, "model": model.config.to_dict()}
    checkpoint.save(str(path), model, torch.optim.AdamW(model.parameters()), config, 0)


def refused(capsys, main, argv: list[str]) -> str:
    """main(argv) is refused: exit status cli.REFUSED, exactly one line on stderr (returned),
    nothing on stdout. In the process, as the tests call main(); tests/test_cli.py runs each script
    as a process too."""
    import cli
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == cli.REFUSED
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and out == "", (out, err)
    return err.strip()


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return GPT(tiny_config())


def random_batch(B=2, S=70, vocab=128, seed=0):
    """Two documents per row, each a context turn then a response turn; the second row padded."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, S), generator=g)
    loss_mask = torch.zeros(B, S, dtype=torch.long)
    docs = torch.zeros(B, S, dtype=torch.long)
    attention = torch.ones(B, S, dtype=torch.bool)
    pos = torch.zeros(B, S, dtype=torch.long)
    for b in range(B):
        cut = rng.randint(S // 3, S // 2)
        docs[b, cut:] = 1
        for lo, hi in ((0, cut), (cut, S)):
            loss_mask[b, lo + (hi - lo) * 2 // 3: hi] = 1
            pos[b, lo:hi] = torch.arange(hi - lo)
    attention[-1, S - 7:] = False
    loss_mask[-1, S - 7:] = 0
    nxt_ok = (loss_mask[:, 1:] == 1) & attention[:, 1:] & (docs[:, 1:] == docs[:, :-1])
    targets = torch.full_like(idx, IGNORE)
    targets[:, :-1] = torch.where(nxt_ok, idx[:, 1:], IGNORE)
    return {"idx": idx, "loss_mask": loss_mask, "document_ids": docs, "attention_mask": attention,
            "pos": pos, "targets": targets}
