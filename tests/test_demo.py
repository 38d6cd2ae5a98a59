"""`moe-unlearn demo --quick` end to end, through the CLI entry point."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from moe_unlearn.cli import main
from moe_unlearn.demo import DemoConfig, DemoRow, _slug, format_table

RUNS = ["original", "ga/full", "ga/uoe", "ga/uoe+kpb", "npo/full", "npo/uoe", "npo/uoe+kpb"]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quick model is below the 95% target on purpose
        rc = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    return rc, out, cache


def test_quick_demo_writes_a_report_with_valid_numbers(quick_demo):
    rc, out, cache = quick_demo
    assert rc == 0
    report = json.loads((out / "demo_report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == RUNS
    for name, r in rows.items():
        for key in ("forget_em", "retain_em", "neighbor_em", "holdout_em", "mia_auc", "overlap_forget",
                    "overlap_retain"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert math.isfinite(r["forget_nll"]) and r["forget_nll"] > 0
        assert r["unlearn_seconds"] >= 0
    original = rows["original"]
    assert original["overlap_forget"] == 1.0 and original["overlap_retain"] == 1.0
    assert original["trainable_params"] == 0
    n_params = report["model_meta"]["num_parameters"]
    layer, expert = report["target"]
    for method in ("ga", "npo"):
        full, uoe = rows[f"{method}/full"], rows[f"{method}/uoe"]
        assert full["trainable_params"] == n_params
        assert 0 < uoe["trainable_params"] < n_params / 5
        assert uoe["targets"] == [f"{layer}:{expert}"]
        assert full["lr"] == uoe["lr"] and full["steps"] == uoe["steps"]  # same hyperparameters per method
        # uoe + knowledge-preserving expert balancing: the same run plus the retain-routing term
        kpb = rows[f"{method}/uoe+kpb"]
        assert kpb["retain_routing_weight"] == DemoConfig.quick().kpb_weight > 0
        assert full["retain_routing_weight"] == uoe["retain_routing_weight"] == 0
        assert (kpb["lr"], kpb["steps"], kpb["trainable_params"], kpb["targets"]) == \
            (uoe["lr"], uoe["steps"], uoe["trainable_params"], uoe["targets"])
        assert "retain_routing" in kpb["final_terms"] and "retain_routing" not in uoe["final_terms"]
        assert math.isfinite(kpb["final_terms"]["retain_routing"]) and kpb["final_terms"]["retain_routing"] >= 0
        # its retain routing overlap is reported: all layers and the target layer where the term acts
        for r in (kpb, uoe):
            assert 0.0 <= r["overlap_retain_target_layer"] <= 1.0
        run_report = json.loads((out / "runs" / _slug(f"{method}/uoe+kpb") / "report.json").read_text())
        overlap = run_report["routing"]["retain"]["overlap"]
        assert len(overlap) == report["config"]["bench"]["num_layers"]
        assert sum(overlap) / len(overlap) == pytest.approx(kpb["overlap_retain"])
        patch_meta = json.loads((out / "patches" / _slug(f"{method}/uoe+kpb") / "patch.json").read_text())
        assert patch_meta["hyperparameters"]["retain_routing_weight"] == kpb["retain_routing_weight"]
    assert original["overlap_retain_target_layer"] == 1.0
    # full-model gradient ascent must move the forget loss up
    assert rows["ga/full"]["forget_nll"] > original["forget_nll"]


def test_quick_demo_writes_every_report_file(quick_demo):
    _, out, cache = quick_demo
    for name in ("demo_report.md", "demo_summary.png", "attribution.json", "attribution.png"):
        assert (out / name).stat().st_size > 0, name
    for run in RUNS:
        d = out / "runs" / _slug(run)
        assert (d / "report.json").is_file() and (d / "routing_overlap.png").is_file(), run
    for run in RUNS[1:]:
        assert any((out / "patches" / _slug(run)).iterdir()), run
    md = (out / "demo_report.md").read_text()
    assert all(f"| {run} |" in md for run in RUNS)
    assert "`+kpb`" in md
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    # the model is cached for the next run
    assert len([p for p in cache.iterdir() if (p / "bench_meta.json").is_file()]) == 1


def test_demo_refuses_an_out_dir_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 2
    assert "not an earlier demo output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "cache").exists()


def test_table_has_one_line_per_run():
    row = DemoRow(name="ga/uoe", method="ga", scope="uoe", lr=1e-4, steps=3, forget_em=0.25, retain_em=1.0,
                  neighbor_em=0.5, holdout_em=0.0, forget_nll=2.5, retain_nll=0.1, mia_auc=0.75,
                  overlap_forget=0.9, overlap_retain=0.99, trainable_params=12345, unlearn_seconds=1.25,
                  eval_seconds=0.5)
    text = format_table([row]).splitlines()
    assert len(text) == 3 and text[2].split()[:6] == ["ga/uoe", "0.250", "1.000", "0.500", "2.50", "0.750"]
    assert "0.900/0.990" in text[2] and "12,345" in text[2]
    md = format_table([row], markdown=True).splitlines()
    assert md[2].startswith("| ga/uoe | 0.250 | 1.000 |")


def test_tradeoff_plot_is_written(tmp_path):
    from moe_unlearn.demo import _plot_tradeoff

    def row(name, method, scope, lr, f, r):
        return DemoRow(name=name, method=method, scope=scope, lr=lr, steps=1, forget_em=f, retain_em=r,
                       neighbor_em=r, holdout_em=0.0, forget_nll=1.0, retain_nll=1.0, mia_auc=0.5,
                       overlap_forget=1.0, overlap_retain=1.0, trainable_params=1, unlearn_seconds=0.0,
                       eval_seconds=0.0)

    rows = [row("original", None, None, None, 1.0, 1.0), row("ga/full", "ga", "full", 1e-3, 0.1, 0.5),
            row("ga/full@0.01", "ga", "full", 1e-2, 0.0, 0.0), row("ga/uoe", "ga", "uoe", 1e-3, 0.9, 1.0)]
    _plot_tradeoff(rows, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
