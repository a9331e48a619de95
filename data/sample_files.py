"""Benchmark sample files: a local folder in BABILong's layout, DIR/data/TASK/LEN.json, or the
benchmark itself on the hub, every row checked before an evaluation uses it.

eval_babilong.py reads its samples here (a folder --make-data wrote, or `--data hub`), and
eval_ruler.py its CWE samples (the same layout, a target that is a list of words). Two ideas to
hold:
  1. Both sources end in one check (`check_samples`): a sample is an object with the benchmark's
     FIELDS, each of its type, so a bad row reads the same whether it came from a file or from the
     hub; fields beyond those are dropped.
  2. Nothing here knows the command line. A problem is a ValueError (or, for the hub, RuntimeError)
     that names the file (or the hub's dataset, as the caller's user asked for it) and a bad
     sample by its index, where[i]; the script that asked turns it into its one-line refusal
     naming the flag.
"""
from data import babilong, books

HUB = "RMT-team/babilong"   # the benchmark on the HF hub: configs are lengths, splits are tasks
FIELDS = {"input": str, "question": str, "target": str}   # a BABILong sample, and its types
KINDS = {str: "a string", list: "a list"}                  # a type as an error names it


def read_hub_dataset(task: str, length: str, revision: str, asked_as: str) -> list[dict]:
    """The samples of a task at a length from HUB at a revision (a commit hash pins it), through
    `datasets`. Errors (a bad row, no `datasets`, no network) name the read "ASKED_AS (HUB
    LENGTH/TASK@REVISION)", asked_as being how the caller's user asked for the hub (e.g. a flag)."""
    where = f"{asked_as} ({HUB} {length}/{task}@{revision})"
    # a local folder as HUB (the tests) has no history: datasets takes revision there and ignores it
    rows = books.from_hub(where, lambda datasets: datasets.load_dataset(HUB, length, split=task,
                                                                        revision=revision))
    return check_samples(list(rows), where)


def read_local(root: str, task: str, length: str, fields: dict = FIELDS) -> list[dict]:
    """Samples from a local hub-layout folder; ValueError, naming the file, if they are not samples
    with these fields (check_samples)."""
    path = babilong.hub_path(root, task, length)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file of samples")
    try:
        rows = babilong.read_hub(root, task, length)
    except ValueError as e:   # not JSON (empty, cut short, another kind of file), not UTF-8
        raise ValueError(f"{path} is not a JSON file of samples "
                         f"({type(e).__name__}: {e})") from None
    return check_samples(rows, str(path), fields)


def check_samples(rows, where: str, fields: dict = FIELDS) -> list[dict]:
    """The samples, if they are what the benchmark's files hold: a list of objects with `fields` of
    their types (other keys are dropped); else ValueError naming `where` and the first bad sample by
    its index, where[i]."""
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a JSON list of samples, found a {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}[{i}]: a sample is an object with {', '.join(fields)}; "
                             f"found {row!r:.40}")
        bad = next((k for k in fields if not isinstance(row.get(k), fields[k])), None)
        if bad:   # None: the hub's rows have every column, null where a row had none
            raise ValueError(f"{where}[{i}]: "
                             + (f"no {bad!r}" if row.get(bad) is None else
                                f"{bad!r} must be {KINDS[fields[bad]]}; found {row[bad]!r:.40}"))
    return [{k: row[k] for k in fields} for row in rows]
