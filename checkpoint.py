"""Checkpoints: what a run writes, and how it is read back.

A checkpoint is a plain dict: {"model": the GPT's state (never fast weights: they live inside one training step),
"optimizer": AdamW's state, "config": the whole run (train.py's args, the model's GPTConfig, the inner loop's
InnerConfig), "step": the last finished step, "rng": the RNG states}. With the config inside, the file alone
rebuilds the model (eval_babilong.py, --init) and continues the run exactly (--resume). It is written to a temp
file and renamed, so a crash never leaves half a checkpoint, and read with weights_only=True, so loading one runs
no pickled code.
"""
import contextlib
import os

import torch

from model import GPT, GPTConfig

FILE = "ckpt.pt"   # one checkpoint per run folder, overwritten as the run goes
EVERY_FRACTION = 0.1   # --ckpt-every 0 (the default): save every tenth of the steps or every five minutes of
EVERY_SECONDS = 300    # training, whichever comes first, so that a crash costs at most that much work; but never
MIN_SECONDS = 60       # sooner than a minute after the last save, or a run of fast steps (a small model, short
                       # rows) would spend much of its time writing checkpoints that each save a minute at most


def path(out: str) -> str:
    return os.path.join(out, FILE)


def due(every: int, steps: int, steps_since: int, seconds_since: float) -> bool:
    """Whether a run saves now, `steps_since` steps and `seconds_since` seconds after its last save (or its start):
    every `every` (--ckpt-every) steps, or with every = 0 by the EVERY_* and MIN_SECONDS rule above."""
    if every:
        return steps_since >= every
    return seconds_since >= MIN_SECONDS and (steps_since >= EVERY_FRACTION * steps or seconds_since >= EVERY_SECONDS)


@contextlib.contextmanager
def replacing(file: str, mode: str = "wb"):
    """Open `file` to be written anew, atomically: the writes go to file + ".tmp", which is flushed to disk and
    renamed over `file` once complete. A crash or an interrupt (^C, also mid-write) leaves the old file whole,
    and the temp file is removed."""
    tmp = file + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())   # on disk before the rename: a crash then leaves the old file or the new one
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save(file: str, model: GPT, optimizer: torch.optim.Optimizer, config: dict, step: int):
    """Write atomically (replacing). `model` is the uncompiled module."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config, "step": step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with replacing(file) as f:
        torch.save(ckpt, f)


def load(file: str) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)


def model_from(ckpt: dict, **changes) -> GPT:
    """The checkpoint's model with its weights, on the CPU; `changes` replace config fields (e.g. attn="sdpa")."""
    model = GPT(GPTConfig(**{**ckpt["config"]["model"], **changes}))
    model.load_state_dict(ckpt["model"])
    return model
