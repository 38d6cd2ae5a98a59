"""unlearn(): scopes touch only what they should, the anchor works, prefix caching is exact,
resume matches an uninterrupted run, bad input fails cleanly."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import RoutingCapture, find_moe_layers
from moe_unlearn.errors import BadInputError, DataError, TrainingDiverged
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainHooks
from moe_unlearn.training import train as real_train
from moe_unlearn.unlearning import fit, unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(10)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(10)) for i in range(6)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=16, progress=False)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_uoe_changes_only_target_expert_and_router(family):
    model = tiny_model(family)
    before = _state(model)
    layer = find_moe_layers(model)[-1]  # the last MoE layer (qwen2_moe's tiny model has a dense layer 1)
    target = f"{layer.layer_idx}:2"
    res = unlearn(model, FORGET, RETAIN, method="npo", scope="uoe", target=target, steps=3, lr=1e-2, **KW)
    after = _state(model)
    slices = {s.name: s for s in layer.expert_slices(2)}
    router_names = {n for n, _ in layer.router_parameters()}
    for name, old in before.items():
        new = after[name]
        if name in router_names:
            assert not torch.equal(old, new), name
        elif name in slices:
            s = slices[name]
            idx = [slice(None)] * old.dim()
            idx[s.dim] = slice(s.start, s.stop)
            assert not torch.equal(old[tuple(idx)], new[tuple(idx)]), name
            keep = torch.ones(old.shape[s.dim], dtype=torch.bool)
            keep[s.start:s.stop] = False
            assert torch.equal(old.index_select(s.dim, keep.nonzero().flatten()),
                               new.index_select(s.dim, keep.nonzero().flatten())), f"other experts of {name}"
        else:
            assert torch.equal(old, new), f"{name} must not change"
    expert_numel = sum(s.numel for s in slices.values())
    router_numel = sum(p.numel() for _, p in layer.router_parameters())
    assert res.trainable_params == expert_numel + router_numel
    n_leaves = len(slices) + len(router_names)
    # Adam: two fp32 moments per trained element + a 4-byte step counter per leaf; nothing for
    # the rest of the fused expert tensors
    assert res.optimizer_state_bytes == 8 * (expert_numel + router_numel) + 4 * n_leaves
    assert res.targets == [target]
    assert res.prefix_cache_start == layer.layer_idx


def test_shared_expert_needs_flag():
    model = tiny_model("qwen2_moe")
    before = _state(model)
    with pytest.raises(BadInputError, match="allow_shared=True"):
        unlearn(model, FORGET, method="ga", scope="uoe", target="2:shared", steps=1, **KW)
    res = unlearn(model, FORGET, method="ga", scope="uoe", target="2:shared", allow_shared=True, steps=2,
                  lr=1e-2, **KW)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".layers.2.mlp.shared_expert" in n or ".layers.2.mlp.gate." in n for n in changed)
    assert any("shared_expert." in n for n in changed)
    assert res.targets == ["2:shared"]


def _target_share(model, layer_idx, expert):
    layer = find_moe_layers(model)[layer_idx]
    batch = TOK(FORGET, return_tensors="pt")
    with torch.no_grad(), RoutingCapture(model, [layer]) as cap:
        model(**batch)
    rec = cap.last.layers[layer_idx]
    return (rec.topk_idx == expert).any(-1).float().mean().item()


def test_anchor_falls_and_target_keeps_its_forget_tokens():
    model = tiny_model("qwen3_moe")
    from moe_unlearn.attribution import attribute_experts

    attr = attribute_experts(model, FORGET, tokenizer=TOK, max_length=16, progress=False)
    (lay, exp) = attr.target()
    share0 = _target_share(model, lay, exp)
    res = unlearn(model, FORGET, method="ga", scope="uoe", target=attr, steps=8, lr=5e-3, **KW)
    anchor = res.history.terms["anchor"]
    assert res.targets == [f"{lay}:{exp}"]
    assert anchor[-1] < anchor[0]
    assert _target_share(model, lay, exp) >= share0


@pytest.mark.parametrize("method,extra", [("npo", {}), ("rmu", {}), ("graddiff", {"retain_loss": "kl"})])
def test_prefix_cache_gives_same_losses_as_full_model(method, extra):
    runs = []
    for cache in (True, False):
        model = tiny_model("qwen2_moe")
        res = unlearn(model, FORGET, RETAIN, method=method, scope="topm", target=["2:1", "2:3"], steps=3, lr=1e-2,
                      retain_routing_weight=0.5, method_kwargs=extra, prefix_cache=cache, **KW)
        runs.append((res, _state(model)))
    (a, sa), (b, sb) = runs
    assert a.prefix_cache_start == 2 and b.prefix_cache_start is None
    for k in a.history.terms:
        torch.testing.assert_close(torch.tensor(a.history.terms[k]), torch.tensor(b.history.terms[k]),
                                   rtol=1e-5, atol=1e-6)
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=1e-5, atol=1e-6)


class _Crash(Exception):
    pass


def test_resumed_run_ends_where_uninterrupted_one_does(tmp_path, monkeypatch):
    args = dict(method="npo", scope="uoe", target="1:2", steps=6, lr=1e-2, lr_schedule="cosine",
                checkpoint_every=2, **KW)
    ref_model = tiny_model("qwen3_moe")
    ref = unlearn(ref_model, FORGET, RETAIN, out_dir=tmp_path / "ref", **args)

    class CrashAt(TrainHooks):
        def after_step(self, step):
            if step == 5:
                raise _Crash

    monkeypatch.setattr(fit, "train", lambda *a, hooks, **k: real_train(*a, hooks=[*hooks, CrashAt()], **k))
    model = tiny_model("qwen3_moe")
    orig = _state(model)
    with pytest.raises(_Crash):
        unlearn(model, FORGET, RETAIN, out_dir=tmp_path / "run", **args)
    assert all(torch.equal(orig[n], p) for n, p in model.named_parameters())  # restored after the crash
    assert not (tmp_path / "run").exists()
    assert (tmp_path / "run.ckpt" / "step_00000004.pt").exists()
    monkeypatch.setattr(fit, "train", real_train)

    res = unlearn(tiny_model("qwen3_moe"), FORGET, RETAIN, out_dir=tmp_path / "run", resume=True, **args)
    assert res.history.resumed_from == 4
    torch.testing.assert_close(torch.tensor(res.history.terms["loss"]), torch.tensor(ref.history.terms["loss"]))
    from safetensors.torch import load_file

    got, want = load_file(res.patch_path / "patch.safetensors"), load_file(ref.patch_path / "patch.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_bad_inputs_fail_cleanly_and_write_nothing(tmp_path):
    model = tiny_model("qwen3_moe")
    before = _state(model)
    out = tmp_path / "out"
    cases = [
        (dict(method="dpo"), BadInputError, "valid methods: eul, ga, graddiff, npo, rmu, simnpo"),
        (dict(scope="some"), BadInputError, "valid scopes: full, all_but_routers, experts, routers, uoe, topm"),
        (dict(target="1:6"), BadInputError, r"out of range .*0\.\.5"),
        (dict(target="5:0"), BadInputError, "not an MoE layer"),
        (dict(target="one"), BadInputError, "LAYER:EXPERT"),
        (dict(forget=[]), DataError, "forget set"),
        (dict(forget=["   "]), DataError, "forget set"),
        (dict(method="graddiff", retain=None), BadInputError, "needs retain data"),
        (dict(method_kwargs={"bta": 1}), BadInputError, "unknown hyperparameters"),
    ]
    for overrides, exc, msg in cases:
        kw = dict(forget=FORGET, retain=RETAIN, method="npo", scope="uoe", target="1:2", steps=1, out_dir=out, **KW)
        kw.update(overrides)
        with pytest.raises(exc, match=msg):
            unlearn(model, **kw)
        assert not out.exists() and not list(tmp_path.iterdir()), overrides
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    for merge in (False, True):
        with pytest.raises(BadInputError, match="model's own directory"):
            unlearn(model, FORGET, target="1:2", steps=1, out_dir=model_dir, model_dir=model_dir, merge=merge, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_nan_loss_raises_restores_model_and_writes_nothing(tmp_path):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        find_moe_layers(model)[1].router.weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(TrainingDiverged, match="nothing was written"):
        unlearn(model, FORGET, RETAIN, method="ga", scope="uoe", target="1:2", steps=3, out_dir=tmp_path / "o",
                checkpoint_every=1, **KW)
    assert list(tmp_path.iterdir()) == []
    after = _state(model)
    assert all(torch.equal(before[n].nan_to_num(), after[n].nan_to_num()) for n in before)


def test_merge_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, method="simnpo", scope="uoe", target="0:1", steps=2, lr=1e-2,
                  out_dir=tmp_path / "merged", merge=True, **KW)
    assert res.patch_path is None and res.merged_path == tmp_path / "merged"
    loaded = AutoModelForCausalLM.from_pretrained(res.merged_path)
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[n]), n
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_retain_batches_cycle_independently_of_forget_batches():
    """A retain set larger than the forget set is used in full across epochs, and every epoch
    has the forget set's length (so the loop knows its total steps)."""
    from moe_unlearn.training import _epoch_len
    from moe_unlearn.unlearning.batches import ForgetRetainPairs

    pairs = ForgetRetainPairs(n_forget=3, n_retain=7)
    assert _epoch_len(pairs) == 3
    seen = [item["rk"] for epoch in range(3) for item in pairs(epoch)]
    assert sorted(seen[:7]) == list(range(7)) and len(set(seen[7:])) == 2  # all 7 used before any repeats
    assert sorted(item["k"] for item in pairs(1)) == [0, 1, 2]
    assert pairs(2) == pairs(2)  # deterministic per epoch (resume sees the same pairs)
    assert all(item["rk"] is None for item in ForgetRetainPairs(2, 0)(0))


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_gradient_checkpointing_recomputes_upper_layers_with_the_same_result(prefix_cache):
    results, calls = [], []
    for ckpt in (False, True):
        model = tiny_model("qwen3_moe", num_hidden_layers=3)
        n = [0]
        model.model.layers[2].self_attn.register_forward_hook(lambda m, a, o, n=n: n.__setitem__(0, n[0] + 1))
        unlearn(model, FORGET[:3], method="ga", scope="uoe", target="0:1", steps=2, lr=1e-2,
                prefix_cache=prefix_cache, gradient_checkpointing=ckpt, **KW)
        results.append(_state(model))
        calls.append(n[0])
    assert calls[1] == calls[0] + 2  # layer 2 (above the target) ran once more per training step
    for name, v in results[0].items():
        assert torch.allclose(v, results[1][name], atol=1e-6), name
    assert not torch.equal(results[0]["model.layers.0.mlp.gate.weight"],
                           tiny_model("qwen3_moe", num_hidden_layers=3).model.layers[0].mlp.gate.weight)
