"""The architecture layer against every supported family's real transformers modeling code.

Ground truth is always the model itself: the top-K indices and weights its experts module
actually receives in a forward pass, its `output_router_logits`, its block outputs.
"""

from __future__ import annotations

import pytest
import torch

from moe_unlearn.arch import SUPPORTED_FAMILIES, RoutingCapture, find_moe_layers, model_summary
from moe_unlearn.errors import BadInputError, NotAnMoEModel, UnsupportedFamily
from moe_unlearn.testing import SIGMOID_FAMILIES, TINY_FAMILIES, tiny_dense_model, tiny_model

FAMILIES = sorted(TINY_FAMILIES)


def _batch(seed: int = 0, batch: int = 2, seq: int = 7, pad: int = 2) -> dict[str, torch.Tensor]:
    """Token ids with left padding of `pad` tokens on the last row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, :pad] = 0
    ids[-1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


class _ExpertsInputs:
    """Records what each layer's experts module receives: (top-K indices, top-K weights)."""

    def __init__(self, layers):
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [lay.experts.register_forward_pre_hook(self._hook(lay.layer_idx), with_kwargs=True)
                         for lay in layers]

    def _hook(self, idx: int):
        def hook(module, args, kwargs):
            vals = list(args) + list(kwargs.values())
            self.seen[idx] = (vals[1].detach().clone(), vals[2].detach().clone())
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def test_every_supported_family_has_a_tiny_model():
    assert set(SUPPORTED_FAMILIES) == set(TINY_FAMILIES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_route_equals_what_the_model_routes(family, dtype):
    model = tiny_model(family).to(dtype)
    layers = find_moe_layers(model)
    spy = _ExpertsInputs(layers)
    try:
        with RoutingCapture(model, layers, hidden_states=True) as cap, torch.no_grad():
            model(**_batch(seq=9))
    finally:
        spy.remove()
    rec = cap.last
    assert sorted(rec.layers) == sorted(spy.seen) == [lay.layer_idx for lay in layers]
    for lay in layers:
        with torch.no_grad():
            routing = lay.route(rec.layers[lay.layer_idx].hidden)
        idx, weight = spy.seen[lay.layer_idx]
        assert routing.topk_idx.shape == (18, lay.top_k)
        assert torch.equal(routing.topk_idx, idx), f"layer {lay.layer_idx}: top-K indices differ"
        assert routing.topk_weight.dtype == torch.float32
        assert torch.equal(routing.topk_weight, weight.float()), f"layer {lay.layer_idx}: top-K weights differ"
        # the weights are not trivially the scores: both are [T, *] and finite
        assert routing.scores.shape == (18, lay.num_experts) and routing.scores.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_agree_with_output_router_logits(family):
    model = tiny_model(family)
    layers = find_moe_layers(model)
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch, output_router_logits=True)
        with RoutingCapture(model, layers, hidden_states=True) as cap:
            out = model(**batch, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    assert len(out.router_logits) == len(layers)
    rec = cap.last
    for lay, hf_logits in zip(layers, out.router_logits, strict=True):
        got = rec.layers[lay.layer_idx]
        assert torch.equal(got.logits, hf_logits)  # capture records exactly what HF records
        with torch.no_grad():
            scores = lay.route(got.hidden).scores
        torch.testing.assert_close(scores, lay.scores_from_logits(hf_logits), rtol=0, atol=0)
        if family in SIGMOID_FAMILIES:
            assert lay.score_kind == "sigmoid"
            torch.testing.assert_close(scores, torch.sigmoid(hf_logits.float()))
        else:
            assert lay.score_kind == "softmax"
            torch.testing.assert_close(scores.sum(-1), torch.ones(scores.shape[0]))
            torch.testing.assert_close(scores, torch.softmax(hf_logits.float(), -1))
        # captured routing (RouterRecord.routing) gives the same top-K as recomputation
        assert torch.equal(got.routing(lay).topk_idx, lay.route(got.hidden).topk_idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_is_bit_identical_and_marks_padding(family):
    model = tiny_model(family)
    batch = _batch(pad=3)
    with torch.no_grad():
        ref = model(**batch).logits
        with RoutingCapture(model) as cap:
            got = model(**batch).logits
    assert torch.equal(got, ref)
    rec = cap.last
    assert len(cap.records) == 1 and rec.shape == (2, 7)
    assert torch.equal(rec.mask, batch["attention_mask"].reshape(-1).bool())
    assert int((~rec.mask).sum()) == 3
    assert all(r.hidden is None for r in rec.layers.values())  # hidden states are off by default
    # hooks are gone after the context: a new forward adds no record
    with torch.no_grad():
        model(**batch)
    assert len(cap.records) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_writing_an_expert_changes_exactly_its_tokens(family):
    model = tiny_model(family, seed=1)
    lay = find_moe_layers(model)[-1]
    hidden = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing = lay.route(hidden)
        counts = torch.bincount(routing.topk_idx.reshape(-1), minlength=lay.num_experts)
        counts[counts == hidden.shape[1]] = 0  # an expert every token uses would test nothing
        expert = int(counts.argmax())
        chosen = routing.selected(expert)
        assert chosen.any() and not chosen.all(), "test needs tokens on both sides"
        before = lay.block_output(hidden)[0]
        new = {role: torch.randn(v.shape) for role, v in lay.get_expert(expert).items()}
        lay.set_expert(expert, new)
        after = lay.block_output(hidden)[0]
    changed = (after != before).any(dim=-1)
    assert torch.equal(changed, chosen)
    for role, value in lay.get_expert(expert).items():  # reads back what was written
        assert torch.equal(value, new[role]), role


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_views_rebuild_the_block_output(family):
    """sum_k w_k * expert_k(x) (+ shared experts) equals the block's own output, so the views
    are the right slices in the right orientation."""
    model = tiny_model(family)
    for lay in find_moe_layers(model):
        x = torch.randn(12, 32, generator=torch.Generator().manual_seed(lay.layer_idx))
        with torch.no_grad():
            want = lay.block_output(x.view(1, 12, 32))[0]
            r = lay.route(x)
            got = torch.zeros_like(x)
            for k in range(lay.top_k):
                for e in r.topk_idx[:, k].unique().tolist():
                    rows = r.topk_idx[:, k] == e
                    got[rows] += r.topk_weight[rows, k, None] * lay.expert_forward(e, x[rows])
            shared = lay.shared_output(x)
            assert (shared is not None) == lay.has_shared_experts
            if shared is not None:
                got += shared
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_slices_partition_the_fused_parameters(family):
    model = tiny_model(family)
    lay = find_moe_layers(model)[0]
    params = dict(model.named_parameters())
    covered: dict[str, torch.Tensor] = {}
    for e in range(lay.num_experts):
        slices = lay.expert_slices(e)
        assert sum(s.numel for s in slices) == lay.expert_num_params()
        for s in slices:
            assert params[s.name] is s.param
            assert s.view().untyped_storage().data_ptr() == s.param.untyped_storage().data_ptr()  # no copy
            m = s.mask()
            assert int(m.sum()) == s.numel
            prev = covered.get(s.name, torch.zeros_like(m))
            assert not (prev & m).any(), f"expert {e} overlaps another expert in {s.name}"
            covered[s.name] = prev | m
    assert all(bool(m.all()) for m in covered.values())  # together the experts are the whole tensors
    # the canonical views are views of these parameters (writing them writes the model)
    for role, v in lay.get_expert(1).items():
        assert any(v.untyped_storage().data_ptr() == s.param.untyped_storage().data_ptr()
                   for s in lay.expert_slices(1)), role
    inter = lay.get_expert(0)["gate"].shape[0]
    biases = sum(v.numel() for r, v in lay.get_expert(0).items() if r.endswith("_bias"))
    assert lay.expert_num_params() == 3 * 32 * inter + biases


@pytest.mark.parametrize("family", FAMILIES)
def test_router_parameters_are_the_router_weight_and_bias_only(family):
    model = tiny_model(family)
    params = dict(model.named_parameters())
    for lay in find_moe_layers(model):
        named = lay.router_parameters()
        names = [n for n, _ in named]
        assert all(params[n] is p for n, p in named)
        assert all(n.startswith(lay.router_path + ".") for n in names)
        assert any(n.endswith("weight") for n in names)
        assert all(n.endswith(("weight", "bias")) for n in names)
        assert ("correction" not in " ".join(names))
        assert lay.router_num_params() == lay.num_experts * 32 + (lay.num_experts if family == "gpt_oss" else 0)
        shared = lay.shared_expert_parameters()
        assert (len(shared) > 0) == lay.has_shared_experts
        if lay.has_shared_experts:
            assert all(n.startswith(lay.path + ".shared") for n, _ in shared)
            assert lay.shared_experts_path is not None


def test_dense_and_group_limited_layers_are_skipped():
    assert [lay.layer_idx for lay in find_moe_layers(tiny_model("qwen2_moe"))] == [0, 2]  # mlp_only_layers=[1]
    assert [lay.layer_idx for lay in find_moe_layers(tiny_model("deepseek_v3"))] == [1, 2]  # first_k_dense_replace
    lay = find_moe_layers(tiny_model("phimoe", num_experts_per_tok=3))[0]
    assert lay.top_k == 2  # sparsemixer is always top-2


def test_deepseek_v3_selection_uses_the_correction_bias_and_groups():
    model = tiny_model("deepseek_v3")
    lay = find_moe_layers(model)[0]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lay.route(x)
        groups = base.topk_idx // (lay.num_experts // lay.router.num_group)
        # experts come from at most topk_group groups
        assert all(len(set(row.tolist())) <= lay.router.topk_group for row in groups)
        torch.testing.assert_close(base.topk_weight.sum(-1), torch.full((64,), 2.5))  # renormalised * scale
        lay.router.e_score_correction_bias[3] = 10.0  # a huge bias forces expert 3 into every top-K
        biased = lay.route(x)
    assert bool(biased.selected(3).all()) and not bool(base.selected(3).all())
    # the bias chooses, but the weight is the unbiased sigmoid score
    w3 = (biased.topk_weight * (biased.topk_idx == 3)).sum(-1)
    assert bool((w3 < 2.5).all())


def test_dense_model_raises_not_an_moe_model():
    with pytest.raises(NotAnMoEModel, match="LlamaForCausalLM") as info:
        find_moe_layers(tiny_dense_model())
    assert "mixtral" in str(info.value) and "deepseek_v3" in str(info.value)


def test_unknown_moe_family_raises_unsupported_family():
    model = tiny_model("qwen3_moe")
    model.config.model_type = "brand_new_moe"
    with pytest.raises(UnsupportedFamily, match="brand_new_moe"):
        find_moe_layers(model)


def test_bad_expert_writes_nothing():
    lay = find_moe_layers(tiny_model("mixtral"))[0]
    before = {r: v.clone() for r, v in lay.get_expert(1).items()}
    with pytest.raises(BadInputError, match="out of range"):
        lay.get_expert(4)
    with pytest.raises(BadInputError, match="expected shape"):
        lay.set_expert(1, {"gate": torch.ones_like(before["gate"]), "down": torch.ones(3, 3)})
    with pytest.raises(BadInputError, match="unknown expert weight roles"):
        lay.set_expert(1, {"gate_bias": torch.ones(16)})
    assert all(torch.equal(v, before[r]) for r, v in lay.get_expert(1).items())


def test_model_summary_numbers():
    model = tiny_model("qwen2_moe")
    s = model_summary(model)
    total = sum(p.numel() for p in model.parameters())
    assert s["family"] == "qwen2_moe" and s["model_class"] == "Qwen2MoeForCausalLM"
    assert s["moe_layer_indices"] == [0, 2] and s["dense_layer_indices"] == [1]
    assert s["num_experts"] == 6 and s["top_k"] == 2 and s["has_shared_experts"] is True
    assert s["params_per_expert"] == 3 * 32 * 16 and s["total_params"] == total
    assert s["expert_pct_of_model"] == pytest.approx(100 * 3 * 32 * 16 / total)
    assert s["routed_expert_params"] == 2 * 6 * 3 * 32 * 16
    assert s["layers"][0]["shared_expert_params"] == 3 * 32 * 24 + 32
    assert model_summary(tiny_model("deepseek_v3"))["score_kind"] == "sigmoid"


def test_model_summary_works_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from moe_unlearn.testing import tiny_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("gpt_oss"))
    real = model_summary(tiny_model("gpt_oss"))
    assert model_summary(meta) == real


def test_capture_keeps_the_graph_when_asked():
    model = tiny_model("deepseek_v3")
    layers = find_moe_layers(model)
    with RoutingCapture(model, layers, detach=False) as cap:
        model(**_batch())
    lay = layers[0]
    scores = lay.scores_from_logits(cap.last.layers[lay.layer_idx].logits)
    scores[:, 0].sum().backward()  # e.g. a router-anchor loss
    (name, weight), = lay.router_parameters()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    assert lay.router.e_score_correction_bias.grad is None


def test_capture_during_cached_decoding_marks_only_the_new_tokens():
    model = tiny_model("qwen3_moe")
    batch = _batch(pad=2)
    with torch.no_grad(), RoutingCapture(model) as cap:
        out = model(**batch, use_cache=True)
        step = {"input_ids": torch.tensor([[5], [6]]),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
        model(**step, past_key_values=out.past_key_values, use_cache=True)
    first, second = cap.records
    assert first.shape == (2, 7) and second.shape == (2, 1)
    assert torch.equal(second.mask, torch.ones(2, dtype=torch.bool))
    assert second.layers[0].logits.shape == (2, 6)


def test_routing_called_outside_a_forward_is_recorded_without_a_mask():
    model = tiny_model("dbrx")
    lay = find_moe_layers(model)[0]
    with RoutingCapture(model, [lay]) as cap, torch.no_grad():
        routing = lay.route(torch.randn(5, 32))
    rec = cap.last
    assert rec.mask is None and torch.equal(rec.layers[lay.layer_idx].topk_idx, routing.topk_idx)


def test_known_unsupported_family_says_why():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("granitemoeshared", vocab_size=128, hidden_size=32, intermediate_size=16,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=16)
    with pytest.raises(UnsupportedFamily, match="shared MLP hangs off the decoder layer"):
        find_moe_layers(AutoModelForCausalLM.from_config(config))
