"""Checkpoints: what a run writes, and how it is read back.

A checkpoint is a plain dict: {"model": the GPT's state (never fast weights: they live inside one
training step), "optimizer": AdamW's state, "config": the whole run (train.py's args, the model's
GPTConfig, the inner loop's InnerConfig), "step": the last finished step, "rng": the RNG states}.
With the config inside, the file alone rebuilds the model (eval_babilong.py, --init) and continues
the run exactly (--resume). It is written to a temp file and renamed, so a crash never leaves half a
checkpoint, and read with weights_only=True, so loading one runs no pickled code.
"""
import contextlib
import os
import zipfile

import torch

from attention import Kernels
from model import GPT, PRESETS, GPTConfig, preset

FILE = "ckpt.pt"   # one checkpoint per run folder, overwritten as the run goes
PARTS = ("model", "optimizer", "config", "step", "rng")   # what save() writes
CONFIG_PARTS = ("args", "model")   # of its config, what readers use: train.py's args, the GPTConfig
EVERY_FRACTION = 0.1   # --ckpt-every 0 (the default): save every tenth of the steps or every five
EVERY_SECONDS = 300    # minutes of training, whichever comes first, so that a crash costs at most
MIN_SECONDS = 60       # that much work; but never sooner than a minute after the last save, or a
                       # run of fast steps (a small model, short rows) would spend much of its time
                       # writing checkpoints that each save a minute at most


def path(out: str) -> str:
    return os.path.join(out, FILE)


def due(every: int, steps: int, steps_since: int, seconds_since: float) -> bool:
    """Whether a run saves now, `steps_since` steps and `seconds_since` seconds after its last save
    (or its start): every `every` (--ckpt-every) steps, or with every = 0 by the EVERY_* and
    MIN_SECONDS rule above."""
    if every:
        return steps_since >= every
    return seconds_since >= MIN_SECONDS and (steps_since >= EVERY_FRACTION * steps
                                             or seconds_since >= EVERY_SECONDS)


@contextlib.contextmanager
def replacing(file: str, mode: str = "wb"):
    """Open `file` to be written anew, atomically: the writes go to file + ".tmp", which is flushed
    to disk and renamed over `file` once complete. A crash or an interrupt (^C, also mid-write)
    leaves the old file whole, and the temp file is removed."""
    tmp = file + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            # on disk before the rename: a crash then leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save(file: str, model: GPT, optimizer: torch.optim.Optimizer, config: dict, step: int):
    """Write atomically (replacing). `model` is the uncompiled module."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
            "step": step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    with replacing(file) as f:
        torch.save(ckpt, f)


class NotACheckpoint(ValueError):
    """A file load() does not take for a checkpoint of train.py's; the message is one line saying
    why."""


def load(file: str, mmap: bool = False) -> dict:
    """The checkpoint in `file`, on the CPU. Anything else raises NotACheckpoint, one line naming
    the file and why: no such file, a folder, an empty, cut-short or text file, another program's
    file, a dict without a checkpoint's parts, weights that do not fit their model's config. Every
    reader goes through here (--init, --resume, eval_babilong.py --ckpt). mmap: map the tensors
    rather than read them, for a quick look."""
    if not os.path.exists(file):
        raise NotACheckpoint(f"no checkpoint at {file}")
    why = ("it is a folder" if os.path.isdir(file) else
           "it is empty" if os.path.getsize(file) == 0 else
           None if zipfile.is_zipfile(file) else
           "it is not a zip archive as torch.save writes (cut short, or another kind of file)")
    if why is None:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            # torch's readers raise many kinds (RuntimeError, UnpicklingError, KeyError, ...)
            why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        else:
            why = problem(ckpt)
    if why:
        raise NotACheckpoint(f"cannot load {file} as a train.py checkpoint: {why}")
    return ckpt


def problem(ckpt) -> str | None:
    """Why a loaded object is not a checkpoint save() wrote (None if it is one): its parts, its
    config, and its weights' names and shapes against those of its config's model, built on the meta
    device (no memory)."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a dict"
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    missing = [k for k in PARTS if k not in ckpt] + [f"config.{k}" for k in CONFIG_PARTS
                                                     if not isinstance(config.get(k), dict)]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if not isinstance(ckpt["model"], dict):
        return f"its model is a {type(ckpt['model']).__name__}, not a dict of tensors"
    try:
        with torch.device("meta"):
            model = GPT(GPTConfig(**ckpt["config"]["model"]))
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        # unknown fields, impossible sizes
        return f"its model config builds no GPT ({type(e).__name__}: {e})"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(getattr(v, "shape", ())) for k, v in ckpt["model"].items()}
    wrong = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
    return f"its weights do not fit its model config (first: {wrong[0]})" if wrong else None


def model_from(ckpt: dict, kernels: Kernels = Kernels(), **changes) -> GPT:
    """The checkpoint's model with its weights, on the CPU, its flex calls run by `kernels`;
    `changes` replace config fields (e.g. attn="sdpa")."""
    model = GPT(GPTConfig(**{**ckpt["config"]["model"], **changes}), kernels)
    model.load_state_dict(ckpt["model"])
    return model


def preset_name(ckpt: dict) -> str | None:
    """The model.PRESETS size of the checkpoint's model (None if it is none of them)."""
    # the attention backend is no size
    shape = GPTConfig(**{**ckpt["config"]["model"], "attn": "sdpa"})
    return next((name for name in PRESETS if preset(name, "sdpa") == shape), None)


def model_for(ckpt: dict, device: str) -> GPT:
    """The checkpoint's model on `device`, to evaluate: flex attention on a GPU, SDPA on the CPU."""
    return (model_from(ckpt, attn="flex" if device.startswith("cuda") else "sdpa")
            .to(device).eval())


def load_model(path: str, device: str) -> tuple[GPT, dict]:
    """The model of a checkpoint file and its run's config (NotACheckpoint if it is none)."""
    ckpt = load(path)
    return model_for(ckpt, device), ckpt["config"]
