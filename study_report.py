"""The study's report: results.md (the tables) and the figures, from what study.py recorded
(results.json and each run's log.jsonl). Numbers only: nothing here trains or evaluates.

The tables compare each model under its own mask and the causal one; FocuSFT and SFT are compared on
the same test samples (paired differences with standard errors, exact sign tests), and the answers'
form is counted, since past the trained lengths a model may stop answering in an answer's form.
RULER CWE has its own tables and figure (cwe.png) where the study recorded it.
"""
import json
import math
import os
from pathlib import Path

from study_plan import arm_folder

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def write_json(path: Path, value):
    """Whole or not at all (a temporary file, then renamed): a study stopped while writing leaves
    the file it had, or none."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def accuracy(records: list[dict], length: str | None = None, task: str | None = None) -> float:
    return mean(float(r["correct"]) for r in records
                if (length is None or r["length"] == length)
                and (task is None or r["task"] == task))


def one_word(record: dict) -> bool:
    return len(record["output"].split()) == 1


def answer_shaped(records: list[dict], lengths) -> float:
    """Share of the outputs (of `lengths`) that have an answer's form, one word: past the lengths a
    model was trained on, a causal model's answers may turn into prose, which no scorer accepts
    whatever the model read."""
    return mean(float(one_word(r)) for r in records if r["length"] in lengths)


def top_output_share(records: list[dict], lengths) -> float:
    """Share of the outputs (of `lengths`) that are the most frequent one: near 1, the model answers
    every question alike, whatever its context says."""
    outputs = [r["output"].strip() for r in records if r["length"] in lengths]
    return max(map(outputs.count, set(outputs))) / len(outputs) if outputs else math.nan


def cwe_score(records: list[dict], length: str | None = None) -> float:
    """Mean RULER CWE score (share of the 10 words found) of the records (of one length)."""
    return mean(r["score"] for r in records if length is None or r["length"] == length)


def paired(a: list[dict], b: list[dict], lengths, key: str = "correct") -> dict:
    """a minus b on the same test samples (of `lengths`): the difference of their mean `key`
    (accuracy; a CWE score), its standard error over the samples, and the exact two-sided sign test
    on the samples where one is ahead (McNemar's, for right / wrong). ValueError where a and b are
    not records of the same samples in the same order (as far as their task and length show)."""
    if [(x.get("task"), x["length"]) for x in a] != [(y.get("task"), y["length"]) for y in b]:
        raise ValueError(f"cannot pair {len(a)} records with {len(b)}: not the same test samples "
                         "(evaluations of studies of different plans?)")
    diffs = [float(x[key]) - float(y[key]) for x, y in zip(a, b) if x["length"] in lengths]
    only_a, only_b = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    d = mean(diffs)
    spread = mean((x - d) ** 2 for x in diffs) / max(len(diffs) - 1, 1)
    se = math.sqrt(spread) if diffs else math.nan
    return {"diff": d, "se": se, "only_a": only_a, "only_b": only_b, "p": p, "n": len(diffs)}


def report(out: Path, plan, res: dict):
    """results.md and the figures. A study cut short (res["partial"]) reports what it has: the
    models evaluated so far, the stages finished."""
    ev, lengths, first = res.get("eval", {}), list(plan.eval_lengths), plan.seeds[0]
    long = [n for n in ("16k", "32k") if n in lengths] or lengths[-1:]   # past the training length
    short = [n for n in lengths if n not in long] or lengths
    both = "+".join(long)
    where = res["machine"]
    quick = ", --quick" if res["args"]["quick"] else ""
    lines = [f"# The FocuSFT study ({where['date']}, {where['gpu'] or 'CPU'}, commit "
             f"{where['commit']}{quick})", ""]
    if res.get("partial"):
        planned = 1 + 2 * len(plan.seeds) + 3
        lines += [f"**Cut short**: {len(ev)} of {planned} models evaluated; stages finished: "
                  + ", ".join(k for k in ("base", "sweep", "arms") if k in res) + ".", ""]

    def table(title, header, rows):
        lines.extend(markdown_table(title, header, rows))

    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.2f}"

    def own(name: str) -> list[dict]:
        return ev[name]["records"][ev[name]["mask"]]

    comparisons = [(f"focusft/{s}", f"sft/{s}") for s in plan.seeds]
    comparisons.append((f"focusft/{first}", f"sft_time/{first}"))
    comparisons = [(a, b) for a, b in comparisons if a in ev and b in ev]
    if ev:                              # (none: a study cut short before its evaluations)
        for which in ("its own", "the causal"):
            rows = []
            for name in ev:
                mask = ev[name]["mask"] if which == "its own" else "causal"
                recs = ev[name]["records"][mask]
                rows.append([name, mask, *[fmt(accuracy(recs, n)) for n in lengths],
                             fmt(mean(accuracy(recs, n) for n in short)),
                             fmt(mean(accuracy(recs, n) for n in long))])
            table(f"BABILong accuracy, mean over qa1-qa5, each model under {which} mask "
                  f"({plan.eval_n} samples per task and length)",
                  ["model", "mask", *lengths, "+".join(short), both], rows)
        table("Paired differences on the same test samples (own masks): A minus B ± its standard "
              "error over samples", ["A - B", *lengths, both],
              paired_rows(comparisons, own, lengths, long))
        table(f"Exact sign tests over {both}: samples only A / only B gets right",
              ["A - B", "only A", "only B", "p"],
              [[f"{a} - {b}", str(d["only_a"]), str(d["only_b"]), f"{d['p']:.3g}"]
               for a, b in comparisons for d in [paired(own(a), own(b), long)]])
        table("Answers in an answer's form (one word), share of outputs, own mask; then over "
              f"{both}: the accuracy of those one-word answers, and the share of outputs that are "
              "the model's most frequent one",
              ["model", *lengths, both, f"{both} one-word acc", f"{both} top output"],
              [[name, *[fmt(answer_shaped(own(name), [n])) for n in lengths],
                fmt(answer_shaped(own(name), long)),
                fmt(accuracy([r for r in own(name) if one_word(r) and r["length"] in long])),
                fmt(top_output_share(own(name), long))] for name in ev])
        stats_at = [n for e in list(ev.values())[:1] for n in e["stats"][e["mask"]]]
        table("Attention on test samples, own mask: sink mass / sink rate / engagement",
              ["model", *stats_at],
              [[name, *map(attention, ev[name]["stats"][ev[name]["mask"]].values())]
               for name in ev])
        cwe = [name for name in ev if "cwe" in ev[name]]    # (a study recorded before CWE has none)
        if cwe:
            cwe_lengths = list(plan.cwe_lengths)
            def cwe_records(name: str) -> list[dict]:
                return ev[name]["cwe"]["records"]
            table("RULER CWE: share of the 10 common words in the output (RULER's "
                  f"string_match_all), each model under its own mask ({plan.cwe_n} samples per "
                  "length)",
                  ["model", "mask", *cwe_lengths, "mean"],
                  [[name, ev[name]["mask"],
                    *[fmt(cwe_score(cwe_records(name), n)) for n in cwe_lengths],
                    fmt(cwe_score(cwe_records(name)))] for name in cwe])
            table("RULER CWE, paired differences on the same samples: A minus B ± its standard "
                  "error over samples", ["A - B", *cwe_lengths, "all"],
                  paired_rows([(a, b) for a, b in comparisons if a in cwe and b in cwe],
                              cwe_records, cwe_lengths, cwe_lengths, "score"))
            table("RULER CWE attention, own mask: sink mass / sink rate / engagement",
                  ["model", *cwe_lengths],
                  [[name, *map(attention, ev[name]["cwe"]["stats"].values())] for name in cwe])
    curves = training_curves(out, res)
    table("During training: held-out rows of the training distribution, own mask (first -> last "
          "check); the inner loop over the last fifth of the steps",
          ["run", "sink mass", "engagement", "inner loss before -> after", "fast weights moved"],
          [[name, f"{c['sink'][0]:.3f} -> {c['sink'][-1]:.3f}",
            f"{c['engagement'][0]:.3f} -> {c['engagement'][-1]:.3f}", c["inner"], c["moved"]]
           for name, c in curves.items()])
    if "sweep" in res:
        table(*sweep_table(plan, res["sweep"]))
    table("The base while it learns (held-out books; _64: queries in their document's first 64 "
          "positions, as Gu et al. measure)",
          ["step", "sink mass", "sink rate", "sink mass _64", "sink rate _64"],
          [[str(r["step"]), f"{r['sink_mass']:.3f}", f"{r['sink_rate']:.2f}",
            f"{r['sink_mass_64']:.3f}", f"{r['sink_rate_64']:.2f}"] for r in res["base"]["curve"]])
    runs = {**{f"base/{k}": v for k, v in res["base"].items() if isinstance(v, dict)},
            **{f"sweep/{k}": v for k, v in res.get("sweep", {"runs": {}})["runs"].items()},
            **{k: v for k, v in res.get("arms", {}).items() if isinstance(v, dict)}}
    ratio = res.get("arms", {}).get("time_ratio", math.nan)
    table(f"Runs (FocuSFT / SFT median step time, each alone: {ratio:.2f}; * ran "
          "side by side with others, its times are shared)",
          ["run", "steps", "median ms", "wall s (of all tries)", "command"],
          [[name, str(r["steps"]), f"{r['median_ms']:.0f}{' *' if r.get('shared') else ''}",
            f"{r['wall_s']:.0f}" + (f" ({r['tries']} tries)" if r.get("tries", 1) > 1 else ""),
            f"`{r['command']}`"]
           for name, r in runs.items()])
    timed = [name for name in ev if "seconds" in ev[name]]   # (recorded since study_eval.py)
    if timed:
        def seconds(name: str) -> list[str]:
            e = ev[name]
            keys = [f"babilong {e['mask']}", f"stats {e['mask']}", "babilong causal",
                    "stats causal", "cwe", "all"]
            if e["mask"] == "causal":                    # one pass: under the own mask only
                keys[2:4] = ["-", "-"]
            return [f"{e['seconds'][k]:.0f}" if k in e["seconds"] else "-" for k in keys]
        table("Evaluations: seconds of each part (the first call at each shape compiles) and the "
              "graphs compiled", ["model", "BABILong, own mask", "statistics", "BABILong, causal",
                                  "statistics", "CWE", "all", "graphs", "command"],
              [[name, *seconds(name), str(ev[name].get("compiled_graphs", "-")),
                f"`{ev[name]['command']}`"] for name in timed])
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "results.md")
    figures(out, plan, res, curves, comparisons)


def markdown_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def sweep_table(plan, sweep: dict) -> tuple:
    """The inner loop's sweep as (title, header, rows). (A study recorded before the steps were
    swept ran 2 inner steps.)"""
    return (f"Inner learning rate and steps sweep ({plan.sweep_steps} FocuSFT steps each; "
            f"validation: held-out questions in held-out books); chosen {sweep['chosen']:g}, "
            f"{sweep.get('chosen_steps', 2)} steps",
            ["inner lr", "inner steps", "validation acc", "validation loss",
             "inner loss before -> after", "moved"],
            [[f"{r.get('inner_lr', key)}", str(r.get("inner_steps", 2)),
              f"{r['val_acc']:.3f} (n={r['val_n']})",
              "-" if r.get("val_loss") is None else f"{r['val_loss']:.4f}",
              f"{r['inner_before']:.3f} -> {r['inner_after']:.3f}", f"{r['moved']:.3g}"]
             for key, r in sweep["runs"].items()])


def paired_rows(comparisons: list, records, lengths: list, together: list,
                key: str = "correct") -> list[list[str]]:
    """A table's rows of paired differences: A - B ± its standard error at each length, then over
    the lengths `together`; records(name) -> that model's records."""
    return [[f"{a} - {b}", *[f"{d['diff']:+.2f} ± {d['se']:.2f}"
                             for n in [*([x] for x in lengths), together]
                             for d in [paired(records(a), records(b), n, key)]]]
            for a, b in comparisons]


def attention(stats: dict) -> str:
    return f"{stats['sink_mass']:.3f} / {stats['sink_rate']:.2f} / {stats['engagement']:.3f}"


def training_curves(out: Path, res: dict) -> dict:
    """Per arm: its held-out checks (sink mass, engagement), step losses, and the inner loop's last
    fifth."""
    curves = {}
    for name in [k for k in res.get("arms", {}) if "/" in k]:
        records = log_records(out / "arms" / arm_folder(name))
        checks = [r for r in records if "sink_mass" in r]
        steps = [r for r in records if "loss" in r]
        tail = [r for r in steps if r.get("inner")][-max(1, len(steps) // 5):]
        before, after = mean(r["inner"][0] for r in tail), mean(r["inner"][-1] for r in tail)
        curves[name] = {"step": [r["step"] for r in checks],
                        "sink": [r["sink_mass"] for r in checks],
                        "engagement": [r["engagement"] for r in checks],
                        "loss": [r["loss"] for r in steps],
                        "inner": f"{before:.3f} -> {after:.3f}" if tail else "-",
                        "moved": f"{mean(r['moved'] for r in tail):.3g}" if tail else "-"}
    return curves


def figures(out: Path, plan, res: dict, curves: dict, comparisons: list):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: figures skipped)")
        return
    ev, lengths = res.get("eval", {}), list(plan.eval_lengths)
    if curves:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for name, c in curves.items():
            axes[0].plot(c["loss"], lw=0.8, label=name)
            axes[1].plot(c["step"], c["sink"], marker=".", label=name)
            axes[2].plot(c["step"], c["engagement"], marker=".", label=name)
        titles = ("training loss", "sink mass (held-out rows)", "engagement (held-out rows)")
        for ax, title in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("step")
        axes[0].legend(fontsize=6)
        save(fig, out / "training.png")
    if not ev:                             # (a study cut short before any evaluation)
        return
    fig, axes = plt.subplots(1, len(ev), figsize=(2.2 * len(ev), 3), squeeze=False)
    for ax, (name, e) in zip(axes[0], ev.items()):
        grid = [[accuracy(e["records"][e["mask"]], n, t) for n in lengths] for t in TASKS]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths, fontsize=6)
        ax.set_yticks(range(len(TASKS)), TASKS, fontsize=6)
    save(fig, out / "heatmaps.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for a, b in comparisons:
        d = [paired(ev[a]["records"][ev[a]["mask"]], ev[b]["records"][ev[b]["mask"]], [n])
             for n in lengths]
        ax.errorbar(range(len(lengths)), [x["diff"] for x in d], yerr=[x["se"] for x in d],
                    capsize=3, marker="o", label=f"{a} - {b}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_ylabel("accuracy difference (± s.e.)")
    if comparisons:
        ax.legend(fontsize=7)
    save(fig, out / "focusft_minus_sft.png")
    if all("cwe" in e for e in ev.values()):
        cwe_lengths = list(plan.cwe_lengths)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, e in ev.items():
            scores = [cwe_score(e["cwe"]["records"], n) for n in cwe_lengths]
            ax.plot(range(len(cwe_lengths)), scores, marker="o", label=name)
        ax.set_xticks(range(len(cwe_lengths)), cwe_lengths)
        ax.set_ylim(0, 1)
        ax.set_ylabel("RULER CWE score (own mask)")
        ax.legend(fontsize=7)
        save(fig, out / "cwe.png")


def save(fig, path: Path):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path.with_suffix(".tmp.png"))
    os.replace(path.with_suffix(".tmp.png"), path)
    plt.close(fig)
