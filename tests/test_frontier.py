"""The frontier harness: step counts read from one trajectory, resume, the matched-forgetting rule,
bad input; the premise numbers of attribution on a hand case."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.attribution import Attribution, PremiseWarning, select_targets
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError, DataError
from moe_unlearn.frontier import (
    FrontierConfig,
    matched,
    results_path,
    run_frontier,
    summarize,
)
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning import unlearn

TOK = word_tokenizer()
FORGET = [{"question": f"w{i} w{i + 1}", "answer": f"w{40 + i}"} for i in range(6)] + \
    [" ".join(f"w{(i * 7 + j) % 40}" for j in range(8)) for i in range(4)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(8)) for i in range(6)]


class _Grab(TrainHooks):
    def __init__(self, model, at):
        self.model, self.at, self.state = model, at, None

    def after_step(self, step):
        if step == self.at:
            self.state = {n: p.detach().clone() for n, p in self.model.named_parameters()}


@pytest.mark.parametrize("scope", ["full", "uoe"])
def test_step_n_of_a_longer_constant_lr_run_is_an_n_step_run(scope):
    kw = dict(tokenizer=TOK, method="npo", scope=scope, target="1:2" if scope == "uoe" else None, lr=3e-3,
              batch_size=3, max_length=16, seed=3, progress=False)
    short = tiny_model("qwen3_moe")
    unlearn(short, FORGET, RETAIN, steps=4, **kw)
    long = tiny_model("qwen3_moe")
    grab = _Grab(long, 4)
    unlearn(long, FORGET, RETAIN, steps=9, callbacks=[grab], **kw)
    assert all(torch.equal(p, grab.state[n]) for n, p in short.named_parameters())
    assert any(not torch.equal(p, grab.state[n]) for n, p in long.named_parameters())


@pytest.fixture(scope="module")
def quick_frontier(tmp_path_factory, bench_cache):
    root = tmp_path_factory.mktemp("frontier")
    cfg = FrontierConfig(model="natural", methods=("ga",), variants=("full", "uoe"),
                         lrs={"full": (1e-3,), "uoe": (1e-2, 3e-2)}, steps=(2, 4), seeds=(0,), batch_size=8,
                         quick=True, probes=("replay", "paraphrase"))
    logs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_frontier(cfg, out_dir=root / "out", cache_dir=bench_cache, log=logs.append)
    return cfg, root, res, logs


def test_results_file_has_the_documented_fields(quick_frontier):
    cfg, root, res, _ = quick_frontier
    data = json.loads(results_path(root / "out", "natural", quick=True).read_text())
    assert {"model", "device", "guess_level", "original", "runs", "specialisation"} <= set(data)
    assert data["guess_level"] == data["original"]["holdout_em"]
    assert len(data["runs"]) == 3 * 2  # 3 (variant, lr) trajectories x 2 step counts
    fields = {"method", "variant", "scope", "lr", "steps", "seed", "forget_em", "utility_em", "neighbor_em",
              "holdout_em", "forget_nll", "utility_nll", "overlap_forget", "overlap_retain", "trainable_params",
              "seconds", "forget_em_replay", "forget_nll_replay", "paraphrase_em", "completion_em"}
    # the original replayed on its own routing is itself
    assert data["original"]["forget_em_replay"] == data["original"]["forget_em"]
    assert data["original"]["forget_nll_replay"] == pytest.approx(data["original"]["forget_nll"], abs=1e-5)
    for r in data["runs"]:
        assert fields <= set(r), fields - set(r)
        for k in ("forget_em", "utility_em", "neighbor_em", "holdout_em", "overlap_forget", "overlap_retain"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
    full = [r for r in data["runs"] if r["variant"] == "full"]
    uoe = [r for r in data["runs"] if r["variant"] == "uoe"]
    assert full[0]["trainable_params"] > 10 * uoe[0]["trainable_params"]
    assert {r["targets"][0] for r in uoe} == {"{}:{}".format(*data["target"])}
    spec = data["specialisation"]
    assert 0 <= spec["coverage"] <= 1 and spec["selectivity"] > 0 and len(spec["per_layer"]) == 2
    for suffix in (".md", ".png"):
        assert results_path(root / "out", "natural", quick=True).with_suffix(suffix).stat().st_size > 0
    # an unlearned model does not forget less at step 4 than the original knows
    assert all(r["forget_em"] <= data["original"]["forget_em"] for r in data["runs"])


def test_rerun_resumes_and_only_runs_what_is_missing(quick_frontier, bench_cache):
    cfg, root, res, _ = quick_frontier
    path = results_path(root / "out", "natural", quick=True)
    before = json.loads(path.read_text())
    logs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_frontier(cfg, out_dir=root / "out", cache_dir=bench_cache, log=logs.append)
    assert any("0 trajectories to run" in line for line in logs)
    assert json.loads(path.read_text())["runs"] == before["runs"]
    more = FrontierConfig(**{**cfg.__dict__, "seeds": (0, 1)})
    logs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_frontier(more, out_dir=root / "out", cache_dir=bench_cache, log=logs.append)
    assert any("3 trajectories to run" in line for line in logs)
    after = json.loads(path.read_text())["runs"]
    assert after[: len(before["runs"])] == before["runs"] and {r["seed"] for r in after} == {0, 1}
    # another seed gives another run (seeds mean something)
    key = lambda r: (r["variant"], r["lr"], r["steps"])  # noqa: E731
    s0 = {key(r): r["utility_nll"] for r in after if r["seed"] == 0}
    s1 = {key(r): r["utility_nll"] for r in after if r["seed"] == 1}
    assert any(s0[k] != s1[k] for k in s0)


def test_a_results_file_of_another_model_is_refused(tmp_path):
    path = results_path(tmp_path, "natural", quick=True)
    path.write_text(json.dumps({"model": "localized", "runs": []}))
    with pytest.raises(DataError, match="not a frontier result of model 'natural'"):
        run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)
    path.write_text("{not json")
    with pytest.raises(DataError):
        run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)


def _run(variant, lr, seed, forget, utility, steps=40):
    return {"method": "npo", "variant": variant, "lr": lr, "seed": seed, "steps": steps, "forget_em": forget,
            "utility_em": utility, "neighbor_em": utility, "overlap_retain": 1.0}


def test_matched_forgetting_rule_by_hand():
    runs = []
    # full: lr 1e-3 forgets (median forget 0.10 <= 0.1 + 0.05) with median utility 0.50; lr 1e-4 does not forget
    for seed, (f, u) in enumerate([(0.1, 0.5), (0.05, 0.4), (0.2, 0.6)]):
        runs.append(_run("full", 1e-3, seed, f, u))
    for seed in range(3):
        runs.append(_run("full", 1e-4, seed, 0.9, 0.99))
    # uoe: both lrs forget; the better median utility wins (0.8 at 3e-2)
    for seed, u in enumerate([0.7, 0.8, 0.9]):
        runs.append(_run("uoe", 3e-2, seed, 0.0, u))
    for seed in range(3):
        runs.append(_run("uoe", 1e-2, seed, 0.15, 0.75))
    runs.append(_run("uoe+kpb", 1e-2, 0, 0.5, 0.9))  # never forgets enough
    runs.append({**_run("uoe", 1e-1, 0, 0, 0), "diverged": "loss is nan"})
    data = {"model": "natural", "device": "cpu", "guess_level": 0.1, "runs": runs,
            "original": {"forget_em": 1.0, "utility_em": 1.0, "neighbor_em": 1.0}}
    best = matched(data)
    assert best[("npo", "full", 40)]["lr"] == 1e-3 and best[("npo", "full", 40)]["utility_em"] == 0.5
    assert best[("npo", "full", 40)]["utility_em_range"] == (0.4, 0.6)
    assert best[("npo", "uoe", 40)]["lr"] == 3e-2 and best[("npo", "uoe", 40)]["utility_em"] == 0.8
    assert best[("npo", "uoe+kpb", 40)] is None
    text = summarize(data)
    assert "| npo | uoe | 0.03 | 0.000 | 0.800 [0.700, 0.900]" in text
    assert "| npo | uoe+kpb | - |" in text and "1 runs diverged" in text
    # erased forgetting: a point whose forgetting the original routing undoes is not matched
    for r in runs:
        r["forget_em_replay"] = 0.9 if (r["variant"], r["lr"]) == ("uoe", 3e-2) else r["forget_em"]
    erased = matched(data, erased=True)
    assert erased[("npo", "uoe", 40)]["lr"] == 1e-2 and erased[("npo", "full", 40)]["lr"] == 1e-3
    assert matched(data)[("npo", "uoe", 40)]["lr"] == 3e-2  # the default stays forget EM alone


def test_cli_refuses_bad_input_before_any_work(tmp_path, capsys):
    for argv in (["--model", "dense"], ["--methods", "npo,magic"], ["--variants", "uoe+zzz"], ["--lrs", "5"],
                 ["--steps", "0"], ["--batch-size", "0"], ["--probes", "replay,xray"],
                 ["--probes", "relearn", "--relearn-variants", "cov"]):
        assert main(["frontier", "--out", str(tmp_path), *argv]) == 2, argv
        assert "error:" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _hand_attribution() -> Attribution:
    # 2 layers x 4 experts, top-2; 4 forget tokens
    topk = [torch.tensor([[0, 1], [0, 2], [1, 2], [3, 2]], dtype=torch.int16),
            torch.tensor([[3, 0], [3, 1], [3, 0], [2, 1]], dtype=torch.int16)]
    counts = torch.stack([torch.bincount(t.long().flatten(), minlength=4) for t in topk])
    freq = counts.float() / 4
    retain_freq = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0]])
    return Attribution(layers=[0, 1], affinity=freq / 2, frequency=freq, mean_score=freq / 2, counts=counts,
                       top_k=[2, 2], score_fns=["softmax"] * 2, shared_layers=[], num_sequences=1, num_tokens=4,
                       retain_frequency=retain_freq, retain_num_tokens=10, token_topk=topk)


def test_premise_numbers_by_hand():
    a = _hand_attribution()
    # layer 1 expert 3: forget frequency 3/4, retain 1.0 -> selectivity 0.75; coverage 3/4
    assert a.coverage([(1, 3)]) == pytest.approx(0.75)
    assert a.selectivity[1, 3].item() == pytest.approx(0.75)
    # layer 1 expert 0: forget 2/4, retain 0 -> floored at 0.5 / 10 tokens: 0.5 / 0.05 = 10
    assert a.selectivity[1, 0].item() == pytest.approx(10.0)
    # coverage of a set across layers: tokens 0,1 (layer 0 expert 0) and 0,2 (layer 1 expert 0) -> 3 of 4
    assert a.coverage([(0, 0), (1, 0)]) == pytest.approx(0.75)
    assert a.coverage([(0, 2), (1, 0)]) == pytest.approx(1.0)
    assert a.coverage([(0, 2), (1, 1)]) == pytest.approx(0.75)  # layer 1 expert 1 adds no new token
    with pytest.warns(PremiseWarning, match="coverage 0.75.*selectivity 0.75"):
        p = a.premise([(1, 3)])
    assert not p.holds and p.per_layer_coverage == {1: 0.75}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = a.premise([(1, 0)])  # coverage 0.5, selectivity 10: holds, no warning
    assert good.holds
    # JSON keeps frequency-based numbers; coverage of one expert still works, sets need the tokens
    back = Attribution.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.coverage([(1, 3)]) == pytest.approx(0.75)
    assert back.selectivity[1, 0].item() == pytest.approx(10.0)
    with pytest.raises(BadInputError, match="per-token routing"):
        back.coverage([(0, 0), (1, 0)])


def test_select_targets_is_greedy_and_deterministic():
    a = _hand_attribution()
    # weight = affinity * selectivity: (1,0): 0.25 * 10 = 2.5 first; then (0,2) 0.375*1.5=0.5625... until coverage
    chosen = select_targets(a, coverage=0.9)
    assert chosen == [(1, 0), (0, 2)]  # weights 0.25 * 10 = 2.5, then 0.375 * 1.5; coverage 0.5 -> 1.0
    assert a.coverage(chosen) >= 0.9
    assert select_targets(a, coverage=0.9) == chosen
    with pytest.warns(PremiseWarning):
        assert len(select_targets(a, coverage=1.0, max_experts=1)) == 1
    with pytest.raises(BadInputError):
        select_targets(a, coverage=0)


def test_merge_results_adds_missing_runs_only(tmp_path):
    from moe_unlearn.frontier import merge_results

    base = {"model": "natural", "quick": False, "device": "cpu", "guess_level": 0.1, "target": [1, 2],
            "original": {"forget_em": 1.0, "utility_em": 1.0, "neighbor_em": 1.0},
            "runs": [_run("full", 1e-3, 0, 0.1, 0.5)]}
    other = {**base, "runs": [_run("full", 1e-3, 0, 0.9, 0.9), _run("uoe+grip+null", 1e-2, 0, 0.0, 0.8),
                              _run("cov", 1e-2, 0, 0.0, 0.7)]}
    a, b = tmp_path / "frontier_natural.json", tmp_path / "other.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(other))
    data = merge_results(a, [b], variants=("full", "uoe+grip+null"))
    assert [(r["variant"], r["forget_em"]) for r in data["runs"]] == [("full", 0.1), ("uoe+grip+null", 0.0)]
    assert json.loads(a.read_text())["runs"] == data["runs"] and a.with_suffix(".md").exists()
    b.write_text(json.dumps({**other, "model": "localized"}))
    with pytest.raises(DataError, match="localized"):
        merge_results(a, [b])
