"""RULER CWE: samples by RULER's recipe (counted independently from the text), the prompt within its
length's budget, RULER's scorer on hand cases, CWE training rows, and eval_ruler.py end to end.

Run: python -m pytest -q tests/test_ruler.py
"""
import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, tiny_config, write_checkpoint

import eval_ruler
from data import batches, cwe, packing, tokenizer
from model import GPT


@pytest.fixture(scope="module")
def enc():
    return tokenizer.gpt2()


def entries(sample: dict) -> list[str]:
    """The list's words in order, read back from the text: "1. a 2. b" -> ["a", "b"], checking the
    numbers run 1, 2, 3, ..."""
    head, listed = sample["input"].split("\n")
    assert head == cwe.INSTRUCTION
    parts = re.split(r"(?:^| )(\d+)\. ", listed)                   # ["", "1", "a", "2", "b", ...]
    assert parts[0] == "" and [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


@pytest.mark.parametrize("length,seed", [("1k", 0), ("2k", 1), ("4k", 2), ("8k", 3)])
def test_the_targets_are_the_most_frequent_words_with_rulers_counts(enc, length, seed):
    """Every target appears FREQ[0] times (SHORT_FREQ below 4K), every other word FREQ[1] times,
    no word twice in another case; the targets are in the order they first appear."""
    sample = cwe.make_sample(enc, random.Random(seed), length)
    words = entries(sample)
    counts = Counter(words)
    common, other = (6, 1) if length in ("1k", "2k") else (30, 3)
    assert len(sample["target"]) == 10 and set(sample["target"]) == {
        w for w, _ in counts.most_common(10)}
    assert {counts[w] for w in sample["target"]} == {common}
    assert {c for w, c in counts.items() if w not in sample["target"]} == {other}
    assert len(counts) > 10 + 50 and len({w.lower() for w in counts}) == len(counts)
    assert sample["target"] == sorted(sample["target"], key=words.index)
    assert sample["question"] == cwe.QUESTION


@pytest.mark.parametrize("length", ["1k", "2k", "4k", "8k", "16k", "32k"])
def test_the_prompt_fills_its_lengths_budget(enc, length):
    """The prompt in the training format is within budget(length) and short of it by less than one
    more word's entries; prompt, BOS and answer fit the length's N*1024 tokens."""
    rng = random.Random(length)
    for _ in range(2):
        sample = cwe.make_sample(enc, rng, length)
        prompt = packing.prompt_ids(enc, sample["input"], sample["question"])
        assert cwe.budget(length) - 40 < len(prompt) <= cwe.budget(length)
        answer = packing.answer_ids(enc, cwe.answer_text(sample["target"]))
        assert 1 + len(prompt) + len(answer) <= int(length[:-1]) * 1024


def test_lengths_and_frequencies_are_rulers():
    assert (cwe.tokens("4k"), cwe.budget("4k"), cwe.tokens("32k")) == (4096, 3976, 32768)
    assert cwe.frequencies("2k") == (6, 1) and cwe.frequencies("4k") == (30, 3)
    assert cwe.makes("1k") and not cwe.makes("0k") and not cwe.makes("4K")
    for bad in ("0k", "4K", "4000"):
        with pytest.raises(ValueError, match="bad CWE length"):
            cwe.tokens(bad)
    with pytest.raises(ValueError, match="run out"):              # more words than the lists hold
        cwe.make_sample(tokenizer.gpt2(), random.Random(0), "128k")


def test_the_words_are_wonderwords_nouns_adjectives_and_verbs(monkeypatch):
    pool = cwe.word_pool()
    assert {"aardvark", "quizzical", "accept", "early"} <= set(pool) and "Early" not in pool
    assert len(pool) > 8000 and len({w.lower() for w in pool}) == len(pool)
    cwe.word_pool.cache_clear()
    monkeypatch.setattr(cwe.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(RuntimeError, match="pip install wonderwords"):
            cwe.word_pool()
    finally:
        cwe.word_pool.cache_clear()


@pytest.mark.parametrize("output,want", [
    ("apple, pear, plum, fig, kiwi, lime, date, yam, leek, kale", 1.0),
    ("KALE Leek yam date lime kiwi fig plum pear apple", 1.0),       # any case, any order
    ("apple, pear and plum", 0.3),
    ("", 0.0),
    ("pineapple", 0.1),                                             # inside a longer word: RULER's
    ("apple apple apple", 0.1),                                     # a word counts once
])
def test_score_is_rulers_string_match_all(output, want):
    targets = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yam", "leek", "kale"]
    assert eval_ruler.score(output, targets) == pytest.approx(want)


def test_training_samples_and_mixed_rows(enc):
    """A CWE training sample is the evaluation prompt, then " w1, ..., w10\\n" as the response;
    none fits a room below its shortest length. Rows of --data babilong+cwe hold both kinds."""
    ids, loss_mask = cwe.training_sample(enc, random.Random(0), ["0k", "1k"], 1023)
    answer = enc.decode([t for t, m in zip(ids, loss_mask) if m])
    words = answer.strip().split(", ")
    assert answer.endswith("\n") and len(words) == 10 and len(ids) <= 1023
    assert enc.decode(ids).startswith(" " + cwe.INSTRUCTION)
    assert cwe.training_sample(enc, random.Random(0), ["1k"], 900) is None
    assert cwe.training_sample(enc, random.Random(0), ["0k"], 5000) is None
    cfg = batches.DataConfig(data="babilong+cwe", objective="sft", tasks=("qa1",),
                             lengths=("0k", "1k"), curriculum=False, haystack="synthetic",
                             babi_dir=None, min_len=0, max_len=0, max_docs=0, bos=False, ctx=1200,
                             rows=6, grad_accum=1, steps=1, seed=0, context_targets=False)
    batch = batches.get_batch(cfg, enc, batches.data_source(cfg), 0, 0)
    text = [enc.decode(row.tolist()) for row in batch["idx"]]
    assert any(cwe.INSTRUCTION in t for t in text) and any("Question: Where is" in t for t in text)


def test_make_data_then_evaluate_a_tiny_checkpoint_end_to_end(tmp_path, capsys):
    import train
    run = tmp_path / "run"
    train.main(["--data", "cwe", "--lengths", "0k,1k", "--ctx", "1024", "--model", "tiny",
                "--device", "cpu", "--batch-size", "1", "--steps", "1", "--inner-rank", "4",
                "--out", str(run)])
    eval_ruler.main(["--make-data", str(tmp_path / "d"), "--lengths", "1k,2k", "--n", "1"])
    rows = json.loads((tmp_path / "d" / "data" / "cwe" / "2k.json").read_text())
    assert len(rows) == 1 and set(rows[0]) == {"input", "question", "target"}
    capsys.readouterr()
    eval_ruler.main(["--ckpt", str(run / "ckpt.pt"), "--data", str(tmp_path / "d"), "--lengths",
                     "1k,2k", "--n", "1", "--device", "cpu", "--out", str(tmp_path / "e")])
    out = capsys.readouterr().out
    preds = json.loads((tmp_path / "e" / eval_ruler.PREDICTIONS).read_text())
    assert [p["length"] for p in preds] == ["1k", "2k"]
    for p in preds:
        assert p["score"] == eval_ruler.score(p["output"], p["target"])
        assert p["prompt_tokens"] <= cwe.budget(p["length"])
    assert out.splitlines()[-2].split() == ["score", *[f"{p['score']:.2f}" for p in preds]]
    assert "sink mass" in out and "engagement" in out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.manual_seed(0)
    write_checkpoint(path, GPT(tiny_config(vocab_size=50304)), {"mask": "hybrid"})
    return str(path)


def refused(capsys, argv: list[str]) -> str:
    """eval_ruler.py refuses argv: exit status 2 and one line on stderr (returned)."""
    with pytest.raises(SystemExit) as stop:
        eval_ruler.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("content,why", [
    ('[{"input": "1. a", "question": "q", "target": "a"}]', "[0]: 'target' must be a list"),
    ('[{"input": "1. a", "question": "q", "target": ["a", 3]}]', "[0]: 'target' must be a list of"),
    ('[{"input": "1. a", "question": "q", "target": []}]', "[0]: 'target' must be a list of"),
    ('[{"input": "1. a", "target": ["a"]}]', "no 'question'"),
    ("[{", "not a JSON file of samples"),
    ("missing", "no sample file"),
])
def test_a_bad_sample_file_is_one_line_before_any_model(tmp_path, capsys, tiny_ckpt, content, why):
    path = tmp_path / "d" / "data" / "cwe" / "1k.json"
    path.parent.mkdir(parents=True)
    if content != "missing":
        path.write_text(content)
    line = refused(capsys, ["--ckpt", tiny_ckpt, "--data", str(tmp_path / "d"), "--lengths", "1k",
                            "--device", "cpu", "--out", str(tmp_path / "o")])
    assert line.startswith("eval_ruler.py: error: --data: ") and why in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--lengths", "0k"], "argument --lengths"),
    (["--make-data", ""], "--make-data: an empty path"),
    (["--ckpt", "/etc/hostname"], "--ckpt: cannot load"),
    (["--n", "2"], "give one of --make-data DIR, --ckpt CKPT"),
    (["--make-data", "d", "--ckpt", "c.pt"], "give one of --make-data DIR, --ckpt CKPT"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert needle in refused(capsys, argv + ["--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_as_a_process_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval_ruler.py"), "--make-data", "d",
                        "--lengths", "1k,0k"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "argument --lengths" in r.stderr
    assert r.stdout == "" and not (tmp_path / "d").exists()


def test_make_data_writes_nothing_when_a_later_length_fails(tmp_path, monkeypatch, capsys):
    make = cwe.make_samples
    def failing(enc, rng, length, n):
        if length == "2k":
            raise ValueError("the words run out")
        return make(enc, rng, length, n)
    monkeypatch.setattr(cwe, "make_samples", failing)
    with pytest.raises(SystemExit) as stop:
        eval_ruler.main(["--make-data", str(tmp_path / "d"), "--lengths", "1k,2k", "--n", "1"])
    assert stop.value.code == 2 and "the words run out" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
