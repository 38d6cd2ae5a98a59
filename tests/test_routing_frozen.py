"""Routing-frozen unlearning (routing="frozen" / "forced"): routers never change, the forced original
routing is exactly what replay applies, every scope and target choice composes with it, and the
default (learned) run is what it was."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.arch.forcing import ForcedRouting
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError
from moe_unlearn.eval import evaluate
from moe_unlearn.eval.items import as_items
from moe_unlearn.eval.scoring import encode_items
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import UnlearnConfig, unlearn
from moe_unlearn.unlearning.routing import record_batch_routing

TOK = word_tokenizer()
FACTS = [{"question": f"w{i} w{(i * 7 + 3) % 60} w{(i * 11 + 5) % 60}", "answer": f"w{(i * 13 + 1) % 60}"}
         for i in range(8)]
RETAIN = [" ".join(f"w{60 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]
LAST_LAYER = [f"1:{e}" for e in range(6)]  # every expert of the last MoE layer
KW = dict(tokenizer=TOK, batch_size=4, max_length=16, steps=4, lr=0.05, progress=False)


def _routers(model):
    return {n: p.detach().clone() for lay in find_moe_layers(model) for n, p in lay.router_parameters()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("routing", ["frozen", "forced"])
@pytest.mark.parametrize("scope,extra", [("uoe", dict(target="0:1")), ("topm", dict(target=["0:1", "1:2"])),
                                         ("full", {}), ("all_but_routers", {}), ("experts", {})])
def test_routers_never_change_and_their_logits_are_bit_identical(routing, scope, extra):
    model = tiny_model("qwen3_moe", seed=5)
    before, state = _routers(model), _state(model)
    probe = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    logits = [lay.router_logits(probe) for lay in find_moe_layers(model)]
    res = unlearn(model, FACTS, RETAIN, method="npo", scope=scope, routing=routing, **extra, **KW)
    assert all(torch.equal(p, before[n]) for n, p in _routers(model).items())
    assert all(torch.equal(lay.router_logits(probe), lg) for lay, lg in zip(find_moe_layers(model), logits,
                                                                            strict=True))
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())  # something else trained
    assert "anchor" not in res.final_terms  # no anchor: the routers cannot move


def test_forced_training_is_replay_and_replayed_equals_normal_evaluation_on_the_forget_set(tmp_path):
    """Targets in the last MoE layer: the routers see the original inputs, so the unlearned model routes
    the forget items exactly as the original did; replayed and normal forget scores agree bit for bit."""
    original = tiny_model("qwen3_moe", seed=5)
    model = copy.deepcopy(original)
    unlearn(model, FACTS, RETAIN, method="npo", scope="topm", target=LAST_LAYER, routing="forced", **KW)
    rep = evaluate(model, TOK, forget=FACTS, original=original, replay="original", generate=False, progress=False)
    base = evaluate(original, TOK, forget=FACTS, generate=False, progress=False).splits["forget"]
    f, r = rep.splits["forget"], rep.splits["forget_replay"]
    assert (f.exact_match, f.nll) == (r.exact_match, r.nll)
    assert f.nll > base.nll  # and it did unlearn
    # forcing there is a no-op: the same run with frozen routing is bit-identical
    twin = copy.deepcopy(original)
    unlearn(twin, FACTS, RETAIN, method="npo", scope="topm", target=LAST_LAYER, routing="frozen", **KW)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(),
                                                 strict=True))


def test_forcing_a_models_own_routing_reproduces_its_logits_and_forcing_another_changes_them():
    model = tiny_model("qwen3_moe", seed=5)
    enc = encode_items(TOK, as_items(FACTS))
    ids = torch.tensor([e.ids for e in enc])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    layers = find_moe_layers(model)
    own = record_batch_routing(model, layers, batch)
    with torch.no_grad():
        plain = model(**batch).logits
        with ForcedRouting(layers) as forced:
            forced.use(own)
            same = model(**batch).logits
            forced.use({i: ((idx + 1) % 6, w) for i, (idx, w) in own.items()})  # other experts
            other = model(**batch).logits
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, other)


def test_forced_routing_differs_from_frozen_when_lower_experts_change():
    """Experts of layer 0 train: with frozen routing layer 1 re-routes as its inputs move, with forced
    routing it keeps the original experts; the runs differ."""
    a, b = tiny_model("qwen3_moe", seed=5), tiny_model("qwen3_moe", seed=5)
    kw = dict(KW, steps=6, lr=0.2)
    unlearn(a, FACTS, RETAIN, method="ga", scope="experts", routing="frozen", **kw)
    unlearn(b, FACTS, RETAIN, method="ga", scope="experts", routing="forced", **kw)
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_learned_routing_is_the_default_and_unchanged():
    a, b = tiny_model("qwen3_moe", seed=5), tiny_model("qwen3_moe", seed=5)
    assert UnlearnConfig().routing == "learned"
    ra = unlearn(a, FACTS, RETAIN, method="npo", scope="uoe", target="0:1", **KW)
    rb = unlearn(b, FACTS, RETAIN, method="npo", scope="uoe", target="0:1", routing="learned", **KW)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert "anchor" in ra.final_terms and ra.final_terms == rb.final_terms
    before = _routers(tiny_model("qwen3_moe", seed=5))
    assert any(not torch.equal(p, before[n]) for n, p in _routers(a).items())  # learned: the router trained


def test_coverage_targets_compose_with_frozen_routing():
    model = tiny_model("qwen3_moe", seed=5)
    before = _routers(model)
    res = unlearn(model, FACTS, RETAIN, method="npo", scope="topm", coverage=0.5, routing="forced", **KW)
    assert res.targets and all(torch.equal(p, before[n]) for n, p in _routers(model).items())


@pytest.mark.parametrize("kw,match", [
    (dict(scope="routers"), "trains nothing else"),
    (dict(scope="uoe", target="0:1", router_projection="grip"), "router_projection acts on trained routers"),
    (dict(scope="uoe", target="0:1", retain_routing_weight=1.0), "retain_routing_weight acts on trained"),
    (dict(scope="uoe", target="0:1", adapter="lora", adapter_router=True), "adapter_router acts on trained"),
    (dict(scope="full", routing="forced", gradient_checkpointing=True), "gradient_checkpointing"),
    (dict(scope="full", routing="sticky"), "unknown routing mode 'sticky'; valid routing modes: learned, frozen"),
])
def test_bad_routing_combinations_fail_with_one_error(kw, match):
    model = tiny_model("qwen3_moe", seed=5)
    state = _state(model)
    with pytest.raises(BadInputError, match=match):
        unlearn(model, FACTS, RETAIN, method="npo", **{"routing": "frozen", **kw}, **KW)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_patch_json_records_the_routing(tmp_path):
    model = tiny_model("qwen3_moe", seed=5)
    res = unlearn(model, FACTS, RETAIN, method="npo", scope="all_but_routers", routing="forced",
                  out_dir=str(tmp_path / "p"), **KW)
    rec = json.loads((res.patch_path / "patch.json").read_text())
    assert rec["config"]["routing"] == "forced" and rec["hyperparameters"]["routing"] == "forced"
    assert rec["config"]["scope"] == "all_but_routers"
    router_names = set(_routers(model))
    names = {e["name"] for e in rec["entries"]}
    assert names and router_names and not router_names & names  # everything but the routers


def test_cli_has_the_routing_flag_and_refuses_a_bad_routing_with_exit_2(tmp_path, capsys):
    import argparse

    from moe_unlearn.commands import unlearn as cmd

    parser = cmd.add_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.parse_args(["--routing", "forced"]).routing == "forced"
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"routing": "sticky"}))
    out = tmp_path / "o"
    assert main(["unlearn", "--config", str(run), "--model", "m", "--forget", "f", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown routing mode 'sticky'" in err and "Traceback" not in err and not out.exists()
