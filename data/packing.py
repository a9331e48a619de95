r"""Training data for focusft: bAbI-like stories hidden in a synthetic haystack, packed into rows.

BABILong's recipe (a bAbI story whose facts are scattered, in order, through unrelated prose) made
offline and multi-turn, so that the FocuSFT mask has turns to work with. Two ideas to hold:

1. A sample is a sequence of turns: a *context run* (haystack with this turn's facts hidden in it,
   then "\nQuestion: ...\nAnswer:"), then a *response run* (" answer" and a newline). `loss_mask` is
   1 exactly on response tokens; masks.py reads the turns from it. There is no header; a 2-turn
   sample decodes as " The weary clerk ... Mary moved to the bathroom. ...\nQuestion: Where is
   Mary?\nAnswer: bathroom\n The tailor ...\nQuestion: Where is Daniel?\nAnswer: hallway\n". Each
   piece (sentence, fact, question, answer) is encoded on its own, so a sample is exactly the
   concatenation of its pieces' tokens.
2. A row of `ctx` tokens packs several samples (documents); `document_ids` and `pos` say where each
   begins, and no target crosses a document. All randomness comes from the `random.Random` passed
   in.

Stories come from babi.py's simulation of bAbI qa1-qa5, so every answer follows from the story so
far; the haystack is read from books by babilong.draw_haystack (books.py's synthetic prose by
default).
"""
import math
import random
from collections.abc import Callable

import tiktoken
import torch

from data.babi import Turn, make_story
from data.tokenizer import BOS_ID, NEWLINE, PAD_ID
from model import IGNORE

# A haystack reader: draw(rng, n) -> consecutive haystack sentences as token lists, n tokens in all
# (the last one cut). babilong.draw_haystack over a library of books is the one the training data
# uses.
Draw = Callable[[random.Random, int], list[list[int]]]

# ------------------------------------------------------------------------- samples and packed rows

QUESTION = "\nQuestion: {}\nAnswer:"  # ends a context run; the response " answer\n" follows


def answer_ids(enc: tiktoken.Encoding, answer: str) -> list[int]:
    """A response run: the answer after a space, then the newline that ends it (generation stops
    there)."""
    return enc.encode_ordinary(" " + answer) + [NEWLINE]


def prompt_ids(enc: tiktoken.Encoding, context: str, question: str) -> list[int]:
    """A one-question prompt in the training format (the evaluation of BABILong text uses it
    too)."""
    return (enc.encode_ordinary(" " + context.strip())
            + enc.encode_ordinary(QUESTION.format(question.strip())))


def question_sample(enc: tiktoken.Encoding, context: str, question: str,
                    answer: str) -> tuple[list[int], list[int]]:
    """A one-question sample as training tokens, (ids, loss_mask): the prompt (prompt_ids), then the
    answer (answer_ids) as the response."""
    prompt, response = prompt_ids(enc, context, question), answer_ids(enc, answer)
    return prompt + response, [0] * len(prompt) + [1] * len(response)
STORY_TRIES = 10  # stories drawn before deciding n_tokens cannot hold even one turn of this task
# --min-len's floor: holds a turn of almost every story (qa3, qa5 can fail below it)
MIN_SAMPLE_TOKENS = 128
# sft: predict response tokens only; lm: predict every next token of a document
OBJECTIVES = ("sft", "lm")


def hide_facts(rng: random.Random, sentences: list, facts: list) -> list:
    """Facts in order, each at a random one of the len(sentences) + 1 gaps: in front of a haystack
    sentence or after the last one (BABILong's placement rule; several facts may share a gap)."""
    slots = sorted(rng.randrange(len(sentences) + 1) for _ in facts)
    out, j = [], 0
    for i, sentence in enumerate(sentences):
        while j < len(facts) and slots[j] == i:  # fact j goes in front of sentence slots[j]
            out.append(facts[j])
            j += 1
        out.append(sentence)
    return out + facts[j:]


def sample_from_story(enc: tiktoken.Encoding, rng: random.Random, story: list[Turn], n_tokens: int,
                      draw: Draw) -> tuple[list[int], list[int]] | None:
    """Hide the story's facts in haystack: exactly n_tokens tokens, or None if not even one turn
    fits.

    Later turns are dropped until the facts, questions and answers fit; the haystack left over is
    split evenly over the turns, and each fact goes into a random gap between its turn's haystack
    sentences (after the last one too), in order.
    """
    turns = [([enc.encode_ordinary(" " + f) for f in facts],
               enc.encode_ordinary(QUESTION.format(question)), answer_ids(enc, answer))
             for facts, question, answer in story]
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
    """(ids, loss_mask) of one multi-turn sample of `task`, n_tokens long (see
    sample_from_story)."""
    for _ in range(STORY_TRIES):
        sample = sample_from_story(enc, rng, make_story(task, rng), n_tokens, draw)
        if sample is not None:
            return sample
    raise ValueError(f"n_tokens={n_tokens} is too small to hold one turn of a {task} story")


def pack_batch(enc: tiktoken.Encoding, rng: random.Random, draw: Draw, batch_size: int, ctx: int,
               tasks: list[str], min_len: int, max_len: int, objective: str = "sft",
               max_docs: int = 0, bos: bool = False) -> dict[str, torch.Tensor]:
    """Rows of multi-turn samples (build_sample) of log-uniform length in [min_len, max_len]; see
    pack_rows. min_len >= MIN_SAMPLE_TOKENS holds a turn of almost every story; below that, qa3 and
    qa5 samples can fail."""
    if not 0 < min_len <= max_len:
        raise ValueError(f"need 0 < min_len <= max_len, got {min_len=} {max_len=}")

    def sample(room: int):
        if room < min_len:
            return None
        n = round(math.exp(rng.uniform(math.log(min_len), math.log(min(max_len, room)))))
        return build_sample(enc, rng, rng.choice(tasks), min(max(n, min_len), room), draw)
    return pack_rows(sample, batch_size, ctx, objective, max_docs, bos)


def book_document(rng: random.Random, draw: Draw, room: int, min_len: int, max_len: int):
    """--data books: (ids, loss_mask) of consecutive book text, log-uniform in [min_len, max_len]
    tokens (at most `room`), all context (the lm objective predicts every next token); None when not
    even min_len fits."""
    if room < min_len:
        return None
    n = round(math.exp(rng.uniform(math.log(min_len), math.log(min(max_len, room)))))
    ids = [t for sentence in draw(rng, min(max(n, min_len), room)) for t in sentence]
    return ids, [0] * len(ids)


def pack_rows(sample, batch_size: int, ctx: int, objective: str = "sft", max_docs: int = 0,
              bos: bool = False) -> dict[str, torch.Tensor]:
    """Fill batch_size rows of ctx tokens with sample(room) -> (ids, loss_mask) of at most `room`
    tokens, until it returns None or the row holds max_docs samples (0: no limit); the rest of the
    row is padding. With `bos`, every sample opens with BOS_ID (a context token).

    Returns (B, ctx) tensors: idx, loss_mask, document_ids (0, 1, ... per row; -1 on padding),
    attention_mask (False on padding), pos (position within its document; 0 on padding) and targets
    (idx shifted left where the next token is in the same document, and a response token for "sft";
    -100 elsewhere)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: "
                         f"expected one of {', '.join(OBJECTIVES)}")
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
    return {"idx": idx, "loss_mask": loss_mask, "document_ids": document_ids,
            "attention_mask": document_ids >= 0, "pos": pos,
            "targets": next_token_targets(idx, document_ids, wanted)}


def context_targets(batch: dict) -> torch.Tensor:
    """FocuSFT's "context" inner loss (B, S): every token followed by a context token of its
    document predicts that token."""
    return next_token_targets(batch["idx"], batch["document_ids"], batch["loss_mask"] == 0)


def next_token_targets(idx: torch.Tensor, document_ids: torch.Tensor,
                       wanted: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = idx[b, t+1] where token t+1 is wanted, not padding and in t's document; else
    -100."""
    keep = ((document_ids[:, 1:] == document_ids[:, :-1]) & (document_ids[:, 1:] >= 0)
            & wanted[:, 1:])
    targets = torch.full_like(idx, IGNORE)
    targets[:, :-1] = torch.where(keep, idx[:, 1:], IGNORE)
    return targets
