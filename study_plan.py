"""The study's plan: every size of it (steps, rates, the sweep's grid, seeds, test lengths and
samples), the full plan for one GPU and the quick one for a CPU, `--set FIELD=VALUE` changes, and
the arms a plan trains (their names and folders, which study.py and study_report.py share).

    from study_plan import FULL, with_changes
    plan = with_changes(FULL, ["arm_steps=500", "sweep_lrs=0.1,0.3"])

study.py runs a plan; results.json records the plan it ran, so a report can be rebuilt from it.
"""
import math
from dataclasses import asdict, dataclass, field

from data.babilong import LENGTHS as BABILONG_LENGTHS
from model import PRESETS

# where each model's attention statistics are measured, as the paper's range
STATS_LENGTHS = ("4k", "16k")
# what the plan's fields may hold (checked as --set reads them, before any stage runs)
AT_LEAST_ONE = ("ctx", "batch", "base_steps", "arm_steps", "sweep_steps", "sweep_inner_steps",
                "eval_n", "stats_n", "stats_every", "cwe_n")
NOT_NEGATIVE = ("qa_steps", "base_wd", "seeds")
ABOVE_ZERO = ("base_lr", "arm_lr", "sweep_lrs")
DATA = ("babilong", "cwe", "babilong+cwe")           # train.py --data: the test's question formats


@dataclass
class Plan:
    """Every size of the study. FULL is the documented run on one GPU; QUICK runs the pipeline on a
    CPU."""
    model: str = "small"              # train.py --model preset
    # training row length: arms train at <= 8K, evaluation runs to 32K
    ctx: int = 8192
    batch: int = 8                    # rows per step
    # Steps of each stage, sized so that the whole study fits the 25 minutes of one GPU it is
    # meant for; what each stage took, and why the base is not shorter: docs/study.md
    base_steps: int = 1200            # book-text pretraining steps
    base_lr: float = 3e-3             # its peak AdamW rate
    base_wd: float = 0.1              # its weight decay (Gu et al.: more decay, stronger sinks)
    # then next-token training on short samples of `data` (0k, 1k) as text
    qa_steps: int = 200
    data: str = "babilong+cwe"        # train.py --data of that stage, the sweep and the arms
    arm_steps: int = 300              # fine-tuning steps of every arm
    arm_lr: float = 3e-4              # their peak AdamW rate
    train_lengths: str = "0k,1k,2k,4k,8k"
    # inner learning rates tried, and inner steps with each (2: the authors'); the sweep is their
    # product. Why this grid (earlier sweeps chose their lowest rate): docs/study.md
    sweep_lrs: tuple = (0.01, 0.03)
    sweep_inner_steps: tuple = (1, 2)
    sweep_steps: int = 150            # FocuSFT steps per sweep run
    # what the inner loop fits, in the sweep and the arms with one (train.py --inner-loss): the
    # answer ("response", the authors'), or next-token loss on the context ("context"), which a
    # LoRA cannot drive to zero in two steps as it does a one-word answer
    inner_loss: str = "response"
    seeds: tuple = (1, 2)             # SFT and FocuSFT run with each; the other arms with the first
    eval_lengths: tuple = ("0k", "1k", "2k", "4k", "8k", "16k", "32k")
    eval_n: int = 20                  # samples per task and length
    # samples per length for the attention statistics (one per task)
    stats_n: int = 5
    stats_every: int = 100            # training-log statistics every N steps
    # RULER CWE's test lengths (N*1024 tokens), the paper's range
    cwe_lengths: tuple = ("4k", "8k", "16k", "32k")
    # CWE samples per length. Each scores 10 words, so a cell of 20 checks 200; the CWE evaluation
    # is then 8 models x 4 lengths x 20 = 640 prompts, under each model's own mask only: about a
    # tenth of BABILong's prompt tokens
    cwe_n: int = 20
    # more train.py flags for every run (e.g. --workers 0)
    extra: list = field(default_factory=list)


FULL = Plan()
QUICK = Plan(model="tiny", ctx=512, batch=2, base_steps=4, qa_steps=2, arm_steps=3, arm_lr=1e-3,
             train_lengths="0k", sweep_lrs=(0.03, 1.0), sweep_inner_steps=(1, 2), sweep_steps=2,
             seeds=(1, 2), eval_lengths=("0k", "1k"), eval_n=1, stats_n=1, stats_every=2,
             cwe_lengths=("1k",), cwe_n=1, extra=["--device", "cpu", "--workers", "0"])


def with_changes(plan: Plan, changes: list[str]) -> Plan:
    """The plan with FIELD=VALUE changes, each value parsed as the field's type (a tuple:
    comma-separated)."""
    fields = asdict(plan)
    for change in changes:
        name, _, value = change.partition("=")
        if name not in fields or name == "extra":
            raise ValueError(f"no plan field {name!r} "
                             f"(fields: {', '.join(k for k in fields if k != 'extra')})")
        old = fields[name]
        kind = type(old[0]) if isinstance(old, tuple) else type(old)
        try:
            fields[name] = (tuple(kind(v) for v in value.split(",")) if isinstance(old, tuple)
                            else kind(value))
            if not all(math.isfinite(v)
                       for v in (fields[name] if isinstance(old, tuple) else [fields[name]])
                       if isinstance(v, float)):
                raise ValueError
        except ValueError:
            what = {float: "finite number", int: "integer"}.get(kind, kind.__name__)
            raise ValueError(f"{name}={value!r} is not "
                             f"{f'a list of {what}s' if isinstance(old, tuple) else f'a {what}'}")
    plan = Plan(**fields)
    why = problem(plan)
    if why:
        raise ValueError(why)
    return plan


def problem(plan: Plan) -> str | None:
    """What in the plan no stage could run (None: nothing), so that it is refused before the base
    trains, not when the stage that needs it starts minutes later."""
    values = asdict(plan)

    def each(name):
        return values[name] if isinstance(values[name], tuple) else [values[name]]
    for names, low, rule in ((AT_LEAST_ONE, 1, ">= 1"), (NOT_NEGATIVE, 0, ">= 0"),
                             (ABOVE_ZERO, 0, "> 0")):
        for name in names:
            if any(v < low or (rule == "> 0" and v == 0) for v in each(name)):
                return f"{name} must be {rule}, not {values[name]!r}"
    if len(set(plan.seeds)) < len(plan.seeds):
        return f"seeds must differ, not {plan.seeds!r}"       # (an arm's folder names its seed)
    if plan.stats_n > 5 * plan.eval_n:
        return (f"stats_n={plan.stats_n} asks for more samples of a length than the test holds "
                f"(eval_n={plan.eval_n} of each of 5 tasks)")
    if plan.data not in DATA:
        return f"data must be one of {', '.join(DATA)}, not {plan.data!r}"
    if plan.model not in PRESETS:
        return f"model must be one of {', '.join(sorted(PRESETS))}, not {plan.model!r}"
    for name in ("train_lengths", "eval_lengths"):
        lengths = values[name].split(",") if isinstance(values[name], str) else values[name]
        wrong = [n for n in lengths if n not in BABILONG_LENGTHS]
        if wrong:
            return (f"{name}: no BABILong length {wrong[0]!r} "
                    f"(lengths: {', '.join(BABILONG_LENGTHS)})")
    return None


def arm_names(plan: Plan) -> list[str]:
    """Every arm's name ("sft/1"), in the order the study trains them: SFT and FocuSFT of the first
    seed (timed alone), their other seeds, then the other arms with the first seed."""
    first = plan.seeds[0]
    return ([f"{name}/{first}" for name in ("sft", "focusft")]
            + [f"{name}/{seed}" for name in ("sft", "focusft") for seed in plan.seeds[1:]]
            + [f"{name}/{first}" for name in ("hybrid", "inner", "sft_time")])


def arm_folder(key: str) -> str:
    """An arm's folder under the study's arms/ ("sft/1" -> "sft_s1")."""
    return key.replace("/", "_s")
