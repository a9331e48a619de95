"""Every script's command line: bad input (a flag, or a file a flag names) is one line `prog: error:
...` naming the flag or file, exit status 2, before any model is built and with nothing written;
--help shows the whole description and every flag's default.

Run: python -m pytest -q tests/test_cli.py   (seconds: refusals come before any work)
"""
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, refused, tiny_config, write_checkpoint

import checkpoint
import config
import eval_babilong
import eval_ruler
import study
import train
from bench import sections as bench
from model import GPT, preset

# each float flag
OUT_OF_RANGE = {"--lr": "-1e-3", "--inner-lr": "-0.5", "--warmup": "1.5", "--weight-decay": "-0.01",
                "--clip": "-1", "--inner-clip": "0", "--inner-alpha": "0", "--inner-fraction": "0"}


def run(script: str, *argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    """A checkpoint of train.py's CPU default model ("tiny"), as train.py writes one."""
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.manual_seed(0)
    write_checkpoint(path, GPT(preset("tiny", "sdpa")), {"mask": "hybrid"})
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: a refusal must come before it."""
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")
    monkeypatch.setattr(train, "GPT", build)
    monkeypatch.setattr(checkpoint, "model_from", build)


# --------------------------------------------------------------------------------------------------
# train.py

def test_every_float_flag_refuses_non_finite_and_out_of_range_values_as_it_is_read(capsys):
    """nan, inf, -inf, 1e999 (= inf) and a value outside the flag's range are refused while the
    command line is parsed, naming the flag; a value inside is taken. OUT_OF_RANGE must name every
    float flag."""
    floats = {a.option_strings[0] for a in config.parser()._actions
              if a.type is not None and isinstance(_try(a.type, "0.5"), float)}
    assert floats == set(OUT_OF_RANGE)
    for flag, bad in OUT_OF_RANGE.items():
        # (--flag=-1: argparse's way to a negative)
        for value in ("nan", "inf", "-inf", "1e999", bad):
            line = refused(capsys, config.get_args, [f"{flag}={value}"])
            assert (line.startswith(f"train.py: error: argument {flag}: ")
                    and repr(value) in line), line
        assert getattr(config.get_args([flag, "0.5"]), flag[2:].replace("-", "_")) == 0.5


def _try(parse, text):
    try:
        return parse(text)
    except Exception:     # noqa: BLE001 (a type that refuses "0.5" is no float flag)
        return None


@pytest.mark.parametrize("flag,value", [("--ctx", "0"), ("--ctx", "1.5"), ("--inner-rank", "0"),
                                        ("--grad-accum", "0"), ("--steps", "-1"),
                                        ("--workers", "-2"), ("--stop-after", "nan")])
def test_count_flags_refuse_what_is_not_a_count(capsys, flag, value):
    assert f"argument {flag}: expected an integer" in refused(capsys, config.get_args,
                                                              [f"{flag}={value}"])


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "truncated", "text", "tensor",
                                  "parts", "weights"])
def test_what_is_not_a_checkpoint_is_one_line_for_init_resume_and_eval(tmp_path, capsys, no_model,
                                                                         tiny_ckpt, kind):
    """The one loader (checkpoint.load) names the file and why; --init, --resume and
    eval_babilong.py --ckpt each refuse it in one line naming the flag, before a model is built or
    an output folder made."""
    bad = tmp_path / "run" / "ckpt.pt"                     # where --resume --out run looks
    bad.parent.mkdir()
    good = open(tiny_ckpt, "rb").read()
    if kind == "folder":
        bad.mkdir()
    elif kind != "missing":
        bad.write_bytes({"empty": b"", "truncated": good[:len(good) // 2],
                         "text": b"step 3\n"}.get(kind, b""))
    if kind == "tensor":
        torch.save(torch.zeros(3), bad)
    if kind == "parts":
        torch.save({"model": {}}, bad)
    # a checkpoint whose weights are not its config's model
    if kind == "weights":
        write_checkpoint(bad, GPT(tiny_config()), {"mask": "hybrid"})
        ckpt = torch.load(bad, weights_only=True)
        ckpt["config"]["model"]["n_layer"] = 2
        torch.save(ckpt, bad)
    why = {"missing": "no checkpoint at", "folder": "it is a folder", "empty": "it is empty",
           "truncated": "not a zip archive", "text": "not a zip archive",
           "tensor": "holds a Tensor", "parts": "it lacks optimizer, config, step, rng",
           "weights": "do not fit its model config"}[kind]
    with pytest.raises(checkpoint.NotACheckpoint, match=why):
        checkpoint.load(str(bad))
    new = tmp_path / "new"
    cpu = ["--device", "cpu", "--ctx", "512", "--data", "synthetic"]
    for main, argv, flag in ((train.main, ["--init", str(bad), "--out", str(new)] + cpu, "--init"),
                             (train.main, ["--resume", "--out", str(bad.parent)], "--resume"),
                             (eval_babilong.main,
                              ["--ckpt", str(bad), "--out", str(new), "--device", "cpu"],
                              "--ckpt")):
        if kind == "missing" and flag == "--resume":
            flag, why = "--resume", "no checkpoint at"      # (config.check_args: nothing to resume)
        line = refused(capsys, main, argv)
        assert line.startswith(f"{main.__module__}.py: error: {flag}: ") and why in line, line
        assert not new.exists()


def test_init_with_a_model_of_another_size_is_refused_and_its_size_recorded(tmp_path, capsys,
                                                                            no_model, tiny_ckpt):
    """--init builds the checkpoint's model: --model naming another size is refused in one line (it
    used to be recorded while the checkpoint's model trained); the same size, or none, is taken and
    recorded as the checkpoint's."""
    argv = ["--init", tiny_ckpt, "--device", "cpu", "--out", str(tmp_path / "o")]
    line = refused(capsys, train.main, argv + ["--model", "small"])
    assert "--model small conflicts with --init" in line and "tiny" in line
    for given in ([], ["--model", "tiny"]):
        args, _, _, why = config.from_command_line(argv + given)
        assert (args.model == "tiny"
                and any(w.startswith("--model tiny") for w in why) == (not given))
    # no --out yet (and no probe of it left behind)
    assert list(tmp_path.iterdir()) == []


def test_init_takes_the_checkpoints_start_of_document_token_unless_bos_is_given(tmp_path, no_model):
    """A base pretrained with --bos 1 read every document from that token: a fine-tune from it keeps
    it (the README's fine-tune after the base used to drop it)."""
    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    write_checkpoint(base, GPT(preset("tiny", "sdpa")), {"mask": "causal", "bos": 1})
    argv = ["--init", str(base), "--device", "cpu", "--out", str(tmp_path / "o")]
    for given, bos in (([], 1), (["--bos", "0"], 0)):
        args, _, _, why = config.from_command_line(argv + given)
        assert args.bos == bos and ("--bos 1: the --init checkpoint's" in why) == (not given)
    assert config.from_command_line(["--device", "cpu", "--out", str(tmp_path / "o")])[0].bos == 0


def test_a_bad_init_is_named_even_where_out_holds_a_run(tmp_path, capsys, no_model, tiny_ckpt):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(open(tiny_ckpt, "rb").read())
    line = refused(capsys, train.main, ["--init", str(tmp_path / "none.pt"), "--device", "cpu",
                                        "--out", str(out)])
    assert line.startswith("train.py: error: --init: "), line


def test_a_missing_book_folder_is_refused_before_the_model_is_built(tmp_path, capsys, no_model):
    line = refused(capsys, train.main, ["--device", "cpu", "--data", "synthetic",
                                        "--haystack", str(tmp_path / "no"),
                                        "--out", str(tmp_path / "o")])
    assert line.startswith("train.py: error: haystack folder") and not (tmp_path / "o").exists()
    line = refused(capsys, train.main, ["--device", "cpu", "--haystack", "synthetic:abc",
                                        "--out", str(tmp_path / "o")])
    assert (line.startswith("train.py: error: haystack synthetic:abc: the seed")
            and not (tmp_path / "o").exists())


@pytest.mark.parametrize("out", ["file", "", "/proc/focusft", "file/below"])
def test_an_out_that_cannot_be_written_is_refused_before_the_model_is_built(tmp_path, monkeypatch,
                                                                           capsys, no_model, out):
    (tmp_path / "file").write_text("not a folder")
    if out.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, train.main, ["--device", "cpu", "--ctx", "512", "--data", "synthetic",
                                        "--out", out])
    assert line.startswith(f"train.py: error: --out {out}".rstrip()), line
    assert "No such file" not in line                       # /proc's ENOENT said as what it means
    # nothing made, not even a probe left behind
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_train_refusals_exit_2_with_one_line_and_no_folder(tmp_path):
    """As a process: the issue's cases, one line on stderr, exit status 2, no --out folder."""
    half = tmp_path / "half.pt"
    half.write_bytes(b"PK\x03\x04" + b"\0" * 100)           # a zip's first bytes, cut short
    for argv, needle in ((["--lr", "nan"], "argument --lr"),
                         (["--inner-lr", "inf"], "argument --inner-lr"),
                         (["--init", str(half)], "--init: cannot load")):
        r = run("train.py", "--device", "cpu", "--out", "o", *argv, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
        assert r.stdout == "" and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# eval_babilong.py

@pytest.mark.parametrize("content,why", [
    ('[{"input": 3}]', "qa1/0k.json[0]: 'input' must be a string"),               # the case
    ('[{"input": "Mary went home.", "target": "home"}]', "qa1/0k.json[0]: no 'question'"),
    ('[{"input": "a", "question": "b", "target": "c"}, [1]]',
     "qa1/0k.json[1]: a sample is an object"),
    ('{"input": "a"}', "qa1/0k.json: expected a JSON list of samples, found a dict"),
    ("", "qa1/0k.json is not a JSON file of samples"),                            # empty
    ("[{", "qa1/0k.json is not a JSON file of samples"),                          # cut short
    # not text (not ours)
    (b"PK\x03\x04\xff\xfe", "qa1/0k.json is not a JSON file of samples"),
    (None, "qa1/0k.json is a folder, not a file of samples"),
    ("missing", "no sample file"),
])
def test_a_bad_sample_file_is_one_line_naming_the_file_and_sample(tmp_path, capsys, no_model,
                                                                   tiny_ckpt, content, why):
    """Samples are read and checked before the model is built: a sample lacking a field (it used to
    be a KeyError deep in the evaluation), a wrong type, an empty, cut-short or binary file, a
    folder; the --out folder is not made."""
    path = tmp_path / "d" / "data" / "qa1" / "0k.json"
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = refused(capsys, eval_babilong.main, ["--ckpt", tiny_ckpt, "--data", str(tmp_path / "d"),
                                                "--tasks", "qa1", "--lengths", "0k",
                                                "--device", "cpu", "--out", str(tmp_path / "o")])
    assert line.startswith("eval_babilong.py: error: --data: ") and why in line, line
    assert not (tmp_path / "o").exists()


def test_make_data_writes_nothing_when_a_later_task_cannot_be_read(tmp_path, capsys):
    """Every bAbI file is read before the first sample file is written: qa2's missing file leaves no
    qa1 files."""
    babi_dir = tmp_path / "babi"
    babi_dir.mkdir()
    (babi_dir / "qa1_single-supporting-fact_test.txt").write_text("1 Mary went to the kitchen.\n"
                                                                  "2 Where is Mary? \tkitchen\t1\n")
    line = refused(capsys, eval_babilong.main, ["--make-data", str(tmp_path / "d"),
                                                "--tasks", "qa1,qa2", "--lengths", "0k", "--n", "1",
                                                "--babi-dir", str(babi_dir)])
    assert line.startswith("eval_babilong.py: error: --babi-dir: ") and "qa2" in line
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--n", "0"], "argument --n"), (["--tasks", "qa1,qa9"], "argument --tasks"),
    (["--lengths", "1K"], "argument --lengths"),
    (["--make-data", ""], "--make-data: an empty path"),
    (["--ckpt", "x.pt", "--out", "f"], "--out f: a file")])
def test_eval_flags_are_one_line(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    assert needle in refused(capsys, eval_babilong.main, argv + ["--device", "cpu"])


def test_eval_refusal_exits_2_with_one_line(tmp_path, tiny_ckpt):
    """As a process, the issue's case: a sample with a number for its input and no question."""
    path = tmp_path / "d" / "data" / "qa1" / "0k.json"
    path.parent.mkdir(parents=True)
    path.write_text('[{"input": 3}]')
    r = run("eval_babilong.py", "--ckpt", tiny_ckpt, "--data", "d", "--tasks", "qa1",
            "--lengths", "0k", "--device", "cpu", "--out", "o", cwd=tmp_path)
    assert (r.returncode == 2 and r.stderr.count("\n") == 1
            and "0k.json[0]: 'input' must be a string" in r.stderr)
    assert r.stdout == "" and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# study.py, python -m bench, and --help everywhere

@pytest.mark.parametrize("main,argv,needle", [
    (study.get_args, ["--out", ""], "study.py: error: --out: an empty path"),
    (study.get_args, ["--out", "f"], "study.py: error: --out f: a file"),
    (study.get_args, ["--books", "nowhere"],
     "study.py: error: --books: haystack folder nowhere does not exist"),
    (study.get_args, ["--quick", "2"], "study.py: error: unrecognized arguments: 2"),
    (bench.main, ["--sizes", "8192,abc"],
     "python -m bench: error: argument --sizes: expected an integer"),
    (bench.main, ["--tokens", "nan"], "python -m bench: error: argument --tokens"),
    (bench.main, ["--sections", "work", "--out", "."],
     "python -m bench: error: --out .: a folder, not a file"),
    (bench.main, ["--sections", "work", "--out", "no/b.json"],
     "python -m bench: error: --out no/b.json:"),
])
def test_study_and_bench_flags_are_one_line(tmp_path, monkeypatch, capsys, main, argv, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    assert refused(capsys, main, argv).startswith(needle)
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.parametrize("main,doc", [(train.main, train.__doc__),
                                      (eval_babilong.main, eval_babilong.__doc__),
                                      (eval_ruler.main, eval_ruler.__doc__),
                                      (study.get_args, study.__doc__), (bench.main, bench.__doc__)])
def test_help_shows_the_whole_description_and_every_default(capsys, main, doc):
    """--help prints the script's whole docstring (train.py's used to stop mid-sentence) and, for
    every flag, its default: argparse's "(default: X)", or for a default of None the help's own
    words."""
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert " ".join(doc.split()) in " ".join(text.split())
    flags = [" ".join(block.split()) for block in re.split(r"\n  (?=-)", text)[1:]
             if not block.startswith("-h")]
    assert len(flags) >= 5 and [f for f in flags if "default" not in f] == []


def test_train_help_names_each_default_a_machine_fills_in(capsys):
    """A flag whose default depends on the machine names both values in --help (it used to say
    "default by device"), from the same table (config.BY_DEVICE) that fills them in; the reasons
    printed for them quote no timings (they went stale: measurements live in docs/)."""
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert [name for name in config.BY_DEVICE if config.by_device(name) not in text] == []
    for device in ("cpu", "cuda"):                              # (a given --device: no GPU needed)
        why = config.apply_defaults(config.get_args(["--device", device]))
        timed = [w for w in why if re.search(r"\d\s*(ms|s|min|minutes|seconds)\b", w)]
        assert len(why) >= 8 and timed == [], timed


# --------------------------------------------------------------------------------------------------
# the README's commands and what they write

def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, `a && b` split in two."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [command.strip() for line in lines for command in line.split("&&") if command.strip()]


def test_the_readmes_training_commands_each_have_their_own_out():
    """Run top to bottom in a fresh clone, no training command (python or torchrun) finds its --out
    holding another's run (which train.py refuses): every new run (not --resume) names its own."""
    outs = []
    for command in readme_commands():
        words = command.split()
        if words[0] in ("python", "torchrun") and "train.py" in words and "--resume" not in words:
            outs.append(words[words.index("--out") + 1] if "--out" in words
                        else config.parser().get_default("out"))
    assert len(outs) >= 5 and len(set(outs)) == len(outs), outs


@pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "rev-parse"],
                                   capture_output=True).returncode != 0,
                    reason="not a git checkout")
def test_what_commands_write_is_ignored_by_git(tmp_path, monkeypatch):
    """The folders and files the scripts write by default (train.py's --out, study.py's, python -m
    bench's, the folder eval_babilong.py --data reads) and every --out or --make-data of the
    README's commands."""
    # (study.get_args tries its --out where it runs)
    monkeypatch.chdir(tmp_path)
    written = {config.parser().get_default("out"), study.get_args([]).out, "bench.json",
               "babilong_data", "ruler_data"}
    for command in readme_commands():
        words = command.split()
        written |= {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--make-data")}
    # folders end in "/" for git
    written = {w if w.endswith(".json") else w.rstrip("/") + "/" for w in written}
    check = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", *sorted(written)],
                           capture_output=True, text=True)
    assert set(check.stdout.split()) == written, written - set(check.stdout.split())


def test_requirements_hold_the_design_cards_packages():
    names = {re.split(r"[=<>\[ ]", line)[0]
             for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")}
    assert {"torch", "numpy", "tiktoken", "datasets", "pytest"} <= names
