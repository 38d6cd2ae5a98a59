"""LoRAMoELinear against the naive per-expert formula; injection; what trains."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_unlearn.errors import BadInputError, MergeNotPossible
from moe_unlearn.loramoe import (
    LoRAMoEConfig,
    LoRAMoELinear,
    adapter_parameters,
    add_loramoe,
    loramoe_layers,
    merge_loramoe,
)
from moe_unlearn.testing import tiny_model


def tiny_dense(model_type: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def naive_delta(layer: LoRAMoELinear, x: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """sum_e g_e(x) * (alpha/r) * B_e A_e x, written per token and per expert."""
    out = torch.zeros(x.shape[0], layer.out_features, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        g = torch.softmax(layer.router.double() @ xt, dim=0)
        if top_k is not None:
            keep = torch.topk(g, top_k).indices
            sel = torch.zeros_like(g)
            sel[keep] = g[keep] / g[keep].sum()
            g = sel
        for e in range(layer.num_experts):
            out[t] += g[e] * layer.scale * (layer.lora_B[e].double() @ (layer.lora_A[e].double() @ xt))
    return out


@pytest.mark.parametrize("router,top_k", [("dense", None), ("topk", 2)])
def test_layer_matches_naive_formula(router, top_k):
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    cfg = LoRAMoEConfig(num_experts=5, rank=3, alpha=6.0, router=router, top_k=top_k or 2)
    layer = LoRAMoELinear(base, cfg, name="proj")
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; give it values so the mixture is not trivially 0
    x = torch.randn(2, 7, 12)
    got = layer(x)
    want = base(x).double() + naive_delta(layer, x.reshape(-1, 12), top_k).reshape(2, 7, 10)
    assert got.shape == (2, 7, 10)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # top-K really drops experts: the dense mixture differs
    if router == "topk":
        dense = base(x).double() + naive_delta(layer, x.reshape(-1, 12), None).reshape(2, 7, 10)
        assert (dense - want).abs().max() > 1e-3


def test_plain_lora_is_one_expert_without_router():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = LoRAMoELinear(base, LoRAMoEConfig(num_experts=1, rank=2, alpha=4.0, router="none"))
    assert layer.router is None
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    want = base(x) + 2.0 * x @ layer.lora_A[0].t() @ layer.lora_B[0].t()
    torch.testing.assert_close(layer(x), want)


def test_new_adapter_leaves_outputs_unchanged_and_only_adapters_train():
    model = tiny_dense("qwen2")
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids).logits
    add_loramoe(model, LoRAMoEConfig(num_experts=3, rank=2))
    names = sorted(loramoe_layers(model))
    assert names == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    torch.testing.assert_close(model(ids).logits, before)  # B = 0 at init

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in ("lora_A", "lora_B", "router")}
    assert set(adapter_parameters(model)) == trainable

    model.train()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None, n
    # B starts at zero, so A and the router get zero gradient in the first step; B does not
    layer = loramoe_layers(model)[names[0]]
    assert layer.lora_B.grad.abs().sum() > 0


def test_router_and_experts_get_gradient_once_B_is_nonzero():
    model = add_loramoe(tiny_dense("llama"), LoRAMoEConfig(num_experts=4, rank=2, router="topk", top_k=2))
    for layer in loramoe_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 128, (2, 6))
    model(ids, labels=ids).loss.backward()
    for layer in loramoe_layers(model).values():
        assert layer.lora_A.grad.abs().sum() > 0
        assert layer.router.grad.abs().sum() > 0


def test_moe_model_wraps_dense_mlp_and_attention_on_request():
    model = tiny_model("qwen3_moe", mlp_only_layers=[0])
    with pytest.raises(BadInputError, match="fused 3-D"):
        add_loramoe(tiny_model("qwen3_moe"), LoRAMoEConfig())  # every FFN is routed experts: nothing to wrap
    cfg = LoRAMoEConfig(num_experts=2, rank=2, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"])
    add_loramoe(model, cfg)
    names = set(loramoe_layers(model))
    assert {"model.layers.0.mlp.gate_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"} <= names
    assert not any("experts" in n or n.endswith("mlp.gate") for n in names)
    assert not model.model.layers[1].mlp.experts.gate_up_proj.requires_grad
    assert not model.model.layers[1].mlp.gate.weight.requires_grad
    ids = torch.randint(0, 128, (2, 5))
    model(ids, labels=ids).loss.backward()
    with pytest.raises(BadInputError, match="already"):
        add_loramoe(model, cfg)


def test_merge_raises_clear_error():
    model = add_loramoe(tiny_dense(), LoRAMoEConfig(num_experts=2, rank=2))
    with pytest.raises(MergeNotPossible, match="depend on each token"):
        merge_loramoe(model)


@pytest.mark.parametrize("kwargs", [
    dict(groups=[3, 2]),  # no group_types
    dict(groups=[3, 2], group_types=["a", "b"]),  # does not sum to 6
    dict(groups=[3, 3], group_types=["a", "a"]),
    dict(router="topk", top_k=7),
    dict(lbc_weight=0.1),  # LBC without groups
    dict(lbc_convention="multiply"),
    dict(router="softmax"),
])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(BadInputError):
        LoRAMoEConfig(**kwargs)


def test_moe_model_with_shared_experts(tmp_path):
    """qwen2_moe: shared experts (called on flattened [T, H] tokens) and the dense layer get adapters;
    the routed experts and the MoE routers stay frozen and still route as before."""
    from moe_unlearn.arch import RoutingCapture, find_moe_layers
    from moe_unlearn.loramoe import load_loramoe, routing_context, save_loramoe

    model = tiny_model("qwen2_moe")
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with RoutingCapture(model) as cap:
        model(input_ids=ids, attention_mask=mask)
    before = {i: r.topk_idx.clone() for i, r in cap.last.layers.items()}

    cfg = LoRAMoEConfig(num_experts=4, rank=2, groups=[2, 2], group_types=["a", "b"], lbc_weight=0.1)
    add_loramoe(model, cfg)
    names = set(loramoe_layers(model))
    assert "model.layers.0.mlp.shared_expert.down_proj" in names and "model.layers.1.mlp.up_proj" in names
    with RoutingCapture(model) as cap:  # B = 0: identical routing, and capture still finds the routers
        model(input_ids=ids, attention_mask=mask)
    assert all(torch.equal(before[i], r.topk_idx) for i, r in cap.last.layers.items())

    for layer in loramoe_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    model.train()
    with routing_context(model, mask, ["a", "b"]) as ctx:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert len(ctx.records) == len(names)
    (out.loss + ctx.balance_loss()).backward()
    for layer in find_moe_layers(model):
        assert layer.experts.gate_up_proj.grad is None and layer.router.weight.grad is None
    assert all(layer.router.grad is not None for layer in loramoe_layers(model).values())

    model.eval()
    save_loramoe(model, tmp_path / "a")
    fresh = load_loramoe(tiny_model("qwen2_moe"), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           fresh(input_ids=ids, attention_mask=mask).logits)
