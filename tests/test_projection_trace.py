"""GRIP router projection, retain-null-space experts and TRACE reweighting."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import RoutingCapture, find_moe_layers
from moe_unlearn.errors import BadInputError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn
from moe_unlearn.unlearning.objectives import mean_nll
from moe_unlearn.unlearning.projection import basis_from_gram
from moe_unlearn.unlearning.trace import trace_weights

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(8)) for i in range(6)]
# few retain tokens (rank < hidden size): the projections keep their whole span
RETAIN = [" ".join(f"w{40 + (i * 3 + j) % 20}" for j in range(5)) for i in range(3)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=16, progress=False, method="ga", steps=4, lr=3e-2)


def _retain_inputs(model, layer):
    """Router inputs, top-K and the layer's expert views on the retain texts (original routing)."""
    ids = [TOK(t)["input_ids"] for t in RETAIN]
    batch = torch.tensor(ids)
    with torch.no_grad(), RoutingCapture(model, [layer], hidden_states=True) as cap:
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    r = cap.last.layers[layer.layer_idx]
    return r.hidden.clone(), r.topk_idx.clone()


def test_basis_keeps_the_requested_energy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)  # rank 3 in R^8
    sub = basis_from_gram(x.double().T @ x.double(), 1.0, 50)
    assert sub.rank == 3 and sub.energy == pytest.approx(1.0)
    u = sub.basis
    assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-5)
    assert torch.allclose(x @ u @ u.T, x, atol=1e-4)  # the span is kept exactly
    part = basis_from_gram(x.double().T @ x.double(), 0.5, 50)
    assert 1 <= part.rank <= 3 and part.energy >= 0.5


@pytest.mark.parametrize("scope", ["uoe", "full"])
def test_grip_keeps_router_logits_on_retain_inputs(scope):
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[1]
    x, _ = _retain_inputs(model, layer)
    w0 = layer.router_logits(x).detach().clone()
    res = unlearn(model, FORGET, RETAIN, scope=scope, target=f"{layer.layer_idx}:2" if scope == "uoe" else None,
                  router_projection="grip", projection_energy=1.0, **KW)
    w1 = layer.router_logits(x).detach()
    assert torch.allclose(w0, w1, atol=1e-4), (w0 - w1).abs().max()
    rep = [r for r in res.details["projections"] if r["matrix"] == f"router {layer.layer_idx}"][0]
    assert 0 < rep["rank"] < rep["dim"] and rep["energy"] == pytest.approx(1.0)
    # without the projection the same run moves the router on these inputs
    free = tiny_model("qwen3_moe")
    unlearn(free, FORGET, RETAIN, scope=scope, target=f"{layer.layer_idx}:2" if scope == "uoe" else None, **KW)
    free_layer = find_moe_layers(free)[1]
    assert not torch.allclose(w0, free_layer.router_logits(x).detach(), atol=1e-3)


def test_retain_null_keeps_the_expert_output_of_retain_tokens_routed_to_it():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[1]
    x, topk = _retain_inputs(model, layer)
    counts = torch.bincount(topk.flatten(), minlength=layer.num_experts)
    e = int(counts.argmax())  # the expert most retain tokens use
    xe = x[(topk == e).any(-1)]
    before = layer.expert_forward(e, xe).detach().clone()
    w_before = {k: v.clone() for k, v in layer.get_expert(e).items()}
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=f"{layer.layer_idx}:{e}",
                  expert_projection="retain_null", router_projection="grip", projection_energy=1.0, **KW)
    after = layer.expert_forward(e, xe).detach()
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    assert any(not torch.equal(w_before[k], v) for k, v in layer.get_expert(e).items())  # it did train
    reps = {r["matrix"]: r for r in res.details["projections"]}
    assert reps[f"expert {layer.layer_idx}:{e} gate/up inputs"]["samples"] == xe.shape[0]
    assert res.details["projections"] and all(r["rank"] <= r["dim"] for r in reps.values())


def test_projection_options_are_checked():
    model = tiny_model("qwen3_moe")
    with pytest.raises(BadInputError, match="router_projection"):
        unlearn(model, FORGET, RETAIN, scope="uoe", target="1:2", router_projection="gripp", **KW)
    with pytest.raises(BadInputError, match="needs retain data"):
        unlearn(model, FORGET, None, scope="uoe", target="1:2", router_projection="grip", **KW)
    with pytest.raises(BadInputError, match="use scope"):
        unlearn(model, FORGET, RETAIN, scope="full", expert_projection="retain_null", **KW)
    with pytest.raises(BadInputError, match="trains no router"):
        unlearn(model, FORGET, RETAIN, scope="experts", router_projection="grip", **KW)
    with pytest.raises(BadInputError, match="projection_energy"):
        unlearn(model, FORGET, RETAIN, scope="uoe", target="1:2", router_projection="grip", projection_energy=0,
                **KW)


def test_weighted_nll_by_hand():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, 2, 3, -100]])
    weight = torch.tensor([[2.0, 1.0, 0.0, 7.0]])  # position t weights the loss of predicting token t+1
    lp = torch.log_softmax(logits[0, :-1], -1)
    nll = torch.stack([-lp[0, 2], -lp[1, 3]])
    assert mean_nll(logits, labels, weight).item() == pytest.approx(((2 * nll[0] + nll[1]) / 3).item(), rel=1e-5)
    assert mean_nll(logits, labels).item() == pytest.approx(nll.mean().item(), rel=1e-5)


def test_trace_weights_follow_the_formula():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[1]
    from moe_unlearn.data import tokenize_batches

    fb = list(tokenize_batches(FORGET, TOK, batch_size=3, max_length=16))
    rb = list(tokenize_batches(RETAIN + FORGET[:1], TOK, batch_size=2, max_length=16))
    weights, report = trace_weights(model, fb, rb, [layer], {layer.layer_idx: [2]}, torch.device("cpu"))
    # by hand: frequencies of expert 2 on forget and retain tokens
    def freq(batches):
        hit = n = 0
        with torch.no_grad(), RoutingCapture(model, [layer]) as cap:
            for b in batches:
                cap.clear()
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                m = cap.last.mask
                hit += int((cap.last.layers[layer.layer_idx].topk_idx[m] == 2).any(-1).sum())
                n += int(m.sum())
        return hit / n, n
    pf, _ = freq(fb)
    pr, n_r = freq(rb)
    bonus = max(0.0, pf / max(pr, 0.5 / n_r) - 1)
    raw = []
    with torch.no_grad(), RoutingCapture(model, [layer]) as cap:
        for b in rb:
            cap.clear()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            sel = (cap.last.layers[layer.layer_idx].topk_idx == 2).any(-1).double()
            raw.append((1 + bonus * sel) * cap.last.mask.double())
    total = sum(float(r.sum()) for r in raw)
    for w, r, b in zip(weights, raw, rb, strict=True):
        assert torch.allclose(w.double(), (r * (n_r / total)).view(b["input_ids"].shape), atol=1e-6)
    assert sum(float(w.sum()) for w in weights) == pytest.approx(n_r, rel=1e-5)  # mean 1 over real tokens
    assert report["critical"] == {str(layer.layer_idx): [2]}


def test_trace_runs_through_unlearn_and_is_recorded():
    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target="1:2", retain_weighting="trace",
                  **{**KW, "method": "npo"})
    assert res.details["trace"]["critical"] == {"1": [2]}
    assert "retain_nll" in res.final_terms


def test_coverage_targets_through_unlearn_and_the_cli(tmp_path):
    import json

    from moe_unlearn.cli import main

    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, RETAIN, scope="topm", coverage=0.6, **KW)
    assert len(res.targets) >= 1
    with pytest.raises(BadInputError, match="topm"):
        unlearn(model, FORGET, RETAIN, scope="uoe", coverage=0.6, **KW)
    # CLI: attribute with --retain and --coverage stores the premise and the chosen set
    d = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(d)
    TOK.save_pretrained(d)
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    (tmp_path / "r.txt").write_text("\n".join(RETAIN))
    rc = main(["attribute", "--model", str(d), "--data", str(tmp_path / "f.txt"), "--retain", str(tmp_path / "r.txt"),
               "--coverage", "0.6", "--out", str(tmp_path / "attr"), "--device", "cpu"])
    assert rc == 0
    data = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert {"selectivity", "premise", "retain_frequency"} <= set(data)
    assert data["meta"]["coverage_targets"]["reached"] >= 0.6
    assert main(["attribute", "--model", str(d), "--data", str(tmp_path / "f.txt"), "--coverage", "2",
                 "--out", str(tmp_path / "attr2")]) == 2
