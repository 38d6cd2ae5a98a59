"""PEFT interop: unlearning a PEFT-wrapped MoE writes patches named as in the stock model; LoRAMoE finds
targets through PEFT's base_layer; mergeable adapters merge; LoRA round trips to and from PEFT's format."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from moe_unlearn.arch import canonical_parameters, find_moe_layers, unwrap_model
from moe_unlearn.errors import BadInputError, MergeNotPossible
from moe_unlearn.loramoe import (
    LoRAMoEConfig,
    add_loramoe,
    export_peft,
    import_peft,
    load_loramoe,
    loramoe_layers,
    merge_loramoe,
    save_loramoe,
)
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import apply_patch, read_patch_meta, revert_patch, unlearn

peft = pytest.importorskip("peft")

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(10)) for i in range(4)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(10)) for i in range(4)]
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def randomise_lora(model, seed: int = 1):
    """PEFT initialises lora_B to zero (no effect); give every adapter weight random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_moe(seed: int = 0):
    """A qwen3_moe with PEFT LoRA on q/v_proj and on the fused expert tensor gate_up_proj."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          target_parameters=["mlp.experts.gate_up_proj"])
    model = peft.get_peft_model(tiny_model("qwen3_moe", seed=seed), cfg)
    randomise_lora(model)
    return model.eval()


def test_unwrap_and_discovery_see_through_peft():
    model = peft_moe()
    stock = tiny_model("qwen3_moe")
    assert unwrap_model(model) is model.get_base_model()
    wrapped, bare = find_moe_layers(model), find_moe_layers(stock)
    assert [la.path for la in wrapped] == [la.path for la in bare]
    # PEFT's ParamWrapper hides the fused tensors; the layer reads them through base_layer
    assert type(model.get_base_model().model.layers[0].mlp.experts).__module__.startswith("peft")
    assert [s.name for s in wrapped[0].expert_slices(1)] == [s.name for s in bare[0].expert_slices(1)]
    names = set(canonical_parameters(model))
    assert names == set(dict(stock.named_parameters()))  # no base_layer, no prefix, no lora_A / lora_B


def test_unlearn_peft_model_patch_applies_to_stock_model_and_reverts(tmp_path):
    model = peft_moe()
    stock = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in canonical_parameters(model).items()}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    res = unlearn(model, FORGET, RETAIN, method="ga", scope="uoe", target="1:2", steps=2, lr=5e-2, tokenizer=TOK,
                  batch_size=2, max_length=12, progress=False, out_dir=tmp_path / "patch")
    entries = read_patch_meta(res.patch_path)["entries"]
    assert entries and all(e["name"] in before for e in entries)
    assert any("experts.gate_up_proj" in e["name"] for e in entries)  # the PEFT-wrapped expert tensor
    after = canonical_parameters(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= {e["name"] for e in entries}
    for n, p in model.named_parameters():  # PEFT's adapter weights are not unlearned
        if n in lora_before:
            assert torch.equal(p, lora_before[n]), n
    apply_patch(stock, res.patch_path)  # stock model: same names, now holds the unlearned base weights
    stock_params = dict(stock.named_parameters())
    for n in changed:
        assert torch.equal(stock_params[n], after[n]), n
    revert_patch(model, res.patch_path)
    for n, p in canonical_parameters(model).items():
        assert torch.equal(p, before[n]), n
    with pytest.raises(BadInputError, match="PEFT"):
        unlearn(model, FORGET, RETAIN, method="ga", scope="uoe", target="1:2", steps=1, tokenizer=TOK,
                progress=False, out_dir=tmp_path / "merged", merge=True)


def test_add_loramoe_through_peft_base_layer_and_load_onto_peft_model(tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj"])
    model = peft.get_peft_model(tiny_llama(), lora)
    randomise_lora(model)
    twin = copy.deepcopy(model)
    cfg = LoRAMoEConfig(num_experts=3, rank=2, target_modules=["q_proj", "gate_proj", "down_proj"])
    add_loramoe(model, cfg)
    names = set(loramoe_layers(model))
    assert names == {f"model.layers.{i}.{m}" for i in range(2)
                     for m in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")}
    inner = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(inner).__module__.startswith("peft") and type(inner.base_layer).__name__ == "LoRAMoELinear"
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in loramoe_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    assert not torch.allclose(logits(model), logits(twin))
    save_loramoe(model, tmp_path / "adapter")
    load_loramoe(twin, tmp_path / "adapter")  # onto the same PEFT-wrapped model
    torch.testing.assert_close(logits(twin), logits(model))
    stock = tiny_llama()
    load_loramoe(stock, tmp_path / "adapter")  # and onto the stock model (same names)
    assert set(loramoe_layers(stock)) == names


@pytest.mark.parametrize("experts,router", [(1, "none"), (3, "none"), (1, "dense")])
def test_mergeable_adapters_merge_and_export_to_peft(experts, router, tmp_path):
    model = add_loramoe(tiny_llama(), LoRAMoEConfig(num_experts=experts, rank=2, router=router))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in loramoe_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)
    want = logits(model)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 * experts and cfg["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-4)
    merge_loramoe(model)
    assert not loramoe_layers(model)
    assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-4)


def test_routed_mixture_neither_merges_nor_exports(tmp_path):
    model = add_loramoe(tiny_llama(), LoRAMoEConfig(num_experts=2, rank=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MergeNotPossible, match="depend on each token"):
        merge_loramoe(model)
    with pytest.raises(MergeNotPossible, match="depend on each token"):
        export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists() and len(loramoe_layers(model)) == 6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_lora_gives_peft_outputs(rslora, tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                           use_rslora=rslora)
    pm = peft.get_peft_model(tiny_llama(), lora)
    randomise_lora(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    mine = import_peft(tiny_llama(), tmp_path / "peft")
    layer = next(iter(loramoe_layers(mine).values()))
    assert layer.num_experts == 1 and layer.router is None and layer.rank == 4
    torch.testing.assert_close(logits(mine), logits(pm), atol=1e-5, rtol=1e-4)
    export_peft(mine, tmp_path / "back")  # and back: PEFT loads it with the same outputs
    again = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back")).eval()
    torch.testing.assert_close(logits(again), logits(pm), atol=1e-5, rtol=1e-4)


def test_import_refuses_what_lora_moe_cannot_represent(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(str(tmp_path / "dora"))
    model = tiny_llama()
    with pytest.raises(BadInputError, match="DoRA"):
        import_peft(model, tmp_path / "dora")
    assert not loramoe_layers(model)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                           layers_to_transform=[0]))
    pm.save_pretrained(str(tmp_path / "part"))
    with pytest.raises(Exception, match="layers missing from the adapter"):
        import_peft(model, tmp_path / "part")
    assert not loramoe_layers(model)
