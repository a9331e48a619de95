"""Data-parallel training over several processes, as torchrun launches them: what each rank does on
its own, and the few things the ranks share.

    torchrun --standalone --nproc_per_node=N train.py ...   # N ranks: GPUs (NCCL) or CPUs (gloo)

Every rank holds the whole model and trains on its own rows of the world's batch: rank r of W with
--batch-size B draws rows [r * B, (r + 1) * B) of what one process with W * B rows draws
(data/batches.py draws every row from its own coordinates, fastweights.row_seeds seeds every row's
fast weights by its place), so W ranks of B rows train as one process of W * B rows. Ideas to hold:
  1. The inner loop is local. Fast weights are per rank and per sample, and nothing of the inner
     loop is ever all-reduced: after a step's micro-batches, one all-reduce sums the base weights'
     gradients (with the step's loss and inner record), and that is all the ranks share of a step
     (sum_gradients). No reducer watches the backward passes, DDP's included: see sum_gradients for
     why not DDP.
  2. Every answer token weighs alike across ranks: a rank weighs each micro-batch by its share of
     the world's answer tokens (training_step.accumulate; one host all-reduce of a count), so the
     summed gradient is that of the world's mean loss.
  3. Rank 0 speaks for the run: it alone evaluates, prints and writes log.jsonl and the checkpoint
     (every rank holds the same weights and the same generator states). The ranks agree at every
     step boundary whether a signal reached any of them, and stop there together. A rank that fails
     says so in one line and ends; the others find it gone at their next collective and end quietly.
"""
import contextlib
import os
import sys
import traceback

import torch
import torch.distributed as dist

# torchrun's variables: this process's rank among all and on its node, and how many there are
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
HERE = os.path.dirname(os.path.abspath(__file__))


class PeerGone(Exception):
    """A collective failed: another rank has ended (and said why, if it could)."""


class World:
    """This process's place among the run's ranks (one process: rank 0 of 1, and every method a
    no-op or the identity), and the collectives a training step needs."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    @classmethod
    def from_environment(cls) -> "World":
        """The world torchrun launched this process into (its variables), or one process alone."""
        return cls(*(int(os.environ.get(name, default))
                     for name, default in zip(ENVIRONMENT, (0, 1, 0, 1))))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, rows: int) -> range:
        """This rank's rows of the world's batch, for `rows` rows a rank."""
        return range(self.rank * rows, (self.rank + 1) * rows)

    def launcher(self) -> str:
        """The command that starts a run on as many processes as this one."""
        if self.size == 1:
            return "python"
        nodes = self.size // self.local_size
        return (f"torchrun --standalone --nproc_per_node={self.local_size}" if nodes == 1 else
                f"torchrun --nnodes={nodes} --nproc_per_node={self.local_size} (and the first "
                "launch's rendezvous flags)")

    def problem(self, device: str, recorded: int | None) -> str | None:
        """Why these ranks cannot train on `device`, or continue a run `recorded` on that many
        ranks (None: a new run), or None: a resumed run's batch is its ranks' rows, so it continues
        on as many; each rank takes cuda:LOCAL_RANK, so --device must not name one GPU for all, and
        the node must have a GPU for each rank."""
        if recorded is not None and recorded != self.size:
            return (f"--resume: the run was trained on {recorded} process(es), this launch has "
                    f"{self.size}: continue it on as many (its batch is theirs)")
        if self.size == 1 or not device.startswith("cuda"):
            return None
        if device != "cuda":
            return (f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; "
                    "give --device cuda")
        if self.local_size > torch.cuda.device_count():
            return (f"torchrun starts {self.local_size} processes on this node, which has "
                    f"{torch.cuda.device_count()} GPU(s): one process per GPU")
        return None

    # ---------------------------------------------------------------------------------------------
    # joining, and speaking

    @contextlib.contextmanager
    def joined(self, device: str):
        """The ranks' process group, for the block: NCCL between GPUs (each rank on
        cuda:LOCAL_RANK, so that "cuda" means its own GPU), gloo between CPUs, and gloo for the
        counts and flags the ranks agree on, on the host, without waiting for the GPU."""
        if self.size == 1:
            yield self
            return
        if device.startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
        # CPU tensors go through gloo, CUDA tensors through NCCL: one group for both
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
        done = False
        try:
            yield self
            done = True
        finally:
            dist.destroy_process_group()
        if done and not self.main:
            # A rank other than 0 has written nothing and has nothing left to do, so it leaves
            # without the interpreter's teardown. On 2026-12-07 the CPU test's rank 1 died at its
            # very end in a few of many runs ("terminate called without an active exception",
            # SIGABRT), failing a run whose rank 0 went on to save; a C++ thread still alive when
            # the interpreter exits gives that abort (pytorch#179291 describes such aborts of
            # gloo's threads at finalization). Rank 0 exits as usual, with its files closed
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    @contextlib.contextmanager
    def speaking(self, prog: str):
        """Rank 0 speaks for the run; what the other ranks print goes nowhere. A failure on any
        rank is one line from that rank, `prog: error: rank r of W: what (where)`, and exit status
        1 (no traceback); a rank that finds another gone (PeerGone) ends with status 1 and says
        nothing, and a refusal or a stop said by rank 0 ends the others with its status alone."""
        if self.size == 1:
            yield
            return
        stderr = sys.stderr
        with contextlib.ExitStack() as quiet:
            if not self.main:
                null = quiet.enter_context(open(os.devnull, "w"))
                quiet.enter_context(contextlib.redirect_stdout(null))
                quiet.enter_context(contextlib.redirect_stderr(null))
            try:
                yield
            except PeerGone:
                raise SystemExit(1) from None
            except SystemExit as e:
                if self.main or e.code is None or isinstance(e.code, int):
                    raise
                raise SystemExit(1) from None       # (sys.exit(message) would print it)
            except Exception as e:
                print(f"{prog}: error: rank {self.rank} of {self.size}: {one_line(e)}",
                      file=stderr, flush=True)
                raise SystemExit(1) from None

    # ---------------------------------------------------------------------------------------------
    # the collectives of a step

    def total(self, *counts: int) -> list[int]:
        """Each count summed over the ranks (on the host: no wait for the GPU)."""
        if self.size == 1:
            return list(counts)
        summed = torch.tensor(counts, dtype=torch.int64)
        collective(dist.all_reduce, summed)
        return summed.tolist()

    def largest(self, value: int) -> int:
        """The largest of the ranks' values (on the host)."""
        if self.size == 1:
            return value
        top = torch.tensor([value], dtype=torch.int64)
        collective(dist.all_reduce, top, op=dist.ReduceOp.MAX)
        return int(top)

    def sum_gradients(self, params, *values: torch.Tensor) -> list[torch.Tensor]:
        """The step's one all-reduce: every parameter's gradient summed over the ranks in place,
        and `values` (device tensors of the same sizes on every rank: the step's loss and inner
        record) summed with them; a rank without a gradient (no answers in its rows) adds zeros.
        Queued behind the GPU's work, not waited for.

        Why not DistributedDataParallel: its reducer is armed only by the wrapped module's own
        forward, while focusft_loss calls the model in pieces; it expects one backward per forward
        on every rank, while a rank whose micro-batch has no answer token skips its backward; and
        it averages, where the weights (accumulate) already make the sum the world's mean. Here
        the inner loop's autograd.grad calls (gradients of the fast weights alone, the base
        weights frozen) meet no reducer at all, and the accumulation micro-steps need no no_sync:
        gradients are summed once, after the last one. The cost: no overlap of the all-reduce with
        the backward, one gradient-sized buffer more (as DDP's buckets take by default)."""
        if self.size == 1:
            return list(values)
        params = list(params)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        device = grads[0].device
        flat = torch.cat([g.flatten() for g in grads]
                         + [v.to(device, torch.float32).flatten() for v in values])
        collective(dist.all_reduce, flat)
        parts = flat.split([g.numel() for g in grads] + [v.numel() for v in values])
        for p, part in zip(params, parts):
            p.grad = part.view_as(p)
        return [part.view_as(v).clone() for part, v in zip(parts[len(params):], values)]


ALONE = World()   # one process: what bench/ and the tests' direct calls get


def collective(call, *args, **kwargs):
    """A collective; its failure means another rank has gone (PeerGone)."""
    try:
        call(*args, **kwargs)
    except RuntimeError as e:
        raise PeerGone(str(e)) from e


def one_line(e: BaseException) -> str:
    """An exception as one line: its type, the first line of its message, and where it was raised
    (the innermost frame in this project's files)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(HERE)] or frames
    where = f" ({os.path.relpath(ours[-1].filename, HERE)}:{ours[-1].lineno})" if ours else ""
    message = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {message}{where}"
