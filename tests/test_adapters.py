"""Low-rank unlearning adapters: the exact recipes, the gradient, the patch round trip, projections."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import RoutingCapture, find_moe_layers
from moe_unlearn.errors import BadInputError, PatchError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn
from moe_unlearn.unlearning.adapters import (
    AdapterParams,
    MatrixLayout,
    lowrank_apply,
    lowrank_delta,
    lowrank_revert,
    revert_fixes,
    slice_layout,
)
from moe_unlearn.unlearning.tensor import TrainedTensor

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(8)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 3 + j) % 20}" for j in range(5)) for i in range(3)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=16, progress=False, method="npo", steps=3, lr=3e-2)
FAMILIES = ["qwen2_moe", "gpt_oss", "dbrx", "mixtral", "deepseek_v3"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _target(model, expert=1):
    return (find_moe_layers(model)[-1].layer_idx, expert)


# -- the exact recipes ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,rank", [((7, 5), 1), ((33, 17), 3), ((64, 48), 16)])
def test_revert_is_bit_exact_even_where_rounding_crosses_binades(dtype, shape, rank):
    g = torch.Generator().manual_seed(hash((shape, rank)) % 2**31)
    w0 = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    a = torch.randn(rank, shape[1], generator=g)
    b = torch.randn(shape[0], rank, generator=g) * 0.05  # changes as large as the weights: many binades crossed
    new = lowrank_apply(w0, a, b)
    assert new.dtype == dtype and not torch.equal(new, w0)
    ref = (w0.double() + b.double() @ a.double()).to(dtype)  # the recipe is W0 + B A rounded once (to ~1 ulp)
    assert torch.allclose(new.float(), ref.float(), rtol=2e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)
    idx, val = revert_fixes(w0, a, b)
    back = lowrank_revert(new, a, b, idx, val)
    assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       w0.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert idx.numel() < w0.numel()  # a correction list, not a copy


def test_the_recipe_is_an_elementwise_order_not_a_matmul():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 9, generator=g), torch.randn(4, 5, generator=g)
    d = lowrank_delta(a, b)
    assert d.dtype == torch.float64 and torch.allclose(d, b.double() @ a.double(), atol=1e-12)
    # transposed and strided views give the same bits as contiguous ones
    w = torch.randn(9, 4, generator=g)
    assert torch.equal(lowrank_apply(w.T, a, b), lowrank_apply(w.T.contiguous(), a, b))


def test_adapter_gradient_is_the_chain_rule_of_w0_plus_ba():
    g = torch.Generator().manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(3, 6, 4, generator=g))  # [E, out, in]; expert 1 trains
    x = torch.randn(10, 4, generator=g)
    layout = MatrixLayout(0, 1)
    ap = AdapterParams([(TrainedTensor("w", 0, 1, 2), fused, layout)], [], [], rank=2, seed=5)
    item = ap.items[0]
    with torch.no_grad():
        item.b.copy_(torch.randn(6, 2, generator=g))  # off zero, so both factors get gradients
    ap.write_back()
    loss = (torch.tanh(x @ fused[1].T) ** 2).sum()
    loss.backward()
    a = item.a.detach().clone().requires_grad_(True)
    b = item.b.detach().clone().requires_grad_(True)
    ref = (torch.tanh(x @ (item.w0 + b @ a).T) ** 2).sum()
    ref.backward()
    assert torch.allclose(item.a.grad, a.grad, atol=1e-4) and torch.allclose(item.b.grad, b.grad, atol=1e-4)
    assert fused.grad is None  # the fused gradient is dropped once moved into the factors
    ap.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_layouts_match_the_linear_views(family):
    model = tiny_model(family)
    layer = find_moe_layers(model)[-1]
    views = layer.get_expert(1)
    x = torch.randn(views["gate"].shape[1] if "gate" in views else views["up"].shape[1])
    for sl in layer.expert_slices(1):
        layout = slice_layout(layer, sl, 1)
        if sl.role.endswith("bias"):
            assert layout is None
            continue
        m = layout.matrix(sl.view())
        if sl.role == "gate_up":  # rows of gate and up, in the family's order (GPT-OSS interleaves)
            want = torch.cat([views["gate"] @ x, views["up"] @ x])
            assert torch.allclose((m @ x).sort().values, want.sort().values, atol=1e-5)
        else:
            assert torch.equal(m, views[sl.role])


# -- the engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_patch_round_trip_is_bit_exact_and_small(family, tmp_path):
    model = tiny_model(family)
    before = _state(model)
    t = _target(model)
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=t, adapter="lora", adapter_rank=2,
                  out_dir=tmp_path / "lora", **KW)
    after = _state(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(f".{t[0]}." in k for k in changed)  # only the target layer moved
    meta = json.loads((tmp_path / "lora" / "patch.json").read_text())
    low = [e for e in meta["entries"] if e.get("kind") == "lowrank"]
    assert low and all(e["rank"] == 2 for e in low)
    assert res.details["adapter"]["low_rank_matrices"] == len(low)
    assert res.trainable_params < res.details["adapter"]["scope_params"]
    revert_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    apply_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in after.items())
    revert_patch(model, res.patch_path)
    from safetensors.torch import load_file

    stored = load_file(str(res.patch_path / "patch.safetensors"))
    for i, e in enumerate(meta["entries"]):
        if e.get("kind") == "lowrank":  # factors + corrections, instead of the old and new matrix
            assert f"orig.{i}" not in stored and f"new.{i}" not in stored
            low_bytes = sum(stored[f"{k}.{i}"].nbytes for k in ("a", "b", "fix_index", "fix_value"))
            assert low_bytes < 2 * stored[f"a.{i}"].element_size() * torch.Size(e["shape"]).numel()
            assert e["fixes"] == stored[f"fix_index.{i}"].numel()


def test_adapter_rank_sets_the_trainable_count_and_the_seed_sets_a(tmp_path):
    model = tiny_model("qwen2_moe")
    t = _target(model)
    layer = find_moe_layers(model)[-1]
    router = sum(p.numel() for _, p in layer.router_parameters())
    mats = [slice_layout(layer, s, 1).matrix(s.view()).shape for s in layer.expert_slices(1)]
    for r in (1, 3):
        res = unlearn(model, FORGET, RETAIN, scope="uoe", target=t, adapter="lora", adapter_rank=r, **KW)
        assert res.trainable_params == router + sum(r * (o + i) for o, i in mats)
        model = tiny_model("qwen2_moe")
    s0 = unlearn(tiny_model("qwen2_moe"), FORGET, RETAIN, scope="uoe", target=t, adapter="lora", seed=0, **KW)
    m1 = tiny_model("qwen2_moe")
    s1 = unlearn(m1, FORGET, RETAIN, scope="uoe", target=t, adapter="lora", seed=1, **KW)
    assert s0.final_terms != s1.final_terms


def test_adapter_router_and_experts_scope(tmp_path):
    model = tiny_model("qwen2_moe")
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=_target(model), adapter="lora", adapter_rank=2,
                  adapter_router=True, out_dir=tmp_path / "r", **KW)
    meta = json.loads((res.patch_path / "patch.json").read_text())
    router = [e for e in meta["entries"] if e["name"].endswith("mlp.gate.weight")]
    assert router and router[0]["kind"] == "lowrank"
    model = tiny_model("qwen2_moe")
    before = _state(model)
    res = unlearn(model, FORGET, RETAIN, scope="experts", adapter="lora", adapter_rank=1, out_dir=tmp_path / "e",
                  **KW)
    meta = json.loads((res.patch_path / "patch.json").read_text())
    n_experts = sum(layer.num_experts for layer in find_moe_layers(model))
    assert sum(e.get("kind") == "lowrank" for e in meta["entries"]) == 2 * n_experts
    revert_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())


def test_retain_null_projection_holds_with_an_adapter():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[1]
    e = 2
    batch = torch.tensor([TOK(t)["input_ids"] for t in RETAIN])
    with torch.no_grad(), RoutingCapture(model, [layer], hidden_states=True) as cap:
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    r = cap.last.layers[layer.layer_idx]
    x = r.hidden.reshape(-1, r.hidden.shape[-1])[(r.topk_idx.reshape(-1, r.topk_idx.shape[-1]) == e).any(-1)]
    assert x.shape[0] > 0
    y0 = layer.expert_forward(e, x).detach().clone()
    kw = {**KW, "method": "ga", "steps": 4}
    unlearn(model, FORGET, RETAIN, scope="uoe", target=(layer.layer_idx, e), adapter="lora", adapter_rank=2,
            expert_projection="retain_null", projection_energy=1.0, **kw)
    y1 = layer.expert_forward(e, x).detach()
    assert torch.allclose(y0, y1, atol=1e-4), (y0 - y1).abs().max()
    free = tiny_model("qwen3_moe")
    unlearn(free, FORGET, RETAIN, scope="uoe", target=(layer.layer_idx, e), adapter="lora", adapter_rank=2, **kw)
    y2 = find_moe_layers(free)[1].expert_forward(e, x).detach()
    assert not torch.allclose(y0, y2, atol=1e-4)  # without the projection the same run moves them


def test_tampered_factors_are_refused_before_any_write(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("qwen2_moe")
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=_target(model), adapter="lora", out_dir=tmp_path / "p",
                  **KW)
    revert_patch(model, res.patch_path)
    before = _state(model)
    f = res.patch_path / "patch.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.startswith("a."))
    tensors[key] = tensors[key] * 1.001
    save_file(tensors, str(f))
    with pytest.raises(PatchError, match="sha256"):
        apply_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    with pytest.raises(PatchError):
        revert_patch(model, res.patch_path)


@pytest.mark.parametrize("opts,match", [
    (dict(scope="full", adapter="lora"), "scope"),
    (dict(scope="uoe", target="1:1", adapter="lora", adapter_rank=0), "adapter_rank"),
    (dict(scope="uoe", target="1:1", adapter="dora"), "adapter"),
    (dict(scope="uoe", target="1:1", adapter_router=True), "adapter_router"),
    (dict(scope="uoe", target="1:1", adapter="lora", method="ablate"), "ablate"),
])
def test_bad_adapter_options_are_refused(opts, match):
    model = tiny_model("qwen3_moe")
    before = _state(model)
    with pytest.raises(BadInputError, match=match):
        unlearn(model, FORGET, RETAIN, **{**KW, **opts})
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())


def test_gram_rank_zero_writes_no_statistics_and_caps_the_kept_rank(tmp_path):
    from moe_unlearn.unlearning.fusion import fuse_patches

    model = tiny_model("qwen2_moe")
    t = _target(model)
    bare = [unlearn(model, FORGET[i::2], RETAIN, scope="uoe", target=t, adapter="lora", adapter_gram_rank=0,
                    out_dir=tmp_path / f"b{i}", **KW) for i in range(1)]
    meta = json.loads((bare[0].patch_path / "patch.json").read_text())
    assert all("gram" not in e for e in meta["entries"])
    revert_patch(model, bare[0].patch_path)
    capped = unlearn(model, FORGET, RETAIN, scope="uoe", target=t, adapter="lora", adapter_gram_rank=2,
                     out_dir=tmp_path / "c", **KW)
    revert_patch(model, capped.patch_path)
    meta = json.loads((capped.patch_path / "patch.json").read_text())
    grams = [e["gram"] for e in meta["entries"] if "gram" in e]
    assert grams and all(0 < g["forget_energy"] <= 1.0 for g in grams)
    from safetensors.torch import load_file

    stored = load_file(str(capped.patch_path / "patch.safetensors"))
    assert all(v.shape[1] <= 2 for k, v in stored.items() if k.startswith("gram_"))
    with pytest.raises(BadInputError, match="Gram"):
        fuse_patches(model, [bare[0].patch_path, capped.patch_path], tmp_path / "f")


def test_grip_holds_on_a_low_rank_router():
    model = tiny_model("qwen3_moe")
    layer = find_moe_layers(model)[1]
    batch = torch.tensor([TOK(t)["input_ids"] for t in RETAIN])
    with torch.no_grad(), RoutingCapture(model, [layer], hidden_states=True) as cap:
        model(input_ids=batch, attention_mask=torch.ones_like(batch))
    hidden = cap.last.layers[layer.layer_idx].hidden
    x = hidden.reshape(-1, hidden.shape[-1])
    w0 = layer.router_logits(x).detach().clone()
    kw = {**KW, "method": "ga", "steps": 4}
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=(layer.layer_idx, 2), adapter="lora", adapter_rank=2,
                  adapter_router=True, router_projection="grip", projection_energy=1.0, **kw)
    assert res.details["adapter"]["low_rank_matrices"] == 3  # gate_up, down and the router
    w1 = layer.router_logits(x).detach()
    assert torch.allclose(w0, w1, atol=1e-4), (w0 - w1).abs().max()
    free = tiny_model("qwen3_moe")
    unlearn(free, FORGET, RETAIN, scope="uoe", target=(layer.layer_idx, 2), adapter="lora", adapter_rank=2,
            adapter_router=True, **kw)
    assert not torch.allclose(w0, find_moe_layers(free)[1].router_logits(x).detach(), atol=1e-4)


def test_adapter_run_resumes_from_a_checkpoint_to_the_same_factors(tmp_path, monkeypatch):
    from moe_unlearn.training import TrainHooks
    from moe_unlearn.training import train as real_train
    from moe_unlearn.unlearning import fit

    args = dict(scope="uoe", target=(2, 1), adapter="lora", adapter_rank=2, checkpoint_every=2,
                **{**KW, "steps": 6})
    ref = unlearn(tiny_model("qwen2_moe"), FORGET, RETAIN, out_dir=tmp_path / "ref", **args)

    class Crash(Exception):
        pass

    class CrashAt(TrainHooks):
        def after_step(self, step):
            if step == 5:
                raise Crash

    monkeypatch.setattr(fit, "train", lambda *a, hooks, **k: real_train(*a, hooks=[*hooks, CrashAt()], **k))
    model = tiny_model("qwen2_moe")
    before = _state(model)
    with pytest.raises(Crash):
        unlearn(model, FORGET, RETAIN, out_dir=tmp_path / "run", **args)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    monkeypatch.setattr(fit, "train", real_train)
    res = unlearn(tiny_model("qwen2_moe"), FORGET, RETAIN, out_dir=tmp_path / "run", resume=True, **args)
    assert res.history.resumed_from == 4
    from safetensors.torch import load_file

    got, want = load_file(res.patch_path / "patch.safetensors"), load_file(ref.patch_path / "patch.safetensors")
    assert got.keys() == want.keys() and any(k.startswith("a.") for k in got)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_bf16_adapter_round_trip_and_cli(tmp_path):
    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    before = _state(model)
    res = unlearn(model, FORGET, RETAIN, scope="uoe", target=(2, 1), adapter="lora", out_dir=tmp_path / "p", **KW)
    after = _state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    revert_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    apply_patch(model, res.patch_path)
    assert all(torch.equal(v, _state(model)[k]) for k, v in after.items())

    from moe_unlearn.cli import main

    model_dir = tmp_path / "model"
    tiny_model("qwen2_moe").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(FORGET))
    out = tmp_path / "cli"
    assert main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--target", "2:1", "--out", str(out),
                 "--steps", "2", "--lr", "1e-2", "--adapter", "lora", "--adapter-rank", "3", "--quiet",
                 "--device", "cpu"]) == 0
    meta = json.loads((out / "patch.json").read_text())
    assert {e.get("rank") for e in meta["entries"] if e.get("kind") == "lowrank"} == {3}
    assert meta["config"]["adapter"] == "lora" and meta["config"]["adapter_rank"] == 3
    assert main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--scope", "full", "--out",
                 str(tmp_path / "bad"), "--adapter", "lora", "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
