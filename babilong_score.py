"""BABILong's scoring rule, as the benchmark's own code applies it, and a baseline that does not
read.

    python eval_babilong.py --score outputs.csv --tasks qa1    # the rule on a CSV of outputs

The answers of a bAbI task come from a short list of labels (rooms, or qa5's people and objects:
TASK_LABELS), and the benchmark (booydar/babilong, babilong/metrics.py) scores an output by which
of them it names. Two ideas to hold:
  1. The rule is the official one, quirks included (`is_correct`): keep the output's first
     sentence (before the first '.'), lower-cased, cut at '<context>' / '<example>' (the official
     code also cuts at 'Question', which never matches after lower-casing); drop the task's labels
     that the question names; correct iff the target is the only label of the task left in it. A
     label counts as a substring ("office" in "officers"), as there.
  2. An accuracy means little without the score of a model that does not read (`last_mentioned`):
     echoing the label named last in the story's facts is right on some samples without reading
     them, so eval_babilong.py also reports accuracy on the samples where that echo is wrong.
"""
import csv
import re

from data import babi

ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
TASK_LABELS = {"qa1": ROOMS, "qa2": ROOMS, "qa3": ROOMS, "qa4": ROOMS,
               "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk")}
# the official cut list; 'Question' is kept though inert
CUT_AT = ("<context>", "<example>", "Question")


def first_sentence(output: str) -> str:
    text = output.lower().split(".")[0]
    for marker in CUT_AT:
        text = text.split(marker)[0]
    return text


def is_correct(target: str, output: str, question: str, task: str) -> bool:
    """BABILong's rule: the target must be the only label of the task named in the output's first
    sentence, not counting labels that the question names."""
    if task not in TASK_LABELS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_LABELS)}")
    labels = {label.lower() for label in TASK_LABELS[task]}
    named = {label for label in labels if label in first_sentence(output)}
    named -= {label for label in labels if label in question.lower()}
    return named == {target.lower()}


def last_mentioned(sample: dict, task: str) -> str:
    """A baseline that does not read: the task's label named last in the context's bAbI facts (not
    in the haystack prose, which may name rooms and people too), leaving out those the question
    names ("" if none). A model at this accuracy may only have learned to answer with a recent
    word."""
    labels = ({label.lower() for label in TASK_LABELS[task]}
              - set(re.findall(r"[a-z]+", sample["question"].lower())))
    words = re.findall(r"[a-z]+", " ".join(babi.fact_sentences(sample["input"])).lower())
    return next((w for w in reversed(words) if w in labels), "")


def score_file(path: str, task: str) -> tuple[int, int]:
    """(correct, total) over a CSV of model outputs with columns target, output, question."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    missing = {"target", "output", "question"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    short = next((i for i, r in enumerate(rows, 1)
                  if None in (r["target"], r["output"], r["question"])), None)
    if short:
        raise ValueError(f"{path}: row {short} has fewer fields than the header")
    return sum(is_correct(r["target"], r["output"], r["question"], task) for r in rows), len(rows)
