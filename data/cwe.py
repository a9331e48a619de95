"""RULER's common-words extraction (CWE): a numbered list of words in which a few words come up far
more often than the rest; the answer is those few.

RULER (Hsieh et al. 2024; NVIDIA/RULER, `scripts/data/synthetic/common_words_extraction.py`) uses
this task to test aggregation: no one place of the list holds the answer, every entry counts, so a
model must spread its attention over the whole context, the opposite of BABILong's single needle.
FocuSFT reports it (72.9 -> 81.1 % at 16K). A sample is `{"input", "question", "target"}` as
BABILong's are, `target` being the list of the NUM_CW words in the order they first appear; files
use BABILong's layout, `data/cwe/{length}.json` (babilong.write_hub). Two ideas to hold:

1. RULER's recipe: NUM_CW words appear FREQ[0] times each, every other word FREQ[1] times
   (SHORT_FREQ below SHORT_BELOW tokens, as RULER), all shuffled and numbered "1. word 2. word".
   Words are drawn without repeats from RULER's source, the noun, adjective and verb lists of the
   `wonderwords` package, and added one at a time until the prompt fills its budget.
2. A length is RULER's: "Nk" is N*1024 GPT-2 tokens for the whole sequence, the prompt in the
   training format (packing.prompt_ids) plus GENERATE tokens left for the answer. The prompt is
   counted piece by piece: every entry " 12. word" starts at a space, so it encodes to the same
   tokens alone as inside the list, and filling the budget is one pass (a test checks the count).

`python -m data.cwe --length 4k` prints one sample. All randomness comes from the `random.Random`
passed in.
"""
import argparse
import functools
import importlib.util
import random
import re
from importlib import resources

import tiktoken

from data import packing
from data.tokenizer import gpt2

NUM_CW = 10          # RULER's num_cw: the common words, the answer
FREQ = (30, 3)       # RULER's freq_cw, freq_ucw: times each common / each other word appears
SHORT_FREQ = (6, 1)  # RULER's for sequences shorter than SHORT_BELOW tokens
SHORT_BELOW = 4096
GENERATE = 120       # RULER's tokens_to_generate for CWE: part of each length, left for the answer
# 128k would need more words than the lists hold
LENGTHS = ("1k", "2k", "4k", "8k", "16k", "32k", "64k")
TASK = "cwe"         # the files' folder in BABILong's layout: DIR/data/cwe/LEN.json
WORD_FILES = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")  # wonderwords' assets, as RULER
INSTALL = "pip install wonderwords==3.0.1"
INSTRUCTION = ("What follows is a numbered list of words. Some of the words come up much more "
               "often than the others: keep count of those.")
QUESTION = f"Which {NUM_CW} words come up most often in the list above?"
ROOM_TRIES = 10      # samples drawn for the room left in a training row before leaving it padding


@functools.cache
def word_pool() -> tuple[str, ...]:
    """RULER's words: wonderwords' nouns, adjectives and verbs, sorted, without repeats. Two that
    differ only in case ("Early", "early") are one word to a case-insensitive scorer, so only the
    lower-case one is kept. RuntimeError, saying what to install, without the package."""
    if importlib.util.find_spec("wonderwords") is None:
        raise RuntimeError(f"RULER's word lists come from the wonderwords package: {INSTALL}")
    assets = resources.files("wonderwords") / "assets"
    words = {w.strip() for name in WORD_FILES
             for w in (assets / name).read_text(encoding="utf-8").splitlines() if w.strip()}
    kept = {}
    for word in sorted(words, key=lambda w: (w.lower(), w != w.lower())):   # lower case first
        kept.setdefault(word.lower(), word)
    return tuple(sorted(kept.values()))


def makes(length: str) -> bool:
    """Whether `length` is one CWE can be made at: "Nk" with N >= 1."""
    match = re.fullmatch(r"(\d+)k", length)
    return match is not None and int(match.group(1)) > 0


def tokens(length: str) -> int:
    """The whole sequence of a length, RULER's way: "4k" -> 4096 GPT-2 tokens."""
    if not makes(length):
        raise ValueError(f"bad CWE length {length!r}: expected 'Nk' with N >= 1 (N*1024 GPT-2 "
                         f"tokens), such as {', '.join(LENGTHS)}")
    return int(length[:-1]) * 1024


def budget(length: str) -> int:
    """The prompt's tokens at most: the length less GENERATE for the answer."""
    return tokens(length) - GENERATE


def frequencies(length: str) -> tuple[int, int]:
    """(appearances of each common word, of each other word) at this length, as RULER chooses."""
    return SHORT_FREQ if tokens(length) < SHORT_BELOW else FREQ


@functools.cache
def piece_tokens(enc: tiktoken.Encoding, piece: str) -> int:
    return len(enc.encode_ordinary(piece))


def number_tokens(enc: tiktoken.Encoding, i: int) -> int:
    """Tokens of entry i's number: "1." opens the list's line, " 12." follows a word."""
    return piece_tokens(enc, f"{'' if i == 1 else ' '}{i}.")


def numbered(entries: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(entries, 1))


def make_sample(enc: tiktoken.Encoding, rng: random.Random, length: str) -> dict:
    """One sample: the common words and then other words, drawn without repeats, each other word
    added (FREQ[1] entries) while the prompt stays within budget(length); then all entries shuffled.
    ValueError if the common words alone overflow the budget, or the words run out before it is
    full."""
    common_times, other_times = frequencies(length)
    words = rng.sample(word_pool(), len(word_pool()))
    common, others = words[:NUM_CW], words[NUM_CW:]
    # the prompt around the list: " {INSTRUCTION}\n" before it, the question after it
    room = (budget(length) - piece_tokens(enc, f" {INSTRUCTION}\n")
            - piece_tokens(enc, packing.QUESTION.format(QUESTION)))
    used = sum(common_times * piece_tokens(enc, " " + w) for w in common)
    used += sum(number_tokens(enc, i) for i in range(1, NUM_CW * common_times + 1))
    if used > room:
        raise ValueError(f"CWE length {length} is too short for {NUM_CW} words {common_times} "
                         "times each")
    n, kept = NUM_CW * common_times, 0
    for word in others:
        cost = other_times * piece_tokens(enc, " " + word) + sum(
            number_tokens(enc, i) for i in range(n + 1, n + other_times + 1))
        if used + cost > room:
            break
        used, n, kept = used + cost, n + other_times, kept + 1
    else:
        raise ValueError(f"the {len(words)} words run out before CWE length {length} is full")
    entries = common * common_times + others[:kept] * other_times
    rng.shuffle(entries)
    first_seen = [w for w in dict.fromkeys(entries) if w in common]
    return {"input": f"{INSTRUCTION}\n{numbered(entries)}", "question": QUESTION,
            "target": first_seen}


def make_samples(enc: tiktoken.Encoding, rng: random.Random, length: str, n: int) -> list[dict]:
    return [make_sample(enc, rng, length) for _ in range(n)]


def answer_text(targets: list[str]) -> str:
    """The answer a model is trained to give: the words, comma-separated."""
    return ", ".join(targets)


def training_sample(enc: tiktoken.Encoding, rng: random.Random, lengths: list[str],
                    room: int) -> tuple[list[int], list[int]] | None:
    """One sample as training tokens, (ids, loss_mask): the prompt in the format evaluation uses,
    then the answer and a newline as the response. The length is drawn from those CWE can be made
    at whose prompt fits in `room`; None when none fits."""
    fits = [n for n in lengths if makes(n) and budget(n) < room]
    for _ in range(ROOM_TRIES if fits else 0):
        s = make_sample(enc, rng, rng.choice(fits))
        ids, loss_mask = packing.question_sample(enc, s["input"], s["question"],
                                                 answer_text(s["target"]))
        if len(ids) <= room:
            return ids, loss_mask
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print one CWE sample built by RULER's recipe.")
    p.add_argument("--length", default="1k", help="N*1024 GPT-2 tokens with the answer's room")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    args = p.parse_args(argv)
    enc = gpt2()
    try:
        sample = make_sample(enc, random.Random(args.seed), args.length)
    except (ValueError, RuntimeError) as e:
        p.exit(2, f"cwe.py: error: {e}\n")
    print(sample["input"][:600], "...", f"\nQuestion: {sample['question']}",
          f"\nTarget: {answer_text(sample['target'])}\n"
          f"({len(packing.prompt_ids(enc, sample['input'], sample['question']))} prompt tokens; "
          f"budget {budget(args.length)})")


if __name__ == "__main__":
    main()
