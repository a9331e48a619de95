"""The hub paths (PG19 books, BABILong samples) run through the real `datasets` on small local
datasets.

Run from the repository root (offline; skipped where `datasets` is not installed):

    python -m pytest -q tests/test_hub.py

Each test writes a dataset in tmp_path in the shape of the hub's (PG19: one file per split with a
`text` column; BABILong: configs named by length, splits by task, declared in a README.md header)
and points the module constant (books.PG19, data.sample_files.HUB) at the folder: `load_dataset`
reads a local folder where it would read a hub id, so all of this repository's code on those paths
runs as it does online; only where `datasets` finds the files differs. conftest.py sets the Hugging
Face offline variables: nothing here can reach the network.
"""
import json
import pickle
import time

import pytest

datasets = pytest.importorskip("datasets")

import eval_babilong as ev  # noqa: E402
from data import babilong, books, sample_files

PG19_COLUMNS = {"short_book_title": "A Book", "publication_date": 1900,
                "url": "https://www.gutenberg.org/"}
SPLIT_SIZES = {"train": 14, "validation": 5, "test": 12}


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """A non-streaming load writes Arrow files to the datasets cache: keep them out of the home
    folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def book_text(split: str, i: int) -> str:
    """A book with line breaks, quotes and a tail without a full stop, so the sentence split has
    work to do."""
    return (f"CHAPTER I.\n\nThis is book {i} of the {split} split, a quiet story.  "
            "\"Who is there?\" asked the\n"
            f"keeper of book {i}! Nobody answered; the house was still.\n\nThe end of book {i}")


@pytest.fixture
def pg19(tmp_path, monkeypatch):
    """A local PG19: {split}.jsonl per split, PG19's four columns; books.PG19 points at it. Returns
    its texts."""
    folder, texts = tmp_path / "pg19", {}
    for split, n in SPLIT_SIZES.items():
        texts[split] = [book_text(split, i) for i in range(n)]
        write_jsonl(folder / f"{split}.jsonl", [{**PG19_COLUMNS, "text": t} for t in texts[split]])
    monkeypatch.setattr(books, "PG19", str(folder))
    return texts


def texts_of(hay: books.Library) -> list[str]:
    """The texts a library's books were split from, whitespace made single spaces (as
    split_sentences does)."""
    return [" ".join(book) for book in hay]


def flat(texts: list[str]) -> list[str]:
    return [" ".join(t.split()) for t in texts]


def test_pg19_books_are_the_asked_splits_texts_in_a_seeded_order(pg19, monkeypatch):
    """`--haystack pg19[:SPLIT]`: the books are the texts of that split, all of them when it holds
    fewer than PG19_BOOKS, else PG19_BOOKS of them; the same seed gives the same order, another seed
    another."""
    assert max(SPLIT_SIZES.values()) < books.PG19_BOOKS  # every split here is "smaller"
    got = {split: texts_of(books.pg19_books(seed=1, split=split)) for split in SPLIT_SIZES}
    for split in SPLIT_SIZES:
        # that split's books, each once
        assert sorted(got[split]) == sorted(flat(pg19[split])), split
    assert texts_of(books.haystack("pg19", seed=1)) == got["test"]  # the default split: test
    assert texts_of(books.haystack("pg19:validation", seed=1)) == got["validation"]
    again, other = texts_of(books.pg19_books(1, "train")), texts_of(books.pg19_books(2, "train"))
    assert again == got["train"] and other != got["train"] and sorted(other) == sorted(got["train"])
    assert got["train"] != flat(pg19["train"])  # shuffled, not the file's order

    monkeypatch.setattr(books, "PG19_BOOKS", 4)  # a split larger than PG19_BOOKS
    some = texts_of(books.pg19_books(seed=1, split="train"))
    assert len(some) == len(set(some)) == 4 and set(some) <= set(got["train"])


def test_pg19_books_split_into_sentences_as_a_folder_of_txt_books(pg19, tmp_path):
    """PG19's books have the sentences that the same texts give as .txt books in a folder (no
    Gutenberg header here: PG19's texts have theirs removed), written out by hand for one; the
    library pickles (DataLoader workers get a copy, not a download)."""
    hay = books.haystack("pg19:validation", seed=3)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(pg19["validation"]):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    assert (sorted(hay) == sorted(books.folder_books(folder))
            and len(hay) == SPLIT_SIZES["validation"])
    assert ["CHAPTER I.", "This is book 3 of the validation split, a quiet story.",
            '"Who is there?"', "asked the keeper of book 3!",
            "Nobody answered; the house was still.", "The end of book 3"] in hay
    assert pickle.loads(pickle.dumps(hay))[2] == hay[2]


def babilong_rows(length: str, task: str) -> list[dict]:
    return [{"input": f"Mary went to the garden. ({length} {task} sample {i})",
             "question": "Where is Mary? ", "target": "garden"} for i in range(3)]


def write_babilong(folder, rows: dict) -> None:
    """A local BABILong: {length}/{task}.jsonl, declared in README.md's header as config = length,
    split = task, as the hub's dataset card declares its configs."""
    card = ["---", "configs:"]
    for length in sorted({length for length, _ in rows}):
        card += [f"- config_name: {length}", "  data_files:"]
        for (n, task), samples in rows.items():
            if n == length:
                card += [f"  - split: {task}", f"    path: {length}/{task}.jsonl"]
                write_jsonl(folder / length / f"{task}.jsonl", samples)
    (folder / "README.md").write_text("\n".join(card + ["---", ""]), encoding="utf-8")


def test_babilong_hub_samples_are_read_by_length_and_task(tmp_path, monkeypatch):
    """`--data hub`: config = length and split = task pick the samples written there, in their
    order. A local folder has no revisions: datasets takes revision= and ignores it (a name that
    exists nowhere reads too)."""
    rows = {(n, t): babilong_rows(n, t) for n in ("0k", "1k") for t in ("qa1", "qa2")}
    write_babilong(tmp_path / "babilong", rows)
    monkeypatch.setattr(sample_files, "HUB", str(tmp_path / "babilong"))
    for (length, task), samples in rows.items():
        assert ev.read_samples("hub", task, length, "main") == samples, (length, task)
    assert ev.read_samples("hub", "qa2", "1k", "no-such-revision") == rows["1k", "qa2"]


def test_a_malformed_hub_row_is_named_as_in_a_local_file(tmp_path, monkeypatch):
    """A sample without `question` is refused in one line naming its index, in the words a local
    file's gets (the hub's rows are Arrow records: a field missing from one row comes back as
    None)."""
    rows = babilong_rows("1k", "qa1")
    del rows[1]["question"]
    write_babilong(tmp_path / "babilong", {("1k", "qa1"): rows})
    babilong.write_hub(tmp_path / "local", "qa1", "1k", rows)
    monkeypatch.setattr(sample_files, "HUB", str(tmp_path / "babilong"))
    errors = []
    for source in ("hub", str(tmp_path / "local")):
        with pytest.raises(ValueError) as e:
            ev.read_samples(source, "qa1", "1k", "main")
        errors.append(str(e.value))
    assert errors[0].startswith(f"--data hub ({sample_files.HUB} 1k/qa1@main)[1]: ")
    assert errors[1] == f"{babilong.hub_path(tmp_path / 'local', 'qa1', '1k')}[1]: no 'question'"
    assert errors[0].partition("[1]: ")[2] == "no 'question'" and "\n" not in errors[0]


def test_the_real_hub_offline_is_one_line_at_once():
    """With the offline variables set (conftest.py) and the real hub ids, PG19 and `--data hub` fail
    in one RuntimeError line, with no chained traceback, in well under the network timeout of
    huggingface_hub: the offline check comes before any connection is tried."""
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: this run may reach the hub")
    from huggingface_hub import constants
    for hub_id, read in ((books.PG19, lambda: books.pg19_books(seed=0)),
                         (sample_files.HUB, lambda: ev.read_samples("hub", "qa1", "1k", "main"))):
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError) as e:
            read()
        assert time.perf_counter() - t0 < constants.HF_HUB_ETAG_TIMEOUT / 2, hub_id
        message = str(e.value)
        assert "\n" not in message and hub_id in message and "needs the network" in message, message
        assert e.value.__cause__ is None and e.value.__suppress_context__  # `raise ... from None`
