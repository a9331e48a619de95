"""The BABILong scorer against the official rule's results on real model outputs, plus its quirks.

Run: python -m pytest -q tests/test_eval_babilong.py
"""
import sys

import pytest
from conftest import SHARED, refused

import eval_babilong as ev
import generate
from babilong_score import is_correct, last_mentioned, score_file

PREDICTIONS = SHARED / "data" / "babilong_predictions" / "phi-3-mini-128k-instruct"
# (file, correct) as booydar/babilong's own babilong/metrics.py counts them on these files (run
# 2026-11-28 outside this repository; the files hold 1000 rows for qa1 and 999 for the others).
OFFICIAL = {"qa1_4k": 690, "qa1_16k": 601, "qa2_4k": 375, "qa2_16k": 231, "qa3_4k": 269,
            "qa3_16k": 235, "qa4_4k": 456, "qa4_16k": 468, "qa5_4k": 696, "qa5_16k": 676}


@pytest.mark.skipif(not PREDICTIONS.is_dir(), reason="needs ../shared/data/babilong_predictions")
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_accuracy_equals_the_official_rule_on_real_outputs(name):
    path = PREDICTIONS / f"{name}_instruction_yes_examples_yes_post_prompt_yes.csv"
    correct, total = score_file(str(path), name.split("_")[0])
    assert total == (1000 if name.startswith("qa1") else 999)
    assert correct == OFFICIAL[name]


@pytest.mark.parametrize("target,output,question,task,want", [
    ("kitchen", "The kitchen.", "Where is Mary? ", "qa1", True),
    # case does not matter
    ("kitchen", "KITCHEN", "Where is Mary? ", "qa1", True),
    ("kitchen", "kitchen or garden", "Where is Mary? ", "qa1", False),          # two labels: wrong
    # 1st sentence
    ("kitchen", "It is not the garden. It is the kitchen.", "Where is Mary? ", "qa1", False),
    # question label
    ("hallway", "hallway, not the kitchen", "What is north of the kitchen? ", "qa4", True),
    # never correct
    ("kitchen", "the kitchen", "Where was the apple before the kitchen? ", "qa3", False),
    ("Mary", "mary received it", "Who received the milk? ", "qa5", True),
    ("kitchen", "<context>kitchen", "Where is Mary? ", "qa1", False),          # cut at <context>
    # 'Question' cut is inert
    ("kitchen", "kitchen Question: garden", "Where is Mary? ", "qa1", False),
    # substring match, as official
    ("office", "officers", "Where is John? ", "qa1", True),
])
def test_rule_and_its_quirks(target, output, question, task, want):
    assert is_correct(target, output, question, task) is want


@pytest.mark.parametrize("text,question,task,want", [
    ("Mary went to the kitchen. John moved to the garden.", "Where is Mary? ", "qa1", "garden"),
    # labels the question names are skipped
    ("The office is north of the kitchen. The garden is south of the kitchen.",
     "What is north of the kitchen? ", "qa4", "garden"),
    ("Fred gave the milk to Bill. Bill handed the apple to Jeff.", "What did Fred give to Bill? ",
     "qa5", "jeff"),
    ("Nothing happens here.", "Where is Mary? ", "qa1", ""),
    ("In the hall Mary moved to the office. He sat in the garden", "Where is Mary? ", "qa1",
     "office"),
    ("Mary went to the office. As said Tom John went to the garden.", "Where is Mary? ", "qa1",
     "garden"),
    # prose that names labels is not a fact
    ("Mary went to the kitchen. They spoke of Mary and the garden. We left the office.",
     "Where is Mary? ", "qa1", "kitchen"),
])
def test_last_mentioned_baseline(text, question, task, want):
    assert last_mentioned({"input": text, "question": question}, task) == want


def test_last_mentioned_is_a_guess_not_the_answer():
    """On generated qa1 stories (every sentence ends with a room) the baseline is right exactly when
    the last sentence's room is the answer, and that is neither never nor always."""
    import random

    from data import babilong, books, tokenizer
    samples = babilong.make_samples(tokenizer.gpt2(), random.Random(3), "qa1", "0k", 200,
                                    books.haystack("synthetic"))
    right = [is_correct(s["target"], last_mentioned(s, "qa1"), s["question"], "qa1")
             for s in samples]
    last_room = [s["input"].rstrip(".").split(". ")[-1].split()[-1] == s["target"] for s in samples]
    assert right == last_room and 0 < sum(right) < len(right)


def test_unknown_task_and_bad_file_fail_cleanly(tmp_path, capsys):
    with pytest.raises(ValueError, match="qa9"):
        is_correct("kitchen", "kitchen", "Where?", "qa9")
    bad = tmp_path / "bad.csv"
    bad.write_text("target,answer\nkitchen,kitchen\n")
    assert "missing column" in refused(capsys, ev.main, ["--score", str(bad), "--tasks", "qa1"])


def test_make_data_then_evaluate_a_tiny_checkpoint_end_to_end(tmp_path, monkeypatch, capsys):
    import io
    import json

    import train

    # stderr as a terminal: the progress bar is drawn there
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    run = tmp_path / "run"
    train.main(["--ctx", "512", "--model", "tiny", "--device", "cpu", "--batch-size", "2",
                "--steps", "2", "--inner-rank", "4", "--out", str(run)])
    bench = tmp_path / "bench"
    ev.main(["--make-data", str(bench), "--tasks", "qa1,qa5", "--lengths", "0k,1k", "--n", "2"])
    for task in ("qa1", "qa5"):
        for length in ("0k", "1k"):
            rows = json.loads((bench / "data" / task / f"{length}.json").read_text())
            assert len(rows) == 2 and set(rows[0]) == {"input", "question", "target"}
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    ev.main(["--ckpt", str(run / "ckpt.pt"), "--data", str(bench), "--tasks", "qa1,qa5",
             "--lengths", "0k,1k", "--n", "2", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert "[####################] 8/8" in terminal.getvalue()
    preds = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(preds) == 8 and {p["task"] for p in preds} == {"qa1", "qa5"}
    for p in preds:
        assert p["correct"] == is_correct(p["target"], p["output"], p["question"], p["task"])
        assert p["baseline_correct"] == is_correct(p["target"], p["last_mentioned"],
                                                   p["question"], p["task"])
    assert (tmp_path / "eval" / "heatmap.png").stat().st_size > 1000
    means = [line.split()[1:] for line in capsys.readouterr().out.splitlines()
             if line.startswith("mean ")]
    # the accuracy table's, then the baseline's
    for row, key in zip(means, ("correct", "baseline_correct")):
        assert row == [f"{sum(p[key] for p in preds if p['length'] == n) / 4:.2f}"
                       for n in ("0k", "1k")]
    # the third table's: per task over the baseline's misses, then mean
    reading = []
    for n in ("0k", "1k"):
        per_task = []
        for t in ("qa1", "qa5"):
            missed = [p["correct"] for p in preds
                      if (p["task"], p["length"]) == (t, n) and not p["baseline_correct"]]
            per_task += [sum(missed) / len(missed)] if missed else []
        reading.append(f"{sum(per_task) / len(per_task):.2f}" if per_task else "-")
    assert len(means) == 3 and means[2] == reading


def test_reading_table_counts_only_the_baselines_misses():
    """A model that echoes the last-named label scores 0 in the reading table, whatever its
    accuracy, and one that reads scores 1; cells where the baseline never misses print '-' and stay
    out of the mean."""
    targets, last = (["office", "garden", "kitchen", "hallway"],
                     ["kitchen", "garden", "bedroom", "hallway"])
    def records(outputs):
        return [{"correct": is_correct(t, o, "Where is Mary? ", "qa1"),
                 "baseline_correct": is_correct(t, g, "Where is Mary? ", "qa1")}
                for t, g, o in zip(targets, last, outputs)]
    echo, reader = records(last), records(targets)
    # half right, reads nothing
    assert sum(r["correct"] for r in echo) == 2 and ev.reading_accuracy(echo) == 0.0
    assert ev.reading_accuracy(reader) == 1.0
    assert ev.reading_accuracy([r for r in echo if r["baseline_correct"]]) is None
    assert ev.mean([0.5, None, 1.0]) == 0.75 and ev.mean([None]) is None
    assert ev.cell(None).strip() == "-" and ev.cell(0.25).strip() == "0.25"


@pytest.mark.parametrize("argv,needle", [
    (["--make-data", "X", "--tasks", "qa9"], "qa9"),
    (["--make-data", "X", "--lengths", "1K"], "1K"),
    (["--ckpt", "/nonexistent.pt", "--data", "X", "--lengths", "0k"], "no checkpoint"),
    (["--make-data", "X", "--haystack", "/nonexistent/books"], "nonexistent"),
    (["--make-data", "X", "--haystack", "pg19"], "pg19"),
    (["--score", "x.csv"], "exactly one task"),
    (["--ckpt", "/etc/hostname", "--lengths", "0k"], "cannot load"),
    (["--ckpt", "/etc/hostname", "--lengths", "0k", "--device", "gpu"], "--device"),
    (["--ckpt", "/etc/hostname", "--lengths", "0k", "--out", "/etc/hostname/x"], "--out"),
])
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path, monkeypatch, capsys, argv, needle):
    """(In the process: tests/test_cli.py runs eval_babilong.py's refusals as a process.)"""
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, ev.main, argv)
    assert needle in line and line.startswith("eval_babilong.py: error:"), line


def test_malformed_files_are_one_line_and_nonzero_exit(tmp_path, monkeypatch, capsys):
    """A CSV row shorter than its header, and --prompt-parts JSON that is not {task: {...}}, are
    named as such."""
    short, parts, flat = tmp_path / "short.csv", tmp_path / "parts.json", tmp_path / "flat.json"
    short.write_text("target,output,question\nkitchen\n")
    parts.write_text("[1, 2]")
    # a task's parts must be an object too
    flat.write_text('{"qa1": "an instruction"}')
    for argv, needle in ((["--score", str(short), "--tasks", "qa1"], "row 1 has fewer fields"),
                         (["--ckpt", "/etc/hostname", "--prompt-parts", str(parts)], "JSON object"),
                         (["--ckpt", "/etc/hostname", "--prompt-parts", str(flat)], "JSON object")):
        assert needle in refused(capsys, ev.main, argv)


def test_hub_source_without_datasets_or_network_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)              # as if not installed
    with pytest.raises(RuntimeError, match="pip install datasets"):
        ev.read_samples("hub", "qa1", "1k", "main")


def test_hub_source_asks_for_the_pinned_revision(monkeypatch):
    """--data hub with a stand-in `datasets`: config = length, split = task, the given revision, and
    the hub's rows come back as plain samples."""
    import types
    calls = []

    def load_dataset(name, config, split, revision):
        calls.append((name, config, split, revision))
        return [{"input": "Mary went to the garden.", "question": "Where is Mary? ",
                 "target": "garden", "x": 1}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    from data import sample_files
    samples = ev.read_samples("hub", "qa1", "8k", "abc123")
    assert calls == [(sample_files.HUB, "8k", "qa1", "abc123")]
    assert samples == [{"input": "Mary went to the garden.", "question": "Where is Mary? ",
                        "target": "garden"}]


def test_official_template_holds_context_and_question():
    from data import tokenizer
    enc = tokenizer.gpt2()
    sample = {"input": " Mary went to the garden. ", "question": "Where is Mary? ",
              "target": "garden"}
    parts = {"qa1": {"instruction": "Answer briefly.", "examples": "", "post_prompt": "One word."}}
    text = enc.decode(ev.prompt_for(enc, sample, "qa1", "official", parts))
    assert text.startswith("Answer briefly.\n\n\n\nOne word.\n\n<context>\n"
                           "Mary went to the garden.\n</context>")
    # stripped, as the official prompt
    assert text.endswith("\n\nQuestion: Where is Mary?")
    # no parts for qa2: no blank head
    bare = enc.decode(ev.prompt_for(enc, sample, "qa2", "official", parts))
    assert bare.startswith("<context>\nMary went")
    trained = enc.decode(ev.prompt_for(enc, sample, "qa1", "trained", {}))
    assert trained == " Mary went to the garden.\nQuestion: Where is Mary?\nAnswer:"


def test_a_length_without_samples_is_blank_not_zero(tmp_path, monkeypatch, capsys):
    """A data file with no samples gives '-' in every table and the heatmap, and no mean counts it
    as 0."""
    import json

    import torch
    from conftest import tiny_config, write_checkpoint

    from model import GPT
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "ckpt.pt", GPT(tiny_config(vocab_size=50304)), {"mask": "hybrid"})
    ev.main(["--make-data", str(tmp_path / "bench"), "--tasks", "qa1", "--lengths", "0k,1k",
             "--n", "2"])
    (tmp_path / "bench" / "data" / "qa1" / "1k.json").write_text("[]")
    capsys.readouterr()
    ev.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "bench"),
             "--tasks", "qa1", "--lengths", "0k,1k", "--n", "2", "--device", "cpu",
             "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "qa1   1k: acc      - over 0" in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("qa1 ", "mean ")) and "acc" not in line]
    # accuracy, baseline, reading tables
    assert len(rows) == 6 and all(row[-1] == "-" for row in rows)
    # 0k: accuracy and baseline exist
    assert all(row[-2] != "-" for row in rows[:4])
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())) == 2


def test_decoding_batches_group_by_padded_size_within_the_budget(monkeypatch):
    """Prompts of one padded size share batches of budget // size rows (the group's last one
    smaller); every prompt is in exactly one batch; a prompt over the budget still gets a batch of
    its own."""
    import generate
    monkeypatch.setattr(generate, "PAD_TO", 64)
    lengths = [10, 70, 20, 30, 65, 5, 64, 1, 300]            # padded: 64 128 64 64 128 64 64 64 320
    assert generate.decoding_batches(lengths, 256) == [[0, 2, 3, 5], [6, 7], [1, 4], [8]]
    assert generate.decoding_batches(lengths, 1) == [[i] for i in (0, 2, 3, 5, 6, 7, 1, 4, 8)]


def test_batched_evaluate_gives_each_samples_own_record(monkeypatch):
    """evaluate with many rows per batch (prompts of three padded sizes, in no order) gives the
    records, in the samples' order, that it gives decoding one sample at a time; only the seconds
    differ."""
    import random

    import torch
    from conftest import tiny_config

    import generate
    from data import babilong, books, tokenizer
    from model import GPT
    # these prompts (22 to 73 tokens) pad to 32, 64, 96
    monkeypatch.setattr(generate, "PAD_TO", 32)
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=50304)).eval()
    # sharp attention: each prompt's answer its own
    with torch.no_grad():
        for block in model.h:
            block.attn.q_proj.weight.mul_(20)
            block.attn.kv_proj.weight.mul_(20)
    enc, hay = tokenizer.gpt2(), books.haystack("synthetic")
    samples = babilong.make_samples(enc, random.Random(0), "qa1", "0k", 8, hay)
    rows = []
    generate_batch = generate.generate_batch
    monkeypatch.setattr(generate, "generate_batch",
                        lambda model, prompts, *a: rows.append(len(prompts))
                        or generate_batch(model, prompts, *a))
    runs = {}
    # one row per batch; one batch per padded size
    for budget in (1, 10 ** 6):
        monkeypatch.setattr(generate, "EVAL_TOKENS", budget)
        ticks, rows[:] = [], []
        runs[budget] = ev.evaluate(model, enc, samples, "qa1", "hybrid", "cpu",
                                   tick=lambda: ticks.append(1))
        assert len(ticks) == len(samples) and all(r["seconds"] > 0 for r in runs[budget])
        assert sorted(rows) == ([1] * 8 if budget == 1 else [1, 3, 4])
    alone, batched = ([{k: v for k, v in r.items() if k != "seconds"} for r in runs[b]]
                      for b in (1, 10 ** 6))
    assert batched == alone
    assert ([(r["question"], r["target"]) for r in batched]
            == [(s["question"], s["target"]) for s in samples])
    # answers differ: an order mix-up would show
    assert len({r["output"] for r in batched}) > 1
    assert set(batched[0]) == {"question", "target", "output", "correct", "last_mentioned",
                               "baseline_correct", "prompt_tokens"}


def test_a_model_trained_with_bos_is_prompted_with_it(tmp_path, monkeypatch):
    """A checkpoint whose run had --bos 1 is evaluated on prompts that open with BOS_ID, as its
    samples did; without it, the prompt is the training format alone."""
    from conftest import tiny_config, write_checkpoint

    from data import packing, tokenizer
    from model import GPT
    enc, sample = tokenizer.gpt2(), {"input": "Mary went to the kitchen.",
                                     "question": "Where is Mary? ", "target": "kitchen"}
    plain = ev.prompt_for(enc, sample, "qa1", "trained", {})
    assert ev.prompt_for(enc, sample, "qa1", "trained", {}, bos=True) == [tokenizer.BOS_ID] + plain
    assert (plain == packing.prompt_ids(enc, sample["input"], sample["question"])
            and tokenizer.BOS_ID not in plain)
    seen = []
    monkeypatch.setattr(generate, "generate_batch",
                        lambda model, prompts, *a: seen.extend(prompts) or [[]] * len(prompts))
    monkeypatch.setattr(ev, "length_stats",
                        lambda *a: {"sink_mass": 0, "sink_rate": 0, "engagement": 0})
    ev.main(["--make-data", str(tmp_path / "d"), "--tasks", "qa1", "--lengths", "0k", "--n", "2"])
    write_checkpoint(tmp_path / "ckpt.pt", GPT(tiny_config()), {"mask": "causal", "bos": 1})
    ev.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "d"), "--tasks", "qa1",
             "--lengths", "0k", "--n", "2", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert len(seen) == 2 and all(p[0] == tokenizer.BOS_ID for p in seen)
