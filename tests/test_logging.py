"""Logging: levels on the CLI, metrics sinks of the training loop (jsonl always, TensorBoard where
installed, read back offline), and TrainingArguments names in run files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.cli import main
from moe_unlearn.config_aliases import apply_aliases
from moe_unlearn.errors import BadInputError
from moe_unlearn.log import level_for, open_sinks
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainConfig, train
from moe_unlearn.unlearning.config import UnlearnConfig, read_run_file


def _fit(tmp_path, report_to):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    target = torch.arange(4.0)
    batches = [torch.randn(3, 4) for _ in range(2)]

    def loss_fn(x):
        err = x @ w - x @ target
        return {"loss": (err ** 2).mean(), "abs": err.abs().mean()}

    cfg = TrainConfig(steps=5, lr=0.1, progress=False, report_to=report_to, logging_dir=str(tmp_path / "logs"),
                      lr_schedule="linear")
    return train([w], loss_fn, batches, cfg)


def test_jsonl_sink_records_every_step(tmp_path):
    hist = _fit(tmp_path, "jsonl")
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == hist.steps == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == pytest.approx(hist.terms["loss"], rel=1e-12)
    assert [r["lr"] for r in rows] == hist.lr and [r["grad_norm"] for r in rows] == hist.grad_norm
    assert rows[0]["lr"] > rows[-1]["lr"]  # the linear schedule, as recorded


def test_tensorboard_sink_offline(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", exc_type=ImportError)
    event_acc = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    hist = _fit(tmp_path, ["tensorboard"])
    acc = event_acc.EventAccumulator(str(tmp_path / "logs"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == hist.steps
    assert [e.value for e in loss] == pytest.approx(hist.terms["loss"], rel=1e-6)


def test_sink_errors():
    with pytest.raises(BadInputError, match="unknown report_to"):
        open_sinks("wandb", "x")
    with pytest.raises(BadInputError, match="needs logging_dir"):
        TrainConfig(steps=1, report_to="jsonl").validate()
    assert open_sinks("none", None) == []


def test_levels_and_cli_flags(tmp_path, capsys):
    assert level_for(0) == logging.WARNING and level_for(1) == logging.INFO and level_for(2) == logging.DEBUG
    assert level_for(2, quiet=True) == logging.ERROR
    model_dir = tmp_path / "model"
    tiny_model("olmoe").save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(" ".join(f"w{(i + j) % 20}" for j in range(8)) for i in range(4)))
    common = ["unlearn", "--model", str(model_dir), "--forget", str(forget), "--target", "1:2", "--steps", "3",
              "--quiet", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "moe-unlearn: " not in capsys.readouterr().err  # default: warnings and errors only
    assert main(["-vv", *common, "--out", str(tmp_path / "b"), "--report-to", "jsonl",
                 "--logging-dir", str(tmp_path / "logs")]) == 0
    err = capsys.readouterr().err
    assert "DEBUG: step 3:" in err and "INFO: unlearn npo/uoe: 3 steps in" in err
    assert len((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "b" / "patch.json").read_text())["config"]["report_to"] == "jsonl"
    logging.getLogger("moe_unlearn").setLevel(logging.WARNING)


def test_training_arguments_names_in_run_files(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("learning_rate: 3.0e-5\nmax_steps: 40\ngradient_accumulation_steps: 2\n"
                   "per_device_train_batch_size: 8\nlr_scheduler_type: cosine\nmethod: npo\n")
    cfg = UnlearnConfig.from_dict(read_run_file(run))
    assert (cfg.lr, cfg.steps, cfg.grad_accum, cfg.batch_size, cfg.lr_schedule) == (3e-5, 40, 2, 8, "cosine")
    assert apply_aliases({"num_train_epochs": 2.0}) == {"epochs": 2, "steps": None}
    with pytest.raises(BadInputError, match="both learning_rate"):
        apply_aliases({"learning_rate": 1e-4, "lr": 1e-3})
    run.write_text("learning_rate: 1.0e-4\nlr: 1.0e-3\n")
    rc = main(["unlearn", "--config", str(run), "--model", "m", "--forget", "f", "--out", str(tmp_path / "o")])
    assert rc == 2
