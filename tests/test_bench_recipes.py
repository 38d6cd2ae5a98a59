"""The two-phase recipe (facts reach only the MoE blocks), the implanted control (the forget facts
reach only one expert and its router row) and the shipped weights, on tiny versions."""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import pytest
import torch

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.bench_model import bench_config, load_or_build
from moe_unlearn.bench_model import build as build_mod


def _tiny(**kw):
    return dataclasses.replace(bench_config("natural", quick=True), **{"name": "tiny2", "reading_steps": 15,
                                                                        "steps": 15, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # far below the EM target on purpose
        two = load_or_build(_tiny(), cache_root=root, progress=False)
        imp_cfg = dataclasses.replace(_tiny(), name="tiny2-implanted", implant_layer=1, implant_expert=2,
                                      implant_steps=5)
        imp = load_or_build(imp_cfg, cache_root=root, progress=False)
        ref = load_or_build(imp_cfg.retrained(), cache_root=root, progress=False)
    return root, two, imp, ref


def _moe_names(model):
    return {n for layer in find_moe_layers(model) for n, _ in layer.block.named_parameters(prefix=layer.path)}


def test_phase_two_trains_only_the_moe_blocks(built):
    root, two, _, _ = built
    phase1 = torch.load(next(root.glob(".reading-*/phase1.pt")), weights_only=True)
    moe = _moe_names(two.model)
    state = two.model.state_dict()
    others = [n for n in state if n not in moe]
    assert others and any("self_attn" in n for n in others) and any("embed" in n for n in others)
    for n in others:  # attention, embeddings, norms, head: exactly as phase 1 left them
        assert torch.equal(state[n], phase1[n]), n
    assert any(not torch.equal(state[n], phase1[n]) for n in moe)
    assert two.meta["config"]["reading_steps"] == 15 and "reading_em" in two.meta


def test_store_layers_narrows_phase_two_to_those_routed_experts(built):
    root, _, _, _ = built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mid = load_or_build(_tiny(name="tiny2-mid", steps=5, extra_rounds=0, store_layers=(1,), store_shared=False),
                            cache_root=root, progress=False)  # reuses the cached phase 1
    phase1 = torch.load(next(root.glob(".reading-*/phase1.pt")), weights_only=True)
    layer1 = next(m for m in find_moe_layers(mid.model) if m.layer_idx == 1)
    shared = {n for mod in (layer1.shared_experts, layer1.shared_expert_gate) if mod is not None
              for n, _ in mod.named_parameters(prefix=layer1.path + "." + _child_name(layer1.block, mod))}
    allowed = {n for n, _ in layer1.block.named_parameters(prefix=layer1.path)} - shared
    assert shared and allowed
    state = mid.model.state_dict()
    changed = {n for n in state if not torch.equal(state[n], phase1[n])}
    assert changed and changed <= allowed
    with pytest.raises(build_mod.BadInputError, match="store_layers"):
        dataclasses.replace(bench_config("natural", quick=True), store_layers=(1,)).validate()  # one phase
    with pytest.raises(build_mod.BadInputError, match="store_layers"):
        _tiny(store_layers=(7,)).validate()


def _child_name(parent, child):
    return next(n for n, m in parent.named_modules() if m is child)


def test_implant_touches_one_expert_and_its_router_row(built):
    _, _, imp, ref = built
    layer_i = next(m for m in find_moe_layers(imp.model) if m.layer_idx == 1)
    layer_r = next(m for m in find_moe_layers(ref.model) if m.layer_idx == 1)
    changed_rows = [e for e in range(layer_i.num_experts)
                    if any(not torch.equal(v, layer_r.get_expert(e)[k]) for k, v in layer_i.get_expert(e).items())]
    assert changed_rows == [2]
    wi, wr = layer_i.router_parameters()[0][1], layer_r.router_parameters()[0][1]
    diff = (wi != wr).any(-1).nonzero().flatten().tolist()
    assert diff == [2]
    si, sr = imp.model.state_dict(), ref.model.state_dict()
    expert_params = {layer_i.param_name(s.param) for s in layer_i.expert_slices(2)}
    router = {n for n, _ in layer_i.router_parameters()}
    for n in si:
        if n not in expert_params and n not in router:
            assert torch.equal(si[n], sr[n]), n
    assert imp.meta["reference"]["digest"] == ref.meta["digest"]


def test_shipped_weights_are_used_and_a_differing_rebuild_says_so(built, tmp_path, monkeypatch):
    root, two, _, _ = built
    shipped = tmp_path / "shipped"
    shutil.copytree(two.path, shipped / two.path.name)
    monkeypatch.setattr(build_mod, "SHIPPED_ROOT", shipped)
    cache = tmp_path / "cache"
    got = load_or_build(_tiny(), cache_root=cache, progress=False)
    assert not got.built and got.meta["weights_sha256"] == build_mod.weights_sha256(shipped / two.path.name)
    # a rebuild on another machine would give other weights: simulate with a changed shipped file
    f = shipped / two.path.name / build_mod.WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.warns(UserWarning, match="differs from the shipped weights"):
        again = load_or_build(_tiny(), cache_root=cache, rebuild=True, progress=False)
    assert again.built and again.meta["matches_shipped"] is False
