"""A training run's configuration: train.py's command line, the defaults each machine fills in (and
why), the checks that turn bad input into one clear line, and --resume's rule that a run continues
as it was recorded.

Everything a run does follows from the Namespace this returns; train.py records it in every
checkpoint and log, so a run can be resumed, inspected or repeated from its files alone.
"""
import argparse
import os

import torch

import checkpoint
from attention import BACKENDS, FLASH_INSTALL, flash_backend_available
from cli import Parser, number, output_problem, refuse
from data import babi, batches, cwe, packing, tokenizer
from fastweights import INNER_LOSSES, PROJECTIONS, InnerConfig
from model import PRESETS

# the name this file's refusals give (train.py's command line lives here)
PROG = "train.py"
GPU_TOKENS_PER_STEP = 65536  # GPU default batch: enough rows of --ctx tokens to fill a GPU at 8K
# from scratch: 0.1 left the base weights behind SFT on BABILong rows (docs/learning.md)
SCRATCH_INNER_LR = 0.03
# AdamW's rate with --init: the authors' for fine-tuning a pretrained model
FINETUNE_LR = 1e-5
# runs recorded before these flags: no cap on samples per row
LEGACY = {"workers": 0, "bos": 0, "max_docs": 1 << 30, "inner_per": "row"}
# this invocation's, not the recorded run's
RUN_ONLY = ("out", "resume", "stop_after", "workers", "flex_backend")
# flag: (its value on a GPU, on a CPU) where the user gives none; apply_defaults says why
BY_DEVICE = {
    "model": ("small", "tiny"), "attn": ("flex", "sdpa"), "compile": (1, 0),
    "dtype": ("bf16", "fp32"),
    "batch_size": (f"{GPU_TOKENS_PER_STEP} / --ctx", 1), "workers": ("up to 8", 0),
    "steps": (5000, 20),
    "lr": (1e-3, 3e-3), "curriculum": (1, 0)}


def by_device(name: str) -> str:
    gpu, cpu = BY_DEVICE[name]
    return f"{gpu} on a GPU, {cpu} on a CPU"


# --------------------------------------------------------------------------------------------------
# train.py's command line

def get_args(argv=None, description: str = "") -> argparse.Namespace:
    """train.py's flags, each checked on its own as it is read (a number's range, a name's choices);
    how they fit together is check_args's. `description`: --help's text (train.py's docstring)."""
    return parser(description).parse_args(argv)


def parser(description: str = "") -> Parser:
    p = Parser(PROG, description)
    # counts (0 = the default or off, as each help says)
    count, positive = number(int, 0), number(int, 1)
    nonnegative, above_zero = number(float, 0), number(float, 0, above=True)
    # --- data ---
    p.add_argument("--ctx", type=positive, default=8192, help="tokens per training row")
    p.add_argument("--data", choices=["babilong", "cwe", "babilong+cwe", "synthetic", "books"],
                   default="babilong",
                   help="babilong: one-question samples built by BABILong's recipe (babilong.py), "
                        "the format eval_babilong.py uses; cwe: RULER's common-words extraction "
                        "(data/cwe.py, eval_ruler.py); babilong+cwe: each sample one or the other "
                        "at random; synthetic: multi-turn stories (every question a response "
                        "turn); books: stretches of the haystack's books (with --objective lm: "
                        "pretraining)")
    p.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5", help="bAbI tasks to draw samples from")
    p.add_argument("--lengths", default="0k,1k,2k,4k,8k",
                   help="--data babilong, cwe: sample lengths (Nk = N*1000 GPT-2 tokens; N*1024 "
                        "for CWE, which skips 0k); those longer than --ctx are dropped")
    p.add_argument("--curriculum", type=int, choices=[0, 1], default=None,
                   help="--data babilong: 1 = the shortest length alone for the first half of the "
                        "steps, then the others one at a time, shortest first (default "
                        + by_device("curriculum") + ")")
    p.add_argument("--haystack", default="synthetic",
                   help="haystack text: synthetic, pg19 (online) or a folder of .txt books")
    p.add_argument("--babi-dir", default=None,
                   help="--data babilong: real bAbI stories instead of the generator (train "
                        "files; the held-out check: test files); default: none, the generator")
    p.add_argument("--min-len", type=positive, default=256,
                   help="--data synthetic, books: shortest sample in a row (tokens)")
    p.add_argument("--max-len", type=count, default=0,
                   help="--data synthetic, books: longest sample (tokens); 0 = --ctx")
    p.add_argument("--max-docs", type=count, default=0,
                   help="most samples a row holds (the rest is padding); "
                        f"0 = ctx / {batches.TOKENS_PER_DOC}")
    p.add_argument("--bos", type=int, choices=[0, 1], default=None,
                   help="1 = every sample opens with the same token (<|endoftext|>): a fixed "
                        "attention sink (default: the --init checkpoint's, else 0)")
    p.add_argument("--objective", choices=["sft", "lm"], default="sft",
                   help="sft: loss on answers; lm: next-token loss on every token, causal mask "
                        "(pretraining)")
    # --- method ---
    p.add_argument("--method", choices=["focusft", "sft"], default=None,
                   help="focusft (default): inner loop + hybrid mask; sft: causal mask, no inner "
                        "loop")
    p.add_argument("--mask", choices=["hybrid", "causal"], default=None,
                   help="override the method's mask (for the 2x2 ablation); default hybrid for "
                        "focusft")
    # the inner loop's defaults are InnerConfig's (fastweights.py: the authors' values)
    p.add_argument("--inner-steps", type=count, default=InnerConfig.steps,
                   help="inner SGD steps (0 = no inner loop)")
    p.add_argument("--inner-per", choices=["sample", "row"], default="sample",
                   help="sample: every packed sample adapts its own fast weights (the authors'); "
                        "row: the samples of a row share one set (a different method)")
    p.add_argument("--inner-lr", type=nonnegative, default=None,
                   help=f"inner SGD learning rate; default {InnerConfig.lr:g} (the authors') "
                        f"with --init, {SCRATCH_INNER_LR} from scratch")
    p.add_argument("--inner-clip", type=above_zero, default=InnerConfig.clip,
                   help="per-tensor gradient norm clip in the inner loop")
    p.add_argument("--inner-rank", type=positive, default=InnerConfig.rank,
                   help="LoRA rank of the fast weights")
    p.add_argument("--inner-alpha", type=above_zero, default=InnerConfig.alpha,
                   help="LoRA alpha (delta scaled by alpha/rank)")
    p.add_argument("--inner-fraction", type=number(float, 0, 1, above=True),
                   default=InnerConfig.fraction, help="top fraction of layers with fast weights")
    p.add_argument("--inner-targets", default=",".join(InnerConfig.targets),
                   help="MLP projections with fast weights")
    p.add_argument("--inner-loss", choices=INNER_LOSSES, default=InnerConfig.loss,
                   help="response: the outer SFT loss; context: next-token loss on context "
                        "tokens (causal)")
    # --- optimisation ---
    p.add_argument("--steps", type=count, default=0,
                   help="optimizer steps; 0 = " + by_device("steps"))
    p.add_argument("--batch-size", type=count, default=0,
                   help="rows per micro-batch; 0 = " + by_device("batch_size"))
    p.add_argument("--grad-accum", type=positive, default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--lr", type=number(float, 0, note=" (0 = the machine's default)"), default=0.0,
                   help=f"peak AdamW learning rate; 0 = {by_device('lr')}, {FINETUNE_LR:g} "
                        "with --init")
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.1,
                   help="warm-up fraction of the steps (then cosine to 0)")
    p.add_argument("--weight-decay", type=nonnegative, default=0.01,
                   help="AdamW weight decay on matrices")
    p.add_argument("--clip", type=nonnegative, default=1.0,
                   help="global gradient norm clip (0 = off)")
    # --- model ---
    p.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help=f"size preset; default {by_device('model')}, or --init's model")
    p.add_argument("--init", default=None,
                   help="start from the weights (and model config: --model may not name another) "
                        "of this checkpoint; default: none, from scratch")
    p.add_argument("--attn", choices=["flex", "sdpa"], default=None,
                   help=f"attention backend; default {by_device('attn')}")
    p.add_argument("--flex-backend", choices=sorted(BACKENDS), default="triton",
                   help="flex's kernels: triton (torch's), or flash (FlashAttention-4's, where the "
                        "optional flash-attn-4 package and an H100/H200/B200-class GPU are "
                        "there): faster at batch 8, slower at batch 1 (docs/speed.md)")
    # --- system ---
    p.add_argument("--device", default=None, help="cpu or cuda; default cuda when available")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help=f"autocast dtype; default {by_device('dtype')}")
    p.add_argument("--compile", type=int, choices=[0, 1], default=None,
                   help=f"torch.compile each block; default {by_device('compile')}")
    p.add_argument("--seed", type=int, default=1337, help="seed of data, init and fast weights")
    p.add_argument("--workers", type=count, default=None,
                   help="processes building batches ahead of the GPU (0: in line); default "
                        f"{by_device('workers')}")
    # --- output ---
    p.add_argument("--out", default="out", help="directory for ckpt.pt and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue exactly from --out/ckpt.pt")
    p.add_argument("--stop-after", type=count, default=0,
                   help="end this run after this step (continue with --resume)")
    p.add_argument("--ckpt-every", type=count, default=0,
                   help="checkpoint every N steps; 0 = every "
                        f"{checkpoint.EVERY_FRACTION * 100:g}%% of the steps or "
                        f"{checkpoint.EVERY_SECONDS // 60} minutes of training, whichever comes "
                        f"first, but no sooner than {checkpoint.MIN_SECONDS} s after the last; a "
                        "run also saves at its end and when stopped by SIGINT or SIGTERM")
    p.add_argument("--stats-every", type=count, default=0,
                   help="sink/engagement/accuracy every N steps; 0 = steps/5")
    return p


def apply_defaults(args) -> list[str]:
    """Fill what the user left open by the machine; return the reasons, for printing."""
    why = []
    cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    def default(name, value, reason):   # None (and 0 for counts) means "not given"
        if getattr(args, name) is None or (name in ("steps", "batch_size", "lr", "max_len",
                                                    "stats_every")
                                           and getattr(args, name) == 0):
            setattr(args, name, value)
            why.append(f"--{name.replace('_', '-')} {value}: {reason}")
    if args.init:
        default("lr", FINETUNE_LR,
                "the authors' AdamW rate for fine-tuning a trained model (--init)")
    side = 0 if cuda else 1
    plain = lambda name, reason: default(name, BY_DEVICE[name][side], reason)
    if cuda:
        # with --init, the checkpoint's model (init_model)
        if not args.init:
            plain("model", "8 x 512, head size 128 (flex's fast kernel shape), 51.5M parameters")
        plain("attn", "fused flex_attention kernels with a sparse BlockMask")
        plain("compile", "flex must run compiled on the GPU")
        plain("dtype", "bf16 autocast")
        default("batch_size", max(1, GPU_TOKENS_PER_STEP // args.ctx),
                f"about {GPU_TOKENS_PER_STEP:,} tokens per step")
        default("workers", min(8, usable_cpus()),
                "batches are built ahead in other processes: building one takes longer than a "
                "GPU step")
        plain("steps", "half on 0k rows, half as 1k-8k join: enough from scratch to read qa5 to 8K "
                       "(docs/learning.md)")
        plain("lr", "a from-scratch model; use ~1e-5 to fine-tune a pretrained one")
        plain("curriculum", "0k samples alone for the first half (470 answers per step, 70 at "
                            "0k-8k): from scratch, reading is learned on short samples "
                            "(docs/learning.md)")
    else:
        if not args.init:
            plain("model", "2-core CPU")
        plain("attn", "flex_attention has no CPU backward")
        plain("compile", "no compile on CPU")
        plain("dtype", "CPU")
        plain("batch_size", "CPU")
        plain("workers", "a CPU step takes longer than building its batch")
        plain("steps", "a first look on a CPU: the loss falls, answers need a GPU's steps")
        plain("lr", "a tiny model from scratch")
        plain("curriculum", "a short run: every length from the start")
    if args.data in ("synthetic", "books"):
        default("max_len", args.ctx, "samples up to a full row")
    if args.inner_lr is None:
        args.inner_lr = InnerConfig.lr if args.init else SCRATCH_INNER_LR
        why.append(f"--inner-lr {args.inner_lr}: "
                   + ("the authors' value, for a pretrained model" if args.init else
                      "from scratch, stronger fast weights leave the base weights worse on their "
                      "own (docs/learning.md)"))
    default("stats_every", max(1, args.steps // 5),
            "six measurements a run: untrained, every fifth, trained")
    return why


def data_config(args) -> batches.DataConfig:
    """The run's data flags as the data layer takes them (plain values, no argparse)."""
    return batches.DataConfig(
        data=args.data, objective=args.objective, tasks=tuple(args.tasks.split(",")),
        lengths=tuple(args.lengths.split(",")), curriculum=bool(args.curriculum),
        haystack=args.haystack, babi_dir=args.babi_dir, min_len=args.min_len,
        max_len=args.max_len, max_docs=args.max_docs, bos=bool(args.bos), ctx=args.ctx,
        rows=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, seed=args.seed,
        context_targets=args.method == "focusft" and args.inner_loss == "context",
        workers=args.workers or 0, pin_memory=(args.device or "cpu").startswith("cuda"))


def usable_cpus() -> int:
    """This process's share of the CPUs it may run on: under torchrun, the node's ranks share
    them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_args(args):
    """Refuse flags that do not fit together or this machine (each flag's own range was checked as
    it was read, get_args), before anything is built: the first problem, as one line."""
    bad = [device_problem(args.device),
           f"--min-len ({args.min_len}) must be between {packing.MIN_SAMPLE_TOKENS} (a turn of a "
           "story) and --ctx"
           if args.data in ("synthetic", "books")
           and not packing.MIN_SAMPLE_TOKENS <= args.min_len <= args.ctx
           else None,
           f"--max-len ({args.max_len}) must be between --min-len and --ctx"
           if args.data in ("synthetic", "books") and not args.min_len <= args.max_len <= args.ctx
           else None,
           "--data books is plain text, with no answers: train it with --objective lm"
           if args.data == "books" and args.objective != "lm" else None,
           "--babi-dir serves --data babilong (the multi-turn stories come from babi.py)"
           if args.babi_dir and args.data == "synthetic" else None,
           "--flex-backend flash serves --attn flex"
           if args.flex_backend == "flash" and args.attn != "flex" else None,
           f"--flex-backend flash needs an SM90/SM100 GPU and flash-attn-4 ({FLASH_INSTALL})"
           if args.flex_backend == "flash" and args.attn == "flex" and not flash_backend_available()
           else None,
           "--attn flex trains only on cuda (no CPU backward); use --attn sdpa"
           if args.attn == "flex" and args.device == "cpu" else None,
           f"--resume: no checkpoint at {checkpoint.path(args.out)}"
           if args.resume and not os.path.exists(checkpoint.path(args.out)) else None]
    unknown = set(args.tasks.split(",")) - set(babi.TASKS)
    bad.append(f"--tasks: unknown {sorted(unknown)}; choose from {','.join(babi.TASKS)}"
               if unknown else None)
    if args.data in ("babilong", "cwe", "babilong+cwe") and not unknown:
        try:
            fits = batches.lengths_at(data_config(args), args.steps)
            bad.append(None if fits else f"--lengths: none of {args.lengths} fits --ctx {args.ctx}"
                       + (" (CWE starts at 1k)" if args.data == "cwe" else ""))
            if "cwe" in args.data:
                cwe.word_pool()                         # wonderwords installed
        except (OSError, ValueError, RuntimeError) as e:
            bad.append(str(e))
    unknown = set(args.inner_targets.split(",")) - set(PROJECTIONS)
    bad.append(f"--inner-targets: unknown {sorted(unknown)}; choose from {','.join(PROJECTIONS)}"
               if unknown else None)
    bad.append("--objective lm is plain pretraining: it has no inner loop (use --method sft)"
               if args.objective == "lm" and args.method == "focusft" else None)
    bad.append("--objective lm predicts every next token: under the hybrid mask a context token "
               "sees its own target; use --mask causal"
               if args.objective == "lm" and args.mask == "hybrid" else None)
    try:
        tokenizer.gpt2()
    except RuntimeError as e:
        bad.append(str(e))
    for b in bad:
        if b:
            refuse(PROG, b)


def device_problem(device: str) -> str | None:
    """Why `device` cannot run here, or None: it must be cpu, cuda or cuda:N, and such a GPU must
    exist."""
    if device != "cpu" and not (device == "cuda"
                                or device.startswith("cuda:") and device[5:].isdigit()):
        return f"--device: expected cpu, cuda or cuda:N (got {device})"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device here"
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def from_command_line(argv=None, description: str = "") -> tuple[argparse.Namespace | None, int,
                                                                  dict | None, list[str]]:
    """(args, first step, checkpoint or None, the reasons for each default): a new run's flags with
    the machine's defaults, or with --resume the recorded run's (only RUN_ONLY flags may be given
    again). args is None when --resume finds the run finished. Bad input is refused here, before
    anything is built or written.
    `description`: --help's text."""
    args = get_args(argv, description)
    start_step, ckpt = 0, None
    if args.resume and os.path.exists(checkpoint.path(args.out)):
        given = [k for k, v in vars(args).items() if v != vars(get_args([]))[k]
                 and k not in RUN_ONLY]
        if given:
            refuse(PROG, "--resume continues the recorded run; drop "
                         f"--{given[0].replace('_', '-')}")
        ckpt = read_checkpoint("--resume", checkpoint.path(args.out))
        keep = {k: getattr(args, k) for k in RUN_ONLY if getattr(args, k) is not None}
        args = argparse.Namespace(**{**LEGACY, **ckpt["config"]["args"], **keep})
        start_step = ckpt["step"] + 1
        why = [f"resuming {checkpoint.path(args.out)} at step {start_step} with its recorded "
               "configuration"]
        if args.stop_after and args.stop_after <= start_step:
            refuse(PROG, f"--stop-after {args.stop_after} is not past the checkpoint's step "
                         f"{start_step}")
        if start_step >= args.steps:
            print(f"{checkpoint.path(args.out)} has finished its {args.steps} steps: nothing to "
                  "resume")
            return None, start_step, ckpt, []
    else:
        why = init_model(args)
        # (bench/'s runs write nothing)
        if not args.resume and os.path.exists(checkpoint.path(args.out)):
            refuse(PROG, f"--out {args.out} already holds a run ({checkpoint.path(args.out)}): "
                         "add --resume to continue it, or choose another --out")
        why += apply_defaults(args)
        args.method = args.method or ("sft" if args.objective == "lm" else "focusft")
        args.mask = args.mask or ("hybrid" if args.method == "focusft" else "causal")
    check_args(args)
    # (not in check_args: bench/'s runs write nothing)
    problem = output_problem("--out", args.out)
    if problem:
        refuse(PROG, problem)
    return args, start_step, ckpt, why


def read_checkpoint(flag: str, file: str, mmap: bool = False) -> dict:
    """checkpoint.load, with a file that is not a checkpoint refused in one line naming the flag."""
    try:
        return checkpoint.load(file, mmap)
    except checkpoint.NotACheckpoint as e:
        refuse(PROG, f"{flag}: {e}")


def init_model(args) -> list[str]:
    """--init: the run trains the checkpoint's model (its weights fix the size), so --model is the
    checkpoint's, and a --model naming another size is refused. Returns the reason, for printing,
    when --model was not given."""
    if not args.init:
        args.bos = args.bos or 0
        return []
    ckpt = read_checkpoint("--init", args.init, mmap=True)     # mapped: a quick look
    name, why = checkpoint.preset_name(ckpt), []
    # the base learned with (or without) its start-of-document token
    if args.bos is None:
        args.bos = ckpt["config"]["args"].get("bos", 0)
        why.append(f"--bos {args.bos}: the --init checkpoint's")
    if args.model is not None:
        if args.model != name:
            refuse(PROG, f"--model {args.model} conflicts with --init {args.init}, whose model is "
                         f"{name or 'none of the presets'}: drop --model (the checkpoint's "
                         "weights fix the size)")
        return why
    args.model = name
    return why + [f"--model {name}: the --init checkpoint's model" if name else
                  "--model none: the --init checkpoint's model is none of the presets"]
