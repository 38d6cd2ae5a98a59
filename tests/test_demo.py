"""`moe-unlearn demo --quick` end to end, through the CLI entry point."""

from __future__ import annotations

import json
import warnings

import pytest

from moe_unlearn.cli import main
from moe_unlearn.demo import DemoConfig, headline


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, bench_cache):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", bench_cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quick model is below the 95% target on purpose
        rc = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache)])
    return rc, out, cache


def test_quick_demo_reports_the_matched_forgetting_comparison(quick_demo):
    rc, out, cache = quick_demo
    assert rc == 0
    report = json.loads((out / "demo_report.json").read_text())
    frontier = json.loads((out / report["frontier_file"]).read_text())
    fc = DemoConfig.quick().frontier
    # every (method, variant, lr) ran once, from the original weights, on the quick bench model
    want = {(m, v, lr) for m in fc.methods for v in fc.variants for lr in fc.grid(v)}
    assert {(r["method"], r["variant"], r["lr"]) for r in frontier["runs"]} == want
    assert frontier["model"] == "natural" and frontier["quick"]
    # the headline names the premise numbers and one line per (method, variant)
    text = report["headline"]
    assert text == headline(frontier)
    # the replay probe ran for every run and its median shows in the headline
    assert all(0.0 <= r["forget_em_replay"] <= 1.0 for r in frontier["runs"])
    assert "replay EM" in text and "erased @level" in text
    assert f"covers {frontier['specialisation']['coverage']:.2f} of the forget tokens" in text
    n = len(fc.methods) * len(fc.variants)
    assert sum(1 for line in text.splitlines() if line.split()[:1] in ([m] for m in fc.methods)) == n
    assert len(report["matched"]) == n
    for m in report["matched"]:
        if "lr" in m:  # a matched point must really be at the forgetting level
            assert m["forget_em"] <= frontier["guess_level"] + 0.05 + 1e-9


def test_quick_demo_writes_every_report_file_and_caches_the_model(quick_demo):
    _, out, cache = quick_demo
    for name in ("demo_report.md", "frontier_natural_quick.json", "frontier_natural_quick.md",
                 "frontier_natural_quick.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Matched forgetting" in (out / "demo_report.md").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert len([p for p in cache.iterdir() if (p / "bench_meta.json").is_file()]) == 1


def test_demo_replaces_its_own_output_but_refuses_an_out_dir_it_did_not_write(quick_demo, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    assert "not an earlier demo output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "cache").exists()
