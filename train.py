"""Train a GPT with FocuSFT (or plain SFT, or next-token pretraining) on long packed rows.

    python train.py --ctx 8192                                 # FocuSFT, defaults for this machine
    python train.py --ctx 8192 --method sft --out runs/sft     # the causal SFT baseline
    python train.py --objective lm --data books --out runs/lm  # a base, for --init runs/lm/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py --ctx 8192  # data parallel on 4 GPUs

One training step = one batch of `--batch-size` rows of `--ctx` tokens (times `--grad-accum`), its
mask built once (masks.py), then either the SFT loss or FocuSFT's bilevel loss (fastweights.py),
then one AdamW step on the base weights (training_step.py). The loop is flat: evaluation and
checkpointing at the top, the training step below, and one last evaluation after it. On a GPU,
steps run back to back: a step's log line is printed once the next step is queued, so the GPU does
not wait for the host between steps (steplog.py). The flags, the defaults each machine fills in and
--resume's rules are config.py. Every batch is a pure function of (seed, split, step, micro-step)
(data/batches.py), so `--resume` continues exactly, DataLoader workers build batches ahead of the
GPU, and data-parallel ranks draw disjoint rows of each batch: under torchrun, N processes (GPUs, or
CPUs with gloo) of --batch-size rows train as one process of N times the rows, the inner loop local
to each, their gradients summed once a step, rank 0 alone evaluating and writing (distributed.py).

A run that stops early loses little (stopping.py): it saves a checkpoint every so often
(--ckpt-every); SIGINT (^C) or SIGTERM ends it at the next step boundary with a checkpoint and one
line saying how to continue (exit code 130 or 143); a NaN or inf loss or gradient norm ends it with
one line naming the step, before those weights are saved (exit code 1). Under torchrun a signal to
any rank stops them all at the same step boundary, and a rank that fails ends the run with one line.
"""
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import attention
import checkpoint
import config
import masks
from cli import refuse
from data import batches, tokenizer
from distributed import World
from fastweights import adapted_layers
from model import GPT, IGNORE, LOSS_CHUNK, preset
from model import autocast as model_autocast
from stats import attention_stats
from steplog import StepLog, step_record
from stopping import Interrupted, NonFinite, Stop, cut_log
from training_step import (
    build_mask,
    fast_weight_slots,
    inner_config,
    make_optimizer,
    optimizer_step,
)

# held-out rows for the answer accuracy printed with the statistics (eval split)
EVAL_ROWS = 4
# on a GPU, at least this many held-out tokens (32 rows at 8K): ~200 answers, not ~26
GPU_EVAL_TOKENS = 262144


# --------------------------------------------------------------------------------------------------
# pieces of the loop

def lr_at(step: int, args) -> float:
    """Linear warm-up over the first --warmup of the steps, then cosine decay to zero."""
    warm = max(1, int(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))


def held_out_batch(args, enc, source) -> dict:
    """The rows every evaluation of the run measures, on the device (the eval split, all
    lengths)."""
    rows = EVAL_ROWS if args.device == "cpu" else max(EVAL_ROWS, GPU_EVAL_TOKENS // args.ctx)
    batch = batches.get_batch(config.data_config(args), enc, source, 0, 0, split="eval", rows=rows)
    return batches.to_device(batch, args.device)


@torch.no_grad()
def evaluate(args, model, batch: dict) -> dict:
    """Held-out answer accuracy and loss, and the attention statistics of the batch's first row.

    Accuracy is the argmax at each answer's first token (for the lm objective: at every next token),
    with the base weights alone: fast weights exist only inside a training step; the loss is the
    mean cross-entropy at the same positions, which tells apart runs whose accuracies are within
    noise."""
    rows = batch["idx"].size(0)
    mask_mod = masks.for_batch(args.mask, batch)
    x = model.blocks(model.wte(batch["idx"]), model.rope(batch["pos"]),
                     build_mask(args, mask_mod, rows), range(model.config.n_layer))
    sel = batch["targets"] != IGNORE
    if args.objective == "sft":
        sel &= batch["loss_mask"] == 0              # the last context token predicts the answer
    h, targets = model.ln_f(x[sel]), batch["targets"][sel]   # N ~ all tokens for the lm objective
    preds, nll = [], torch.zeros((), device=h.device)
    # no (N, vocab) at once
    for chunk, want in zip(h.split(LOSS_CHUNK), targets.split(LOSS_CHUNK)):
        logits = model.lm_head(chunk)
        preds.append(logits.argmax(-1))
        nll += F.cross_entropy(logits.float(), want, reduction="sum")
    n = int(sel.sum())
    out = {"eval_acc": (torch.cat(preds) == targets).float().mean().item(),
           "eval_loss": nll.item() / n if n else math.nan, "eval_n": n}
    # the first row of each (B, S) tensor
    one = {k: v[:1] for k, v in batch.items() if v.dim() == 2}
    out.update(attention_stats(model, one["idx"], one["pos"], masks.for_batch(args.mask, one),
                               one["loss_mask"], one["attention_mask"]))
    return out


# --------------------------------------------------------------------------------------------------

def main(argv=None):
    world = World.from_environment()    # torchrun's ranks (distributed.py), or this process alone
    with world.speaking(config.PROG):   # rank 0 speaks for them; a rank that fails, in one line
        start(argv, world)


def start(argv, world: World):
    """The run from its command line, on this rank: bad input refused, then run() among the ranks,
    a stop or a NaN ending it with one line."""
    # bad input refused here, in one line
    args, start_step, ckpt, why = config.from_command_line(argv, __doc__)
    if args is None:                                    # a finished run given --resume
        return
    recorded = None if ckpt is None else ckpt["config"].get("world_size", 1)   # (its processes)
    problem = world.problem(args.device, recorded)
    if problem:
        refuse(config.PROG, problem)
    try:
        # books (and stories) for the loader and the evaluation
        source = batches.data_source(config.data_config(args))
    except (OSError, ValueError, RuntimeError) as e:
        refuse(config.PROG, str(e))  # (a missing book folder: before the model is built)
    stop = Stop(saved=start_step - 1, agree=world.largest)
    with world.joined(args.device), stop.handling_signals():
        try:
            run(args, start_step, ckpt, why, stop, source, world)
        except Interrupted as e:
            print(stop.last_line(args.out, e, world.launcher()), file=sys.stderr, flush=True)
            sys.exit(128 + e.signum)  # a shell's code for a process a signal ended: 130, 143
        except NonFinite as e:
            kept = (f"{checkpoint.path(args.out)} keeps step {stop.saved}" if stop.saved >= 0
                    else "nothing saved")
            sys.exit(f"train.py: error: {e}: stopped; {kept}")


def run(args, start_step: int, ckpt: dict | None, why: list[str], stop: Stop, source,
        world: World):
    """The run itself: main() with its arguments parsed, ended early by raising Interrupted or
    NonFinite. On each of the world's ranks, rank 0 alone evaluating and writing."""
    print("defaults chosen:\n  " + "\n  ".join(why) if why else "no defaults needed")
    print("config:", json.dumps(vars(args)))

    torch.manual_seed(args.seed)
    init = checkpoint.load(args.init) if args.init and ckpt is None else None
    kernels = attention.BACKENDS[args.flex_backend]    # how flex runs on the GPU (attention.py)
    if ckpt is not None:
        model = checkpoint.model_from(ckpt, kernels)
    else:
        model = (checkpoint.model_from(init, kernels, attn=args.attn) if init
                 else GPT(preset(args.model, args.attn), kernels))
    model_cfg, inner = model.config, inner_config(args)
    model.to(args.device)
    optimizer = make_optimizer(args, model)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if args.compile:
        # one graph per variant (shape, grad mode, with/without fast weights): allow more than the
        # default 8
        torch._dynamo.config.cache_size_limit = 64
        for block in model.h:
            block.compile(dynamic=False)
    # in ckpt and log; a run's batch is world_size ranks' rows: --resume continues on as many
    recorded = {"args": vars(args), "model": model_cfg.to_dict(), "inner": inner.to_dict(),
                "world_size": world.size}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {model_cfg.n_layer} layers; "
          f"fast weights on layers {list(adapted_layers(model_cfg.n_layer, inner.fraction))}")
    if world.size > 1:
        print(f"data parallel: {world.size} processes of {args.batch_size} row(s) each, "
              f"{world.size * args.batch_size} rows per micro-batch")

    enc = tokenizer.gpt2()
    log_file = os.path.join(args.out, "log.jsonl")
    if world.main:
        os.makedirs(args.out, exist_ok=True)
        if ckpt is not None:
            cut_log(log_file, ckpt["step"])
    # a new run: a new log; the other ranks' lines go nowhere
    log = open(log_file if world.main else os.devnull, "a" if args.resume else "w")
    # the card its step times come from (each try's: a resumed run may run on another)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    log.write(json.dumps({"config": recorded, "start_step": start_step, "gpu": gpu}) + "\n")
    autocast = model_autocast(args.device, args.dtype)
    last = min(args.steps, args.stop_after or args.steps) - 1
    # this rank's rows of each batch (data/batches.py)
    data = replace(config.data_config(args), first_row=world.rows(args.batch_size).start)
    loader = iter(batches.batch_loader(data, start_step, last, source))
    slots = fast_weight_slots(args)               # fast-weight groups per row (0: one set per row)
    # built once: the same rows at every evaluation
    held_out = held_out_batch(args, enc, source) if world.main else None
    # "eval step N": the model after N optimizer steps
    def report(updates: int):
        if not world.main:
            return
        with autocast:
            ev = evaluate(args, model, held_out)
        print(f"eval step {updates}: answer acc {ev['eval_acc']:.3f} (n={ev['eval_n']}), loss "
              f"{ev['eval_loss']:.3f} | "
              f"sink mass {ev['sink_mass']:.3f} | sink rate {ev['sink_rate']:.2f} | engagement "
              f"{ev['engagement']:.3f}")
        log.write(json.dumps({"step": updates, **ev}) + "\n")
        log.flush()

    lines = StepLog(log, args.steps)                    # each step's line, once its work is done

    def save(step: int):                                # every rank holds the same weights
        if world.main:
            checkpoint.save(checkpoint.path(args.out), model, optimizer, recorded, step)
        stop.saved = step
    # when the checkpoint on disk was written (or the loop began)
    saved_time = time.perf_counter()
    # from here a first signal waits for the step boundary
    stop.training = True
    try:
        for step in range(start_step, last + 1):
            # ------------------------------------------------------------ evaluation and checkpoint
            # SIGINT or SIGTERM came (to any rank) during the step before
            signum = stop.requested()
            stopping = signum is not None
            # a resumed run did
            evaluating = step % args.stats_every == 0 and (ckpt is None or step > start_step)
            saving = step > start_step and (stopping or checkpoint.due(
                args.ckpt_every, args.steps, step - 1 - stop.saved,
                time.perf_counter() - saved_time))
            if evaluating or saving or stopping:
                lines.drain()                     # (NonFinite here: the weights are never saved)
                if evaluating:
                    report(step)
                if saving:
                    save(step - 1)
                    saved_time = time.perf_counter()
                    if not stopping:              # (stopping: the last line says it)
                        print(f"saved {checkpoint.path(args.out)} at step {step - 1}")
                if stopping:
                    raise stop.end(signum, at_once=False)
                lines.pause()                     # the pause is no step's time

            # ------------------------------------------------------------------ one training step
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # built ahead (in workers unless --workers 0)
            host = [next(loader) for _ in range(args.grad_accum)]
            micro_batches = [batches.to_device(b, args.device, slots) for b in host]
            loss_sum, inner_sum, grad_norm = optimizer_step(args, model, inner, optimizer,
                                                            micro_batches, autocast, world)
            (tokens,) = world.total(sum(int(b["attention_mask"].sum()) for b in host))
            lines.queued(step_record(step, lr, loss_sum, inner_sum, grad_norm, tokens))
    except NonFinite:
        raise                                           # no line after the bad step's
    except BaseException:
        lines.failed()
        raise
    finally:
        batches.stop_workers(loader)                    # (else an error's exit may hang on them)
    lines.drain()
    if not world.main:                                  # the rest is rank 0's
        return

    report(last + 1)                                    # the model the checkpoint holds
    save(last)
    if args.device.startswith("cuda"):
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"saved {checkpoint.path(args.out)} at step {last}")
    log.close()
    print(summary(args, os.path.join(args.out, "log.jsonl")))


def summary(args, log_file: str) -> str:
    """What the run shows, from its log: the loss from first to last step, the held-out answers
    before and after, and, where none is answered, what that means (a short run learns the text
    before it learns to answer)."""
    records = [json.loads(line) for line in open(log_file)]
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "eval_acc" in r]
    said = f"summary: loss {steps[0]['loss']:.2f} -> {steps[-1]['loss']:.2f} over steps " \
           f"{steps[0]['step']}-{steps[-1]['step']}"
    if args.objective == "lm":
        return said + (f"; held-out next-token accuracy {evals[0]['eval_acc']:.3f} -> "
                       f"{evals[-1]['eval_acc']:.3f}")
    said += (f"; held-out answers right {evals[0]['eval_acc']:.3f} -> {evals[-1]['eval_acc']:.3f} "
             f"(of {evals[-1]['eval_n']} answer tokens)")
    if evals[-1]["eval_acc"] < 0.05:
        said += ("\n  no answer is learned yet: a short run learns the words of the text first and "
                 "answers only after many more steps (docs/learning.md); the loss falling is what "
                 "a run this short can show")
    return said


if __name__ == "__main__":
    main()
