r"""BABILong samples built by the benchmark's public recipe: bAbI facts hidden, in order, in book
text.

BABILong (Kuratov et al. 2024; booydar/babilong, HF `RMT-team/babilong`) is the long-context test
FocuSFT reports on. A sample is `{"input", "question", "target"}`: `input` is a stretch of books
with the facts of one bAbI story (up to one of its questions) scattered through it, and the question
asks about those facts only. This file makes such samples at any length, from generated or real bAbI
stories (babi.py) and the books of one of three haystack sources (books.py): synthetic sentences
(books.py, offline), a folder of Project Gutenberg .txt books, or PG19 (streamed with `datasets`,
online only). It reads and writes the hub's layout, `data/{task}/{length}.json`.
Two ideas to hold:

1. A length is a token budget, counted in GPT-2 tokens: "Nk" is N*1000 minus `PROMPT_TOKENS` left
   for the prompt, and "0k" is the facts alone. Facts and haystack sentences are counted piece by
   piece, each encoded with a leading space; haystack fills what the facts leave, the last sentence
   cut to hit the budget, so the decoded `input` re-encodes to the budget give or take a few tokens
   at the joins.
2. The haystack is read, not shuffled: consecutive sentences from a random place in a random book
   (too-short sentences skipped), and each fact goes into a random gap between sentences (after the
   last one too), keeping the facts' order.

`python -m data.babilong --length 1k --haystack synthetic` prints one sample. All randomness comes
from the `random.Random` passed in (and, for the synthetic books and PG19's order, the haystack's
seed).
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import tiktoken

from data import books
from data.babi import TASKS, Turn, babi_file, make_story, read_babi
from data.packing import hide_facts, question_sample
from data.tokenizer import gpt2

# the hub's configs up to 128K
LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
PROMPT_TOKENS = 300  # room the benchmark leaves in each length for instruction, question and answer
TOKENS_PER_FACT = 8  # a story with more than budget/8 facts is skipped, as the benchmark does
MIN_SENTENCE_TOKENS = 10  # shorter haystack sentences ("CHAPTER I.", "Yes.") are skipped
MAX_SKIPPED = 10_000  # short sentences in a row before we decide a haystack has no usable text
STORY_TRIES = 1000  # skipped stories in a row before we decide no story of a task fits a length
# curriculum: share of the steps on the shortest length alone. From scratch, reading is learned on
# short samples (docs/learning.md); 1/5 of 4,000 steps taught one task
FIRST_STAGE = 0.5
# samples drawn for the room left in a training row before leaving the rest as padding
ROOM_TRIES = 10
HOLDOUT = 10  # 1 in 10 of all possible generated questions is for evaluation only (`held_out`)


def budget(length: str) -> int:
    """GPT-2 tokens of facts and haystack in a sample of this length: "1k" -> 700, "0k" -> 0 (facts
    alone)."""
    match = re.fullmatch(r"(\d+)k", length)
    if match is None:
        raise ValueError(f"bad length {length!r}: expected 'Nk' (N thousand GPT-2 tokens) such as "
                         f"{', '.join(LENGTHS)}")
    n = int(match.group(1))
    return 0 if n == 0 else n * 1000 - PROMPT_TOKENS


# ----------------------------------------------------------------------------- building a sample
def draw_haystack(enc: tiktoken.Encoding, rng: random.Random, hay: books.Library,
                  n_tokens: int) -> list[list[int]]:
    """Consecutive sentences from a random place in a random book, n_tokens tokens in all (the last
    one cut).

    Each sentence is encoded with a leading space; those under MIN_SENTENCE_TOKENS are skipped. When
    a book ends, reading goes on at the start of another random book.
    """
    book = hay[rng.randrange(len(hay))]
    i, out, skipped = rng.randrange(max(len(book), 1)), [], 0
    while n_tokens > 0:
        if i < len(book):
            ids, i = enc.encode_ordinary(" " + book[i]), i + 1
        else:  # the book ended (or was empty): go on at the start of another random book
            ids, book, i = [], hay[rng.randrange(len(hay))], 0
        if len(ids) < MIN_SENTENCE_TOKENS:
            skipped += 1
            if skipped > MAX_SKIPPED:
                raise ValueError(f"{hay!r} seems to hold no sentence of "
                                 f"{MIN_SENTENCE_TOKENS}+ tokens")
            continue
        out.append(ids[:n_tokens])
        n_tokens, skipped = n_tokens - len(out[-1]), 0
    return out


def build_sample(enc: tiktoken.Encoding, rng: random.Random, story: list[Turn], length: str,
                 hay: books.Library, k: int | None = None) -> dict | None:
    """One sample {"input", "question", "target"} of the story's question k (None: a random one), or
    None to skip it.

    The story is skipped if it has more than budget/TOKENS_PER_FACT facts up to that question (never
    at "0k"), or if its facts alone overflow the budget. The question keeps bAbI's trailing space,
    as on the hub.
    """
    total = budget(length)
    k = rng.randrange(len(story)) if k is None else k
    *facts, question = facts_and_question(story, k)
    question, target = question + " ", story[k][2]
    sample = {"input": " ".join(facts), "question": question, "target": target}
    if total == 0:
        return sample
    if len(facts) * TOKENS_PER_FACT > total:
        return None
    room = total - sum(len(enc.encode_ordinary(" " + fact)) for fact in facts)
    if room < 0:
        return None
    sentences = [enc.decode(ids).strip() for ids in draw_haystack(enc, rng, hay, room)]
    if not sentences:  # the facts fill the budget exactly
        return sample
    return {**sample, "input": " ".join(hide_facts(rng, sentences, facts)).strip()}


def facts_and_question(story: list[Turn], k: int) -> tuple[str, ...]:
    """What a sample of the story's question k asks from: the facts told up to it, then the
    question."""
    return (*[fact for facts, _, _ in story[:k + 1] for fact in facts], story[k][1].strip())


def question_key(story: list[Turn], k: int) -> tuple[str, ...]:
    """What makes two questions the same for holding out: the facts as a set (qa4 tells its two
    facts in either order, the same question either way), then the question."""
    *facts, question = facts_and_question(story, k)
    return (*sorted(facts), question)


def held_out(story: list[Turn], k: int) -> bool:
    """Whether a generated question is one of the 1 in HOLDOUT kept for evaluation, by a hash of its
    key: training (--data babilong) never draws one, evaluation sets draw only these. Needed because
    some tasks repeat themselves: qa4 (two facts) has only a few thousand different questions, which
    training would all see."""
    digest = hashlib.blake2b("\n".join(question_key(story, k)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % HOLDOUT == 0


def make_samples(enc: tiktoken.Encoding, rng: random.Random, task: str, length: str, n: int,
                 hay: books.Library, stories: list[list[Turn]] | None = None,
                 questions: Iterator[tuple[list[Turn], int]] | None = None,
                 split: str = "train") -> list[dict]:
    """n samples of a task: the (story, question index) pairs of `questions` in order when given
    (those too long for the length skipped), else a random question drawn at random from `stories`
    (real stories, whose file is the split), or of a story from babi.make_story, held out for
    evaluation or not as `split` says."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    out, misses = [], 0
    while len(out) < n:
        if questions is None and stories is not None:
            story, k = rng.choice(stories), None
        elif questions is None:
            story = make_story(task, rng)
            k = rng.randrange(len(story))
            if held_out(story, k) != (split == "eval"):
                continue
        elif (pair := next(questions, None)) is None:
            raise ValueError(f"{task} has only {len(out)} distinct questions that fit length "
                             f"{length}, not {n}")
        else:
            story, k = pair
        sample = build_sample(enc, rng, story, length, hay, k)
        if sample is not None:
            out.append(sample)
            misses = 0
        elif (misses := misses + 1) >= STORY_TRIES:
            raise ValueError(f"{STORY_TRIES} {task} stories in a row have too many facts for "
                             f"length {length}")
    return out


def distinct_questions(rng: random.Random, task: str, stories: list[list[Turn]] | None = None,
                       max_facts: int | None = None) -> Iterator[tuple[list[Turn], int]]:
    """(story, question index) pairs for an evaluation set, none twice and none with more than
    max_facts facts: every question of `stories` in a shuffled order, or generated stories with a
    random held-out question each (`held_out`), repeats passed over. With the same rng and a
    max_facts that every length allows, the lengths of a set ask the same questions in the same
    order (their accuracies then differ by the haystack alone)."""
    fits = lambda story, k: max_facts is None or len(facts_and_question(story, k)) - 1 <= max_facts
    if stories is not None:
        pairs = [(story, k) for story in stories for k in range(len(story)) if fits(story, k)]
        rng.shuffle(pairs)
        yield from pairs
        return
    seen, misses = set(), 0
    # draws in a row without a new question: the set is exhausted
    while misses < STORY_TRIES * HOLDOUT:
        story = make_story(task, rng)
        k = rng.randrange(len(story))
        key = question_key(story, k)
        if not (held_out(story, k) and fits(story, k)) or key in seen:
            misses += 1
            continue
        seen.add(key)
        misses = 0
        yield story, k


def training_source(source: str, seed: int, babi_dir: str | None, tasks: list[str]) -> tuple:
    """What training samples are drawn from: the haystack's books per split (books.split: held-out
    rows read books training never reads), and (with babi_dir) real bAbI stories per split and task:
    the train files for training, the test files for the held-out check (None: generated
    stories)."""
    library = books.haystack(source, seed)
    hay = {part: books.split(library, part) for part in ("train", "eval")}
    if babi_dir is None:
        return hay, None
    # the held-out check reads stories training never sees
    files = {"train": "train", "eval": "test"}
    stories = {split: {t: read_babi(babi_file(babi_dir, t, f)) for t in tasks}
               for split, f in files.items()}
    return hay, stories


def training_lengths(lengths: list[str], ctx: int, step: int | None = None,
                     steps: int = 1) -> list[str]:
    """The lengths whose whole budget fits a row of ctx tokens; with step (a curriculum), only those
    allowed so far: the shortest alone for the first FIRST_STAGE of the steps, then the others one
    at a time, shortest first, in equal stages (the last one arrives by the last step, however few
    the steps)."""
    fits = sorted((n for n in lengths if budget(n) + PROMPT_TOKENS <= ctx), key=budget)
    if step is None:
        return fits
    first = int(FIRST_STAGE * steps)
    if step < first:
        return fits[:1]
    return fits[:1 + math.ceil((step - first + 1) * (len(fits) - 1) / (steps - first))]


def training_sample(enc: tiktoken.Encoding, rng: random.Random, hay: books.Library,
                    tasks: list[str], lengths: list[str], room: int, stories: dict | None = None,
                    split: str = "train") -> tuple[list[int], list[int]] | None:
    """One sample as training tokens, (ids, loss_mask): the prompt in the format evaluation uses,
    then the answer and a newline as the response. The length is drawn from those whose whole budget
    (N*1000 tokens, prompt included) fits in `room`; None when none fits. `stories`: real bAbI
    stories per task; `split`: "eval" for the held-out rows of the training log (generated questions
    held out, see `held_out`)."""
    fits = training_lengths(lengths, room)
    # "0k" samples (facts alone) of long stories may not fit
    for _ in range(ROOM_TRIES if fits else 0):
        task = rng.choice(tasks)
        s = make_samples(enc, rng, task, rng.choice(fits), 1, hay,
                         stories[task] if stories else None, split=split)[0]
        ids, loss_mask = question_sample(enc, s["input"], s["question"], s["target"])
        if len(ids) <= room:
            return ids, loss_mask
    return None


# ----------------------------------------------------------------------------- the hub's layout
def hub_path(root: str | Path, task: str, length: str) -> Path:
    """Where the hub keeps a task at a length: root/data/{task}/{length}.json."""
    return Path(root) / "data" / task / f"{length}.json"


def write_hub(root: str | Path, task: str, length: str, samples: list[dict]) -> Path:
    """Write samples as the hub's JSON list; through a temp file and a rename, so no half file is
    ever seen."""
    path = hub_path(root, task, length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_hub(root: str | Path, task: str, length: str) -> list[dict]:
    """The samples of a task at a length, as write_hub (or the hub itself) left them."""
    path = hub_path(root, task, length)
    if not path.is_file():
        raise FileNotFoundError(f"no sample file {path} (task {task}, length {length})")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print one BABILong sample built by the public recipe.")
    p.add_argument("--task", default="qa1", choices=TASKS, help="bAbI task of the story")
    p.add_argument("--length", default="1k",
                   help="budget: 0k, 1k, 2k, ... (N thousand GPT-2 tokens)")
    p.add_argument("--haystack", default="synthetic",
                   help="synthetic, pg19 or a folder of .txt books")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the stories, the haystack and the sample")
    args = p.parse_args(argv)
    enc, rng = gpt2(), random.Random(args.seed)
    try:
        sample = make_samples(enc, rng, args.task, args.length, 1,
                              books.haystack(args.haystack, args.seed))[0]
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"babilong.py: error: {e}")
    print(sample["input"], f"\nQuestion: {sample['question']}\nTarget: {sample['target']}",
          f"\n({len(enc.encode_ordinary(sample['input']))} tokens; budget {budget(args.length)})")


if __name__ == "__main__":
    main()
