"""Bounds on what comes in: data files no larger than a documented limit, lengths and counts no larger than a
declared maximum (generation lengths no longer than the model's positions), all checked before the model
loads; and a Ctrl-C that lands inside an import still exits 130, quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _hardening_common import FORGET, forbid_model_load, save_tiny, stderr_without_traceback

from moe_unlearn.cli import main
from moe_unlearn.data import load_examples, load_records
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.validate import MAX_DATA_BYTES_ENV, MAX_STEPS, MAX_TOKENS, max_data_bytes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("limits"))


_err = stderr_without_traceback
_no_model_load = forbid_model_load


# -- data files: a documented size limit ------------------------------------------------------------

@pytest.mark.parametrize("raw, value", [("2048", 2048), ("2K", 2048), ("3m", 3 << 20), ("1GiB", 1 << 30),
                                        ("5 MB", 5 << 20), ("x", None), ("G", None), ("0", None), ("-5", None), ("1.5G", None)])
def test_the_data_limit_is_read_strictly(monkeypatch, raw, value):
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, raw)
    if value is None:
        with pytest.raises(BadInputError, match=MAX_DATA_BYTES_ENV):
            max_data_bytes()
    else:
        assert max_data_bytes() == value


def test_data_files_over_the_limit_are_refused_before_reading(tmp_path, monkeypatch):
    lines = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(40)]
    files = {"d.txt": "\n".join(FORGET * 5), "d.jsonl": "\n".join(lines), "d.json": json.dumps(FORGET * 5)}
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "100")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        for read in (load_records, load_examples):
            with pytest.raises(DataError, match=f"more than the 100 bytes.*{MAX_DATA_BYTES_ENV}"):
                read(path)
        assert str(path) not in opened  # refused on its size, before anything was read
    # read for its first records only, a large .txt/.jsonl streams up to the limit and no further
    assert load_records(tmp_path / "d.txt", limit=2) == [{"text": FORGET[0]}, {"text": FORGET[1]}]
    assert len(load_examples(tmp_path / "d.jsonl", limit=1)) == 1
    with pytest.raises(DataError, match="holds more than the 100 bytes"):
        load_records(tmp_path / "d.jsonl", limit=30)
    with pytest.raises(DataError, match="more than"):  # a .json file is parsed whole: its size always counts
        load_records(tmp_path / "d.json", limit=1)
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "1M")
    assert len(load_records(tmp_path / "d.jsonl")) == 40


def test_line_endings_are_read_as_before(tmp_path):
    (tmp_path / "d.txt").write_bytes(b"a\r\nb\rc\n\n  \nd")
    assert [r["text"] for r in load_records(tmp_path / "d.txt")] == ["a", "b", "c", "d"]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_records(tmp_path / "bad.txt")


def test_the_cli_refuses_large_data_before_the_model_loads(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    _no_model_load(monkeypatch)
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "64")
    m, f = str(model_dir), str(forget)
    for argv in (["attribute", "--model", m, "--data", f, "--out", str(tmp_path / "a")],
                 ["unlearn", "--model", m, "--forget", f, "--target", "1:2", "--out", str(tmp_path / "u"), "--quiet"],
                 ["evaluate", "--model", m, "--forget", f, "--retain", f, "--out", str(tmp_path / "e"), "--quiet"]):
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert MAX_DATA_BYTES_ENV in err and "64 bytes" in err, err
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "lots")
    assert main(["attribute", "--model", m, "--data", f, "--out", str(tmp_path / "a")]) == 2
    assert "is not a size" in _err(capsys)
    assert not any(tmp_path.iterdir())


# -- lengths and counts: declared maxima, generation within the model's positions --------------------

def test_every_config_declares_the_maxima_of_its_counts():
    from moe_unlearn.eval.relearn import RelearnConfig
    from moe_unlearn.frontier import FrontierConfig
    from moe_unlearn.locate import LocateConfig
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.loramoe.finetune import FinetuneConfig
    from moe_unlearn.training import TrainConfig
    from moe_unlearn.unlearning.config import UnlearnConfig

    big = MAX_STEPS + 1
    cases = [
        (lambda: FrontierConfig(steps=(40, big)).validate(), r"steps\[1\] must be <="),
        (lambda: FrontierConfig(max_length=MAX_TOKENS + 1).validate(), "max_length must be <="),
        (lambda: FrontierConfig(seeds=tuple(range(20_000))).validate(), "more than the 10000 allowed"),
        (lambda: RelearnConfig(steps=big).validate(), "relearn steps must be <="),
        (lambda: RelearnConfig(eval_every=2**40).validate(), "relearn eval_every must be <="),
        (lambda: LocateConfig(sample=10**12).validate(), "sample must be <="),
        (lambda: LocateConfig(sample="96").validate(), "sample must be an integer"),
        (lambda: LocateConfig(middle=(1, -2)).validate(), r"middle\[1\] must be >= 0"),
        (lambda: FinetuneConfig(steps=big), "steps must be <="),
        (lambda: FinetuneConfig(max_length=MAX_TOKENS * 2), "max_length must be <="),
        (lambda: LoRAMoEConfig(num_experts=10**9), "num_experts must be <="),
        (lambda: LoRAMoEConfig(num_experts=4, groups=[2, 0, 2]), r"groups\[1\] must be >= 1"),
        (lambda: TrainConfig(steps=big).validate(), "TrainConfig.steps must be <="),
        (lambda: TrainConfig(steps=1, warmup_steps=big).validate(), "TrainConfig.warmup_steps must be <="),
        (lambda: UnlearnConfig.from_dict({"steps": big}), "steps must be <="),
        (lambda: UnlearnConfig.from_dict({"distill_steps": big}), "distill_steps must be <="),
        (lambda: UnlearnConfig.from_dict({"max_length": MAX_TOKENS + 1}), "max_length must be <="),
    ]
    for make, match in cases:
        with pytest.raises(BadInputError, match=match):
            make()
    FrontierConfig(steps=(MAX_STEPS,)).validate()  # the maxima themselves are accepted
    TrainConfig(steps=MAX_STEPS).validate()


def test_generation_lengths_are_bounded_before_the_model_loads(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    positions = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    _no_model_load(monkeypatch)
    base = ["evaluate", "--model", str(model_dir), "--forget", str(forget), "--retain", str(forget), "--out",
            str(tmp_path / "e"), "--quiet"]
    for flags, word in ((["--max-new-tokens", str(positions + 1)], f"model's {positions} positions"),
                        (["--verbmem-max-new-tokens", str(positions * 4)], f"model's {positions} positions"),
                        (["--max-new-tokens", str(10**12)], "must be <="),
                        (["--max-new-tokens", "-1"], "must be >= 0"),
                        (["--verbmem-max-new-tokens", "0"], "must be >= 1"),
                        (["--batch-size", str(10**12)], "must be <=")):
        assert main(base + flags) == 2, flags
        assert word in _err(capsys), flags
    for flags in (["--steps", str(MAX_STEPS + 1)], ["--batch-size", "0"]):
        assert main(["frontier", "--quick", "--out", str(tmp_path / "f.json"), *flags]) == 2, flags
        assert "must be" in _err(capsys)
    assert not any(tmp_path.iterdir())


def test_generation_lengths_through_the_api():
    import torch
    from _tiny_tokenizer import word_tokenizer

    from moe_unlearn.eval import evaluate
    from moe_unlearn.eval.generation import greedy_generate
    from moe_unlearn.testing import tiny_model

    model, tok = tiny_model("qwen3_moe"), word_tokenizer()
    positions = model.config.max_position_embeddings
    for kw, match in ((dict(max_new_tokens=positions + 1), "positions"), (dict(max_new_tokens=2.5), "integer"),
                      (dict(verbmem_max_new_tokens=10**9), "must be <="), (dict(batch_size=True), "integer")):
        with pytest.raises(BadInputError, match=match):
            evaluate(model, tok, forget=FORGET, progress=False, **kw)
    evaluate(model, tok, forget=FORGET[:1], generate=False, max_new_tokens=10**9, progress=False)  # unused: fine
    with pytest.raises(BadInputError, match="positions"):
        greedy_generate(model, tok, [[1, 2], [3]], [2, positions + 5], progress=False)
    with pytest.raises(BadInputError, match="integer"):
        greedy_generate(model, tok, [[1, 2]], "4", progress=False)
    out = greedy_generate(model, tok, [[1, 2], [3]], [2, 0], progress=False)
    assert len(out[0]) <= 2 and out[1] == [] and torch.is_tensor(torch.tensor(out[0]))


# -- Ctrl-C inside an import -------------------------------------------------------------------------

_SCRIPT = """
import sys, time
sys.path.insert(0, {lib!r})
from moe_unlearn import cli

def run(args):
    import swallowing_lib  # like a lazy loader: turns anything raised while importing into an ImportError
    time.sleep(0.8)  # the work after the import
    return 0

def light_parser():  # the real commands' parser imports torch: seconds per process
    import argparse
    parser = argparse.ArgumentParser(prog="moe-unlearn")
    parser.add_argument("-v", dest="verbose", action="count", default=0)
    parser.add_argument("-q", dest="log_quiet", action="store_true")
    parser.add_subparsers(dest="command", required=True).add_parser("slow").set_defaults(_run=run)
    return parser

cli.build_parser = light_parser
print("ready", flush=True)
sys.exit(cli.main(["slow"]))
"""

_LIB = """
import time
try:
    end = time.time() + 0.8
    while time.time() < end:
        pass
except BaseException as exc:
    raise ImportError("swallowing_lib could not be imported") from exc
"""


def test_a_ctrl_c_during_imports_or_work_exits_130_quietly(tmp_path):
    (tmp_path / "swallowing_lib.py").write_text(_LIB)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(lib=str(tmp_path))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    delays = (0.0, 0.15, 0.45, 1.2)  # parsing, early and late in the import, during the work after it
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in delays]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()  # the processes start together; each signal goes at its delay after "ready"
    for delay, p in zip(delays, procs, strict=True):
        time.sleep(max(0.0, delay - (time.monotonic() - t0)))
        p.send_signal(signal.SIGINT)
    procs = list(zip(delays, procs, strict=True))
    for delay, p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 130, (delay, p.returncode, err)
        assert "Traceback" not in err and "ImportError" not in err, (delay, err)
        assert err.strip().endswith("interrupted; no half-written output was left"), (delay, err)


# -- the third round's probes: run files, strings, launcher variables, layers, cached weights -----------

def test_run_files_go_through_the_checked_readers(tmp_path):
    from moe_unlearn.config_aliases import apply_aliases
    from moe_unlearn.unlearning.config import UnlearnConfig, read_run_file

    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "inputs.json").write_text(json.dumps({"config": {"steps": 1}, "inputs": [1, 2]}))
    (tmp_path / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    (tmp_path / "nan.json").write_text('{"lr": NaN}')
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 1_500 + "]" * 1_500)
    for name, word in (("fifo.yaml", "FIFO"), ("inputs.json", "must be a mapping"), ("deep.json", "too deeply"),
                       ("nan.json", "not a finite number"), ("missing.yaml", "does not exist")):
        with pytest.raises(BadInputError, match=word):
            read_run_file(tmp_path / name)
    with pytest.raises(BadInputError):  # PyYAML's own nesting limit or ours: one error either way
        UnlearnConfig.from_dict(read_run_file(tmp_path / "deep.yaml"))
    for options in ({"template": "Q: {question}\ud800"}, {"field": "\udcff"}, {"lr_scheduler_type": [1]},
                    {"lr_scheduler_type": {"a": 1}}, {"learning_rate": [1]}):
        with pytest.raises(BadInputError):  # a lone surrogate would be written to patch.json and never read back
            UnlearnConfig.from_dict(apply_aliases(options))
    assert UnlearnConfig.from_dict(apply_aliases({"lr_scheduler_type": "constant_with_warmup"})).lr_schedule == \
        "constant"


@pytest.mark.parametrize("raw, ok", [("4", 4), ("", 1), ("abc", None), ("-1", None), ("0", None), ("9" * 30, None)])
def test_launcher_variables_are_read_strictly(monkeypatch, raw, ok):
    from moe_unlearn.validate import env_int

    monkeypatch.setenv("WORLD_SIZE", raw)
    if ok is None:
        with pytest.raises(BadInputError, match="WORLD_SIZE"):
            env_int("WORLD_SIZE", 1, low=1)
    else:
        assert env_int("WORLD_SIZE", 1, low=1) == ok


def test_layers_the_model_lacks_are_refused(saved, tmp_path, capsys, monkeypatch):
    from moe_unlearn.locate import LocateConfig, ModelParts
    from moe_unlearn.testing import tiny_model

    parts = ModelParts(tiny_model("qwen3_moe"))
    for middle in ((0, 99), (parts.num_layers,)):
        with pytest.raises(BadInputError, match="the model has"):
            parts.components(LocateConfig(middle=middle))
    assert parts.components(LocateConfig(middle=(0, 1)))
    _, model_dir, _ = saved
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "w1 w2", "answer": "w3"}) + "\n")
    _no_model_load(monkeypatch)
    assert main(["locate", "--model", str(model_dir), "--forget", str(qa), "--utility", str(qa), "--out",
                 str(tmp_path / "loc"), "--middle", "0,99"]) == 2
    assert "--middle names layer(s) [99]" in _err(capsys)
    assert not (tmp_path / "loc").exists()


def test_bench_entries_are_verified_against_their_recorded_weights(tmp_path):
    import shutil

    from moe_unlearn.bench_model import bench_config, load_bench_model
    from moe_unlearn.bench_model.build import shipped_path

    shipped = shipped_path(bench_config("natural"))
    good, bad, meta = tmp_path / "good", tmp_path / "bad", tmp_path / "meta"
    for d in (good, bad, meta):
        shutil.copytree(shipped, d)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: still a valid file, other numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="changed or damaged.*--rebuild"):
        load_bench_model(bad)
    (meta / "bench_meta.json").write_text(json.dumps({"config": 1}))
    with pytest.raises(BadInputError, match="not the metadata of a benchmark model"):
        load_bench_model(meta)
    assert load_bench_model(good).meta["weights_sha256"]


def test_reports_and_loramoe_data_are_read_through_the_checks(tmp_path, monkeypatch):
    from moe_unlearn.eval.report import EvalReport
    from moe_unlearn.loramoe.finetune import load_finetune_records

    (tmp_path / "r.json").write_text(json.dumps({"splits": 3}))
    os.mkfifo(tmp_path / "fifo.json")
    for name, word in (("r.json", "not a report.json"), ("fifo.json", "FIFO")):
        with pytest.raises(DataError, match=word):
            EvalReport.from_json(tmp_path / name)
    lines = "\n".join(json.dumps({"prompt": "w1", "response": "w2"}) for _ in range(20))
    (tmp_path / "d.jsonl").write_text(lines)
    monkeypatch.setenv(MAX_DATA_BYTES_ENV, "64")
    with pytest.raises(DataError, match=MAX_DATA_BYTES_ENV):
        load_finetune_records(tmp_path / "d.jsonl")
    monkeypatch.delenv(MAX_DATA_BYTES_ENV)
    assert len(load_finetune_records(tmp_path / "d.jsonl")) == 20
