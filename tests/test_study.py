"""study.py --quick: the whole study pipeline on the CPU with tiny sizes (the pipeline, not the
numbers).

Run: python -m pytest -q tests/test_study.py
"""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, refused

import checkpoint
import eval_ruler
import study
import study_eval
import study_report


@pytest.fixture(autouse=True)
def no_stop_left():
    """A test whose run fails or stops leaves the study's STOP set (study.main clears it)."""
    yield
    study.STOP.clear()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study.main(["--quick", "--out", str(out), "--parallel", "2"])   # (the places, on a CPU)
    return out, json.loads((out / "results.json").read_text())


def test_every_stage_writes_its_files(quick):
    out, res = quick
    for name in ("results.json", "results.md", "heatmaps.png", "focusft_minus_sft.png",
                 "training.png", "cwe.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.rglob("*.tmp*"))                        # every file written whole


def test_every_arm_trained_from_the_base_for_its_steps(quick):
    out, res = quick
    plan = study.QUICK
    arms = {k: v for k, v in res["arms"].items() if "/" in k}
    assert sorted(arms) == sorted([f"{a}/{s}" for a in ("sft", "focusft") for s in plan.seeds]
                                  + [f"{a}/{plan.seeds[0]}"
                                     for a in ("hybrid", "inner", "sft_time")])
    for name, run in arms.items():
        records = study.log_records(out / "arms" / name.replace("/", "_s"))
        config = records[0]["config"]["args"]
        assert config["init"] == res["base"]["checkpoint"] and config["bos"] == 1
        assert config["data"] == plan.data == "babilong+cwe"
        assert run["steps"] == config["steps"] >= plan.arm_steps
        assert (config["method"], config["mask"]) == {
            "sft": ("sft", "causal"), "hybrid": ("sft", "hybrid"), "inner": ("focusft", "causal"),
            "focusft": ("focusft", "hybrid"), "sft_time": ("sft", "causal")}[name.split("/")[0]]
        # the sweep's inner lr and steps; the loop acted
        if config["method"] == "focusft":
            assert config["inner_lr"] == res["sweep"]["chosen"] and config["inner_per"] == "sample"
            assert config["inner_steps"] == res["sweep"]["chosen_steps"]
            # passed on, not train.py's default (which is also "response")
            assert config["inner_loss"] == plan.inner_loss == "response"
            assert f"--inner-loss {plan.inner_loss}" in run["command"]
            assert all(r["moved"] > 0 for r in records if "moved" in r)
    # never fewer than SFT's own
    assert arms[f"sft_time/{plan.seeds[0]}"]["steps"] == max(
        plan.arm_steps, round(plan.arm_steps * res["arms"]["time_ratio"]))
    assert (res["sweep"]["chosen"] in plan.sweep_lrs
            and res["sweep"]["chosen_steps"] in plan.sweep_inner_steps)
    tried = {(r["inner_lr"], r["inner_steps"]) for r in res["sweep"]["runs"].values()}
    # the whole grid
    assert tried == {(lr, k) for lr in plan.sweep_lrs for k in plan.sweep_inner_steps}
    for key, r in res["sweep"]["runs"].items():                 # each run trained with its own pair
        config = study.log_records(out / "sweep" / f"lr{key}")[0]["config"]["args"]
        assert (config["inner_lr"], config["inner_steps"]) == (r["inner_lr"], r["inner_steps"])
        assert config["inner_loss"] == plan.inner_loss
        assert f"--inner-loss {plan.inner_loss}" in r["command"]
        assert 0 < r["val_loss"] < math.inf                     # shown beside the accuracy
    assert f"| {res['sweep']['runs'][key]['val_loss']:.4f} |" in (out / "results.md").read_text()


def test_every_model_is_evaluated_on_every_cell_and_the_tables_have_their_shape(quick):
    out, res = quick
    plan = study.QUICK
    assert list(res["eval"]) == ["base", *[k for k in res["arms"] if "/" in k]]
    for name, e in res["eval"].items():
        assert set(e["records"]) == {e["mask"], "causal"}
        for records in e["records"].values():
            cells = [(r["task"], r["length"]) for r in records]
            assert sorted(cells) == sorted((t, n) for t in study_report.TASKS
                                           for n in plan.eval_lengths
                                           for _ in range(plan.eval_n))
    text = (out / "results.md").read_text()
    own = text.split("## ")[1].strip().splitlines()             # the first table: one row per model
    rows = [line for line in own if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == len(res["eval"]) and all(r.count("|") == 3 + len(plan.eval_lengths) + 2
                                                 for r in rows)


def test_every_model_is_scored_on_cwe_at_every_length_under_its_own_mask(quick):
    """Each model's CWE records: cwe_n per length, each score RULER's on the sample's own targets;
    attention statistics at every length; the results.md table: a row per model, its mean."""
    out, res = quick
    plan = study.QUICK
    samples = {n: eval_ruler.read_cwe(str(out / "cwe_data"), n) for n in plan.cwe_lengths}
    table = (out / "results.md").read_text().split("## RULER CWE: ")[1].split("## ")[0]
    rows = [line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and "| model" not in line]
    assert [r[0].strip("| ") for r in rows] == list(res["eval"])
    for (name, e), row in zip(res["eval"].items(), rows):
        records = e["cwe"]["records"]
        assert [r["length"] for r in records] == [n for n in plan.cwe_lengths
                                                  for _ in range(plan.cwe_n)]
        targets = [s["target"] for n in plan.cwe_lengths for s in samples[n]]
        assert [r["score"] for r in records] == [eval_ruler.score(r["output"], t)
                                                 for r, t in zip(records, targets)]
        assert list(e["cwe"]["stats"]) == list(plan.cwe_lengths)
        assert 0 <= e["cwe"]["stats"][plan.cwe_lengths[0]]["engagement"] <= 1
        mean = sum(r["score"] for r in records) / len(records)
        assert row[1] == e["mask"] and row[-1].strip(" |") == f"{mean:.2f}"


def test_a_second_run_skips_every_finished_stage(quick, capsys):
    out, res = quick
    before = (out / "arms" / "sft_s1" / "log.jsonl").read_text()
    study.main(["--quick", "--out", str(out), "--parallel", "2"])   # (the places, on a CPU)
    said = capsys.readouterr().out
    assert "python train.py" not in said and "done (21/21)" in said
    assert (out / "arms" / "sft_s1" / "log.jsonl").read_text() == before


def test_a_study_of_another_plan_in_out_is_refused_before_any_stage(quick, capsys):
    """A rerun skips finished stages, so one with another plan (here eval_n) would report the old
    evaluations beside new ones: refused in one line naming the difference; the same plan (and
    another --parallel) is taken."""
    out, res = quick
    line = refused(capsys, study.get_args, ["--quick", "--out", str(out), "--set", "eval_n=2"])
    assert line.startswith(f"study.py: error: --out {out} holds a study of another plan (eval_n: 2 "
                           f"here, {res['plan']['eval_n']} there)"), line
    assert "--quick there" in refused(capsys, study.get_args, ["--out", str(out)])
    assert study.get_args(["--quick", "--out", str(out), "--parallel", "1"]).plan == study.QUICK


def test_a_timed_pair_from_two_cards_does_not_set_the_compute_matched_steps(quick, tmp_path,
                                                                           capsys):
    """SFT given FocuSFT's time trains SFT's steps times the ratio of their step times: where one of
    the two was timed on another card (kept from a study on another machine) and the other is to be
    timed here, the study ends in one line naming what to remove, before either trains or is
    evaluated."""
    out, res = quick
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    log = mixed / "arms" / "focusft_s1" / "log.jsonl"
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(r["gpu"] is None for r in records if "config" in r)    # each try says its card
    log.write_text("\n".join(json.dumps(r | {"gpu": "NVIDIA H200"}) if "config" in r else line
                             for r, line in zip(records, lines)) + "\n")
    for gone in ("arms/sft_time_s1", "arms/sft_s1", "eval/sft_1.json"):
        shutil.rmtree(mixed / gone) if (mixed / gone).is_dir() else (mixed / gone).unlink()
    with pytest.raises(SystemExit) as stop:
        study.main(["--quick", "--out", str(mixed), "--parallel", "2"])
    line = str(stop.value.code)
    assert "would be timed on different GPUs (NVIDIA H200, None; None: the CPU)" in line, line
    assert all(str(mixed / p) in line for p in ("arms/sft_s1", "arms/focusft_s1",
                                                "eval/sft_1.json", "eval/focusft_1.json")), line
    assert not (mixed / "arms" / "sft_s1").exists() and not (mixed / "eval" / "sft_1.json").exists()


@pytest.mark.parametrize("until", ["base", "sweep"])
def test_until_stops_after_its_stage_with_what_it_has(quick, tmp_path, capsys, until):
    """--until: the stages up to it (here finished already, so skipped), their results in
    results.json, the sweep's table printed, and nothing of a later stage started."""
    import shutil
    out, res = quick
    parts = ["base_books", "base"] + ["sweep"] * (until == "sweep")
    for part in parts:
        shutil.copytree(out / part, tmp_path / part)
    study.main(["--quick", "--out", str(tmp_path), "--until", until])
    said = capsys.readouterr().out
    got = json.loads((tmp_path / "results.json").read_text())
    assert "python train.py" not in said and got["until"] == until and "arms" not in got
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.json", *parts])
    assert ("## Inner learning rate and steps sweep" in said) == (until == "sweep")
    if until == "sweep":
        assert got["sweep"]["chosen"] == res["sweep"]["chosen"]


def test_report_alone_rewrites_the_tables_from_results_json(quick, tmp_path, capsys):
    out, res = quick
    text = (out / "results.md").read_text()
    (out / "results.md").unlink()
    study.main(["--report", "--out", str(out)])
    assert ((out / "results.md").read_text() == text
            and "python train.py" not in capsys.readouterr().out)
    with pytest.raises(SystemExit) as stop:
        study.main(["--report", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "is not a study's folder" in capsys.readouterr().err


def test_a_study_cut_short_reports_what_it_has(quick, tmp_path, capsys):
    """A study stopped during its arms (its results.json as the sweep left it; two evaluations not
    written): --report writes the tables of the six models evaluated, says the study was cut short,
    and pairs only models it has."""
    out, res = quick
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    for name in ("focusft_2", "hybrid_1"):
        (cut / "eval" / f"{name}.json").unlink()
    (cut / "results.md").unlink()
    kept = {k: v for k, v in res.items() if k not in ("eval", "arms")} | {"partial": True}
    (cut / "results.json").write_text(json.dumps(kept))
    study.main(["--report", "--out", str(cut)])
    assert "6 models evaluated: a study cut short" in capsys.readouterr().out
    text = (cut / "results.md").read_text()
    first = text.split("## ")[1]                                 # accuracy under own masks
    assert "**Cut short**: 6 of 8 models evaluated" in text
    assert "| focusft/1 |" in first and "| focusft/2 |" not in first and "| hybrid/1 |" not in first
    assert "focusft/1 - sft/1" in text and "focusft/2 - sft/2" not in text
    assert (cut / "heatmaps.png").stat().st_size > 0


def test_answer_form_and_top_output_by_hand():
    records = [{"length": "16k", "output": o}
               for o in (" office\n", "office", "the garden, and the", "kitchen")]
    records.append({"length": "8k", "output": "and gone, and gone"})
    assert (study_report.answer_shaped(records, ["16k"]) == 0.75
            and study_report.answer_shaped(records, ["8k"]) == 0)
    assert study_report.answer_shaped(records, ["16k", "8k"]) == 0.6
    assert (study_report.top_output_share(records, ["16k"]) == 0.5
            and study_report.top_output_share(records, ["16k", "8k"]) == 0.4)
    # nan: none
    assert (study_report.top_output_share(records, ["32k"])
            != study_report.top_output_share(records, ["32k"]))


def test_paired_differences_of_cwe_scores_by_hand():
    """On scores (a share of 10 words), a sample counts for A where A's score is higher."""
    a = [{"length": "4k", "score": s} for s in (0.5, 1.0, 0.2, 0.0)]
    b = [{"length": "4k", "score": s} for s in (0.3, 1.0, 0.6, 0.0)]
    d = study_report.paired(a, b, ["4k"], "score")
    assert (d["only_a"], d["only_b"], d["n"]) == (1, 1, 4) and d["diff"] == pytest.approx(-0.05)
    assert study_report.cwe_score(a) == pytest.approx(0.425)
    assert study_report.cwe_score(a, "8k") != study_report.cwe_score(a, "8k")     # nan: none


def test_paired_differences_and_the_sign_test_by_hand():
    a = [{"length": "1k", "correct": c} for c in (1, 1, 1, 0, 1, 0)]
    b = [{"length": "1k", "correct": c} for c in (0, 0, 1, 0, 1, 1)]
    d = study_report.paired(a, b, ["1k"])
    assert (d["only_a"], d["only_b"], d["n"]) == (2, 1, 6) and d["diff"] == pytest.approx(1 / 6)
    # 2 * P(X <= 1 | n=3) = 2 * 4/8, capped at 1
    assert d["p"] == pytest.approx(1.0)
    many = study_report.paired([{"length": "1k", "correct": 1}] * 10,
                               [{"length": "1k", "correct": 0}] * 10, ["1k"])
    assert many["p"] == pytest.approx(2 / 2 ** 10) and many["se"] == 0
    # records of other samples (here: another eval_n) are never paired by position
    two = [{"task": t, "length": n, "correct": 1} for t in ("qa1", "qa2") for n in ("0k", "1k")
           for _ in range(2)]
    one = [{"task": t, "length": n, "correct": 1} for t in ("qa1", "qa2") for n in ("0k", "1k")]
    for x, y in ((two, one), (one, two), (one, one[::-1])):
        with pytest.raises(ValueError, match="not the same test samples"):
            study_report.paired(x, y, ["1k"])


def test_each_evaluation_is_a_command_that_reproduces_its_answers(quick, tmp_path):
    """Every model's evaluation ran as a study_eval.py command of its own, recorded with the seconds
    of each part; run again by hand, the command writes the same answers and scores."""
    out, res = quick
    for name, e in res["eval"].items():
        assert e["command"].startswith("python study_eval.py --ckpt ")
        assert {"cwe", "all", "babilong causal", "stats causal"} <= set(e["seconds"])
        assert (out / "eval" / f"{name.replace('/', '_')}.out").exists()
    table = (out / "results.md").read_text().split("## Evaluations: seconds")[1].split("## ")[0]
    assert all(f"| {name} |" in table for name in res["eval"])
    e = res["eval"]["focusft/1"]
    argv = shlex.split(e["command"])[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "again.json")
    study_eval.main(argv)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["records"] == e["records"] and again["cwe"]["records"] == e["cwe"]["records"]


def test_study_eval_refuses_bad_input_in_one_line(quick, tmp_path, capsys):
    out, res = quick
    common = ["--babilong", str(out / "test_data"), "--cwe", str(out / "cwe_data"),
              "--lengths", "0k", "--stats-lengths", "0k", "--cwe-lengths", "1k", "--device", "cpu"]
    for argv, words in ((["--ckpt", str(tmp_path / "none.pt")], "--ckpt"),
                        (["--ckpt", res["base"]["checkpoint"], "--cwe", str(tmp_path / "no")],
                         "--cwe"),
                        (["--ckpt", res["base"]["checkpoint"], "--lengths", "3k"], "--lengths")):
        with pytest.raises(SystemExit) as stop:
            study_eval.main(common + argv + ["--out", str(tmp_path / "e.json")])
        message = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and message.count("\n") == 0 and words in message, message
    assert not list(tmp_path.iterdir())


def test_a_failed_command_is_what_the_study_ends_with_not_the_stop_it_caused(monkeypatch,
                                                                             tmp_path):
    def failing_run(args):
        study.FAILURES.append("study.py: error: eval base failed; its output: X")
        raise study.Stopped("arm sft seed 1")
    monkeypatch.setattr(study, "run", failing_run)
    with pytest.raises(SystemExit) as stop:
        study.main(["--quick", "--out", str(tmp_path / "s")])
    assert stop.value.code == "study.py: error: eval base failed; its output: X"


def test_bad_folders_are_one_line_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for flag, folder in (("--books", "missing"), ("--books", "empty"), ("--test-books", "empty")):
        with pytest.raises(SystemExit) as stop:
            study.get_args([flag, str(tmp_path / folder), "--out", str(tmp_path / "out")])
        message = capsys.readouterr().err.strip()
        assert (stop.value.code == 2 and message.count("\n") == 0 and flag in message
                and folder in message)
    assert not (tmp_path / "out").exists()


def test_set_changes_plan_fields_by_their_type_and_refuses_others(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                    # (the default --out, runs/study, holds nothing)
    plan = study.get_args(["--set", "arm_steps=5", "--set", "sweep_lrs=0.1,0.3",
                           "--set", "arm_lr=1e-4"]).plan
    assert (plan.arm_steps, plan.sweep_lrs, plan.arm_lr, plan.base_steps) == (5, (0.1, 0.3), 1e-4,
                                                                              study.FULL.base_steps)
    assert study.get_args(["--quick", "--set", "eval_n=2"]).plan == study.with_changes(study.QUICK,
                                                                                      ["eval_n=2"])
    assert study.get_args(["--set", "inner_loss=context"]).plan.inner_loss == "context"
    for bad in ("nope=1", "arm_steps=x", "extra=--workers", "arm_lr=nan", "sweep_lrs=0.1,inf",
                "inner_loss=answer"):
        with pytest.raises(SystemExit):
            study.get_args(["--set", bad])
    capsys.readouterr()
    # what no stage could run is refused before the base trains, not minutes later
    for bad, why in (("arm_steps=0", "arm_steps must be >= 1"), ("eval_n=0", "eval_n must be >= 1"),
                     ("sweep_lrs=0.1,0", "sweep_lrs must be > 0"),
                     ("seeds=-1", "seeds must be >= 0"), ("seeds=1,1", "seeds must differ"),
                     ("stats_n=101", "more samples of a length than the test holds"),
                     ("data=books", "data must be one of"), ("model=gpt5", "model must be one of"),
                     ("eval_lengths=1K", "no BABILong length '1K'"),
                     ("train_lengths=0k,3k", "no BABILong length '3k'")):
        line = refused(capsys, study.get_args, ["--set", bad])
        assert line.startswith("study.py: error: --set: ") and why in line, line
    assert study.get_args(["--set", "qa_steps=0", "--set", "base_wd=0"]).plan.qa_steps == 0


def test_sigint_stops_the_run_in_flight_at_a_step_boundary_and_the_study_says_how_to_continue(
        tmp_path):
    """^C to a study (its process group, as a terminal sends it): the train.py run in flight, in a
    session of its own, gets one SIGINT from the study and saves at a step boundary; the study exits
    130 with one line."""
    out = tmp_path / "study"
    # a long base
    flags = ["--quick", "--out", str(out), "--set", "base_steps=400", "--set", "stats_every=1000"]
    study_run = subprocess.Popen([sys.executable, "study.py", *flags], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
    log = out / "base_books" / "log.jsonl"
    def steps(settled: bool = False) -> list[int]:
        lines = log.read_text().splitlines() if log.exists() else []
        # (while it runs, the last may be half written)
        lines = lines if settled else lines[:-1]
        return [r["step"] for r in map(json.loads, lines) if "loss" in r]
    deadline = time.time() + 180
    while time.time() < deadline and len(steps()) < 2:
        time.sleep(0.2)
    os.killpg(study_run.pid, signal.SIGINT)
    _, stderr = study_run.communicate(timeout=180)
    assert study_run.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("study.py: stopped: finished stages are kept and a "
                                               "run cut off resumes from its checkpoint; continue "
                                               "with: python study.py " + " ".join(flags))
    ckpt = checkpoint.load(str(log.parent / checkpoint.FILE))
    # the last one logged
    assert 1 <= ckpt["step"] < 399 and steps(settled=True) == list(range(ckpt["step"] + 1))
    assert not (log.parent / "done").exists()
    # the stopped try's time is kept, for the resumed run's wall time
    assert len((log.parent / "tries").read_text().split()) == 1
