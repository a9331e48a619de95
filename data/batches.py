"""What a training step reads: batches of packed rows, built ahead of the GPU.

A batch is a pure function of its coordinates (seed, split, step, micro-step), each of its rows of
those and its row number: the same numbers give the same rows, whoever builds them and whenever.
Three things follow. `--resume` continues bit for bit; the batches can be built in DataLoader
worker processes, in any order, while the GPU trains (a BABILong batch costs about as much Python
time as a GPU step); and data-parallel ranks draw disjoint rows of one batch (`first_row`,
distributed.py): rank r of W with B rows draws rows [r * B, (r + 1) * B) of what one process with
W * B rows draws.
"""
import random
import signal
from dataclasses import dataclass

import torch

from data import babilong, cwe, packing, tokenizer
from model import target_positions

TOKENS_PER_DOC = 64  # rows hold at most ctx / 64 samples by default: per-sample fast weights need a
                     # fixed number of slots per row (compiled shapes never change); BABILong 0k
                     # samples average ~140 tokens, so the cap seldom binds
PREFETCH = 4         # batches each loader worker builds ahead: absorbs a slow batch (a new book)


@dataclass(frozen=True)
class DataConfig:
    """What a run's batches are made of: train.py's data flags as plain values (config.data_config),
    so that this layer never sees the command line. Picklable: loader workers get a copy."""
    data: str                   # babilong, cwe, babilong+cwe (each sample one or the other),
                                # synthetic (multi-turn stories) or books (plain text)
    objective: str              # sft (answers are the targets) or lm (every next token)
    tasks: tuple[str, ...]      # bAbI tasks to draw stories from
    lengths: tuple[str, ...]    # --data babilong: sample lengths (0k, 1k, ...)
    curriculum: bool            # --data babilong: shortest length first, the others one at a time
    haystack: str               # books.haystack's source
    babi_dir: str | None        # real bAbI stories instead of the generator
    min_len: int                # --data synthetic, books: shortest and longest sample (tokens)
    max_len: int
    max_docs: int               # samples a row may hold; 0: ctx / TOKENS_PER_DOC
    bos: bool                   # a start-of-document token opens every sample
    ctx: int                    # tokens per row
    rows: int                   # rows per micro-batch
    grad_accum: int             # micro-batches per step
    steps: int                  # the run's steps (the curriculum's clock;
                                # evaluation reads its last stage)
    seed: int                   # with (split, step, micro), all a batch's randomness
    context_targets: bool       # also the next-token targets of the context
                                # (FocuSFT's "context" inner loss)
    workers: int = 0            # loader processes building batches ahead (0: in line)
    pin_memory: bool = False    # pinned host memory, for copies queued behind a GPU's work
    first_row: int = 0          # this process's first row of the world's batch (data-parallel
                                # rank r: r * rows; distributed.py)

    @property
    def docs_per_row(self) -> int:
        """Samples a row may hold: max_docs, or ctx / TOKENS_PER_DOC by default."""
        return self.max_docs or max(1, self.ctx // TOKENS_PER_DOC)


def lengths_at(cfg: DataConfig, step: int) -> list[str]:
    """--data babilong, cwe: the lengths a row can hold (--data cwe: those it can be made at); with
    the curriculum, only the first stages' so far."""
    lengths = [n for n in cfg.lengths if cfg.data != "cwe" or cwe.makes(n)]
    return babilong.training_lengths(lengths, cfg.ctx, step if cfg.curriculum else None, cfg.steps)


def data_source(cfg: DataConfig):
    """What batches are drawn from: haystack books, and (babi_dir) real bAbI stories for
    --data babilong."""
    return babilong.training_source(cfg.haystack, cfg.seed, cfg.babi_dir, list(cfg.tasks))


def get_batch(cfg: DataConfig, enc, source, step: int, micro: int, split: str = "train",
              rows: int = 0) -> dict:
    """One micro-batch of CPU tensors (see packing.pack_rows): `rows` (default cfg.rows) rows of
    the world's batch from cfg.first_row on, each a pure function of (seed, split, step, micro,
    row). With FocuSFT's "context" inner loss, also that loss's targets ("context_targets",
    packing.context_targets), so that their positions too are found on the host (to_device)."""
    first = cfg.first_row
    parts = [batch_row(cfg, enc, source, step, micro, split, row)
             for row in range(first, first + (rows or cfg.rows))]
    batch = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    if cfg.context_targets:
        batch["context_targets"] = packing.context_targets(batch)
    return batch


def batch_row(cfg: DataConfig, enc, source, step: int, micro: int, split: str, row: int) -> dict:
    """Row `row` of the world's batch at (step, micro), as a batch of one row: drawn from its own
    generator, so that it does not depend on the rows beside it (nor on who draws them)."""
    rng = random.Random(f"{split}-{cfg.seed}-{step}-{micro}-{row}")
    tasks = list(cfg.tasks)
    hay, stories = source[0][split], source[1][split] if source[1] else None
    draw = lambda r, n: babilong.draw_haystack(enc, r, hay, n)                # noqa: E731
    rows, pack = 1, dict(max_docs=cfg.docs_per_row, bos=cfg.bos)
    if cfg.data == "synthetic":
        batch = packing.pack_batch(enc, rng, draw, rows, cfg.ctx, tasks, cfg.min_len, cfg.max_len,
                                   cfg.objective, **pack)
    elif cfg.data == "books":
        sample = lambda room: packing.book_document(rng, draw, room, cfg.min_len,  # noqa: E731
                                                    cfg.max_len)
        batch = packing.pack_rows(sample, rows, cfg.ctx, cfg.objective, **pack)
    else:
        lengths = lengths_at(cfg, cfg.steps if split == "eval" else step)
        kinds = cfg.data.split("+")
        def sample(room):  # a one-question sample that fits in `room` tokens, of a kind drawn at
            # random (the other kind where none of it fits)
            for kind in rng.sample(kinds, len(kinds)) if len(kinds) > 1 else kinds:
                s = (cwe.training_sample(enc, rng, lengths, room) if kind == "cwe" else
                     babilong.training_sample(enc, rng, hay, tasks, lengths, room, stories, split))
                if s is not None:
                    return s
            return None
        batch = packing.pack_rows(sample, rows, cfg.ctx, cfg.objective, **pack)
    return batch


class Batches(torch.utils.data.Dataset):
    """The run's micro-batches from `start` on, item i = get_batch at the i-th (step, micro). Being
    pure functions of their coordinates, they can be built ahead, in any order, by DataLoader worker
    processes (the GPU then never waits for Python building text). Workers get a copy of the main
    process's source (its books pickle), so a download such as PG19 happens once, and fails in the
    main process."""

    def __init__(self, cfg: DataConfig, start: int, last: int, source):
        self.cfg, self.source = cfg, source
        self.coords = [(step, micro) for step in range(start, last + 1)
                       for micro in range(cfg.grad_accum)]

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> dict:
        return get_batch(self.cfg, tokenizer.gpt2(), self.source, *self.coords[i])


def batch_loader(cfg: DataConfig, start: int, last: int, source) -> torch.utils.data.DataLoader:
    """Batches in order: built ahead in cfg.workers processes, or in this one with 0 workers."""
    workers = cfg.workers
    return torch.utils.data.DataLoader(Batches(cfg, start, last, source), batch_size=None,
                                       num_workers=workers,
                                       prefetch_factor=PREFETCH if workers else None,
                                       pin_memory=cfg.pin_memory, worker_init_fn=worker_signals,
                                       # else it draws a seed from the global RNG, which --resume
                                       # restores: not exact
                                       generator=torch.Generator())


def stop_workers(loader_iter):
    """End a loader iterator's worker processes now, however the run ends. They ignore SIGTERM
    (worker_signals), and an exception that ends the program keeps the iterator alive in its
    traceback, so Python's exit would wait forever on them: multiprocessing's exit handler ends
    child processes with SIGTERM, then joins them. (_shutdown_workers is the iterator's own
    clean-up, which otherwise runs when it is garbage collected; a loader without workers has
    none.)"""
    getattr(loader_iter, "_shutdown_workers", lambda: None)()


def worker_signals(worker_id: int):
    """A loader worker leaves SIGINT and SIGTERM to the main process, which finishes its step and
    saves (train.py): a terminal's ^C, or a SIGTERM to the whole process group (a scheduler's, a
    job's), reaches every process of the run, and a worker that quit on it would fail the batch the
    main process waits for (the loader raises when a worker dies by a signal). The workers end with
    the loader, or when the main process is gone (torch's worker loop watches its parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sample_groups(document_ids: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample fast weights (fastweights.focusft_loss): `slots` groups per row,
    group b * slots + d for sample d of row b, as ((B, S) group of each token, (B * slots,) where
    each group ends in the flattened batch). A row's padding joins its last sample (it is neither
    seen nor a target); unused slots are empty."""
    B, S = document_ids.shape
    n_docs = document_ids.max(dim=1).values + 1                                         # (B,)
    if int(n_docs.max()) > slots:
        raise ValueError(f"a row holds {int(n_docs.max())} samples, "
                         f"more than its {slots} fast-weight slots")
    last = (n_docs - 1).clamp(min=0)[:, None]                                           # (B, 1)
    doc = torch.where(document_ids >= 0, document_ids, last)                            # (B, S)
    rows = torch.arange(B)[:, None]                                                     # (B, 1)
    sizes = torch.zeros(B, slots, dtype=torch.long).scatter_add_(
        1, doc, torch.ones_like(doc))                                                   # (B, slots)
    ends = rows * S + sizes.cumsum(dim=1)                                               # (B, slots)
    return rows * slots + doc, ends.flatten().to(torch.int32)


def to_device(batch: dict, device: str, slots: int = 0) -> dict:
    """The batch on `device`, with "target_index": the flat positions that have a target
    (B * S indexing), "context_index" likewise for "context_targets" where the batch has them
    (get_batch), and with `slots` "group_ids" and "group_ends" (sample_groups). Found here on the
    host so that no loss needs a nonzero() on the device, a host synchronisation that would stall
    the GPU in every inner and outer loss. They describe these rows as they are: slice or join them
    afterwards and they are wrong (build such a batch first, then call this). From pinned host
    memory (the loader pins its batches; the indices are pinned here) a copy is queued behind the
    GPU's work, not waited for."""
    pin = device.startswith("cuda")
    extra = {"target_index": target_positions(batch["targets"])}
    if "context_targets" in batch:
        extra["context_index"] = target_positions(batch["context_targets"])
    if slots:
        extra["group_ids"], extra["group_ends"] = sample_groups(batch["document_ids"], slots)
    return {k: (v.pin_memory() if pin and not v.is_pinned() else v).to(device, non_blocking=True)
            for k, v in {**batch, **extra}.items()}
