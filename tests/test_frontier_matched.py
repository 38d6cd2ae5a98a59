"""Matched forgetting by interpolation along each variant's frontier, and summaries over realizations."""

from __future__ import annotations

import pytest

from moe_unlearn.bench_model import bench_config
from moe_unlearn.bench_model.build import BenchModelConfig, realize
from moe_unlearn.errors import BadInputError
from moe_unlearn.frontier import (
    FrontierConfig,
    interpolated,
    realization_summary,
    results_path,
    summarize,
    summarize_realizations,
)


def _run(method, variant, lr, forget, utility, seed=0, steps=40):
    return {"method": method, "variant": variant, "lr": lr, "seed": seed, "steps": steps, "forget_em": forget,
            "utility_em": utility, "neighbor_em": utility, "overlap_retain": 1.0}


def _data(runs, guess=0.1, realization=0):
    return {"model": "natural", "realization": realization, "guess_level": guess, "device": "cpu", "runs": runs,
            "original": {"forget_em": 1.0, "utility_em": 0.9, "neighbor_em": 0.9}}


def test_interpolation_reads_every_variant_at_the_same_forget_level():
    # level = 0.1 + 0.05 = 0.15; full crosses it between lr 1e-3 (0.35, 0.80) and 3e-3 (0.05, 0.60)
    runs = [_run("npo", "full", 1e-4, 0.9, 0.9), _run("npo", "full", 1e-3, 0.35, 0.8), _run("npo", "full", 3e-3, 0.05, 0.6),
            _run("npo", "uoe", 1e-3, 0.8, 0.9), _run("npo", "uoe", 1e-2, 0.5, 0.85),  # never reaches 0.15
            _run("npo", "topm", 1e-3, 0.1, 0.7), _run("npo", "topm", 1e-2, 0.0, 0.5)]  # always below
    got = interpolated(_data(runs))
    full = got[("npo", "full", 40)]
    assert full["status"] == "interpolated" and full["between"] == [1e-3, 3e-3]
    assert full["utility_em"] == pytest.approx(0.8 + (0.35 - 0.15) / (0.35 - 0.05) * (0.6 - 0.8))
    assert got[("npo", "uoe", 40)]["status"] == "never reached" and "utility_em" not in got[("npo", "uoe", 40)]
    below = got[("npo", "topm", 40)]
    assert below["status"] == "always below" and below["utility_em"] == 0.7 and below["forget_em"] == 0.1
    md = summarize({**_data(runs), "specialisation": {}})
    assert "never reached" in md and "Matched forgetting by interpolation (forget EM = 0.150)" in md


def test_interpolation_uses_seed_medians_and_points_on_the_level():
    runs = [_run("ga", "full", 1e-3, f, u, seed=s) for s, (f, u) in enumerate([(0.15, 0.7), (0.2, 0.9), (0.1, 0.1)])]
    runs += [_run("ga", "full", 1e-2, 0.0, 0.2)]
    got = interpolated(_data(runs))[("ga", "full", 40)]  # medians at 1e-3: forget 0.15 (on the level), utility 0.7
    assert got["status"] == "interpolated" and got["utility_em"] == pytest.approx(0.7)


def test_erased_interpolation_counts_forgetting_that_replay_undoes():
    runs = [_run("npo", "uoe", 1e-3, 0.6, 0.9), _run("npo", "uoe", 1e-2, 0.0, 0.7),
            _run("npo", "full", 1e-3, 0.6, 0.9), _run("npo", "full", 1e-2, 0.0, 0.6)]
    runs[0]["forget_em_replay"], runs[1]["forget_em_replay"] = 0.9, 0.45  # uoe hides: replay brings it back
    runs[2]["forget_em_replay"], runs[3]["forget_em_replay"] = 0.6, 0.0
    plain = interpolated(_data(runs))
    erased = interpolated(_data(runs), erased=True)
    assert plain[("npo", "uoe", 40)]["status"] == "interpolated"
    assert erased[("npo", "uoe", 40)]["status"] == "never reached"  # its erased level never falls below 0.45
    assert erased[("npo", "full", 40)]["utility_em"] == pytest.approx(plain[("npo", "full", 40)]["utility_em"])
    s = realization_summary([_data(runs)], erased=True)
    assert s["erased"] and {(r["variant"], r["not_reached"]) for r in s["rows"]} == {("uoe", 1), ("full", 0)}
    assert "under replay" in summarize_realizations([_data(runs)], erased=True)


def test_realization_summary_medians_and_gaps():
    results = []
    for r, (uf, uu) in enumerate([(0.6, 0.7), (0.5, 0.8), (0.7, 0.65)]):
        runs = [_run("npo", "full", 1e-3, 0.5, 0.9), _run("npo", "full", 1e-2, 0.0, uf),
                _run("npo", "uoe", 1e-3, 0.5, 0.9), _run("npo", "uoe", 1e-2, 0.0, uu)]
        results.append(_data(runs, guess=0.2 - 0.05, realization=r))  # level 0.2: 60% of the way to 1e-2
    s = realization_summary(results)
    rows = {(r["method"], r["variant"]): r for r in s["rows"]}
    full = [0.9 + 0.6 * (u - 0.9) for u in (0.6, 0.5, 0.7)]
    uoe = [0.9 + 0.6 * (u - 0.9) for u in (0.7, 0.8, 0.65)]
    assert rows[("npo", "full")]["per_realization"] == pytest.approx(full)
    assert rows[("npo", "full")]["median"] == pytest.approx(sorted(full)[1])
    gaps = [a - b for a, b in zip(uoe, full, strict=True)]
    assert rows[("npo", "uoe")]["gap_median"] == pytest.approx(sorted(gaps)[1])
    assert rows[("npo", "uoe")]["gap_range"] == pytest.approx([min(gaps), max(gaps)])
    assert "natural#r2" in summarize_realizations(results)
    with pytest.raises(BadInputError):
        realization_summary([])


def test_realizations_are_other_builds():
    base, r1, r2 = (bench_config("natural", realization=r) for r in (0, 1, 2))
    assert len({base.digest(), r1.digest(), r2.digest()}) == 3
    assert r1.facts.forget_domain == base.facts.forget_domain and r2.facts.forget_domain != base.facts.forget_domain
    assert bench_config("implanted", realization=1).retrained().digest() == \
        realize(BenchModelConfig.moe_blocks(), 1).retrained().digest()
    assert results_path("x", "natural", realization=2).name == "frontier_natural_r2.json"
    with pytest.raises(BadInputError):
        FrontierConfig(realization=-1).validate()
    with pytest.raises(BadInputError):
        bench_config("natural", realization=-2)
