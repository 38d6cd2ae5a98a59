"""Saving / loading adapters, generate(), the three fine-tuning methods and the CLI."""

import json

import pytest
import torch
from test_loramoe_balance import byte_tokenizer, tiny_llama, two_type_records

from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError, DataError, PatchError
from moe_unlearn.loramoe import LoRAMoEConfig, add_loramoe, load_loramoe, loramoe_layers, save_loramoe
from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune
from moe_unlearn.loramoe.model import ADAPTER_FILE, CONFIG_FILE
from moe_unlearn.testing import tiny_model


def trained_like(model, seed=1):
    """Give every adapter tensor random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in loramoe_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.router.copy_(torch.randn(layer.router.shape, generator=g))
    return model


@pytest.mark.parametrize("router", ["dense", "topk"])
def test_save_load_onto_fresh_model_is_identical_and_generate_matches(router, tmp_path):
    cfg = LoRAMoEConfig(num_experts=3, rank=2, router=router, groups=[2, 1], group_types=["a", "b"],
                        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"])
    model = trained_like(add_loramoe(tiny_llama(), cfg))
    path = save_loramoe(model, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == [ADAPTER_FILE, CONFIG_FILE]
    assert json.loads((path / CONFIG_FILE).read_text())["router"] == router

    fresh = load_loramoe(tiny_llama(), path)  # same seed = same base weights, stock model
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        want, got, base = model(ids).logits, fresh(ids).logits, tiny_llama()(ids).logits
    assert torch.equal(want, got)
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    gen_a = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen_b = fresh.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen_a.shape == (2, 13) and torch.equal(gen_a, gen_b)
    # saving again over an existing adapter replaces it
    save_loramoe(fresh, path)
    assert sorted(p.name for p in path.iterdir()) == [ADAPTER_FILE, CONFIG_FILE]


def test_mismatching_adapter_is_refused_and_model_untouched(tmp_path):
    model = trained_like(add_loramoe(tiny_llama(), LoRAMoEConfig(num_experts=2, rank=2)))
    path = save_loramoe(model, tmp_path / "adapter")
    other = tiny_model("qwen3_moe", mlp_only_layers=[0])  # hidden 32 too, but only layer 0 has a dense MLP
    with pytest.raises(PatchError, match="does not match"):
        load_loramoe(other, path)
    assert not loramoe_layers(other)
    wider = tiny_llama()
    wider.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 80, bias=False)
    with pytest.raises(PatchError, match="shape"):
        load_loramoe(wider, path)
    assert not loramoe_layers(wider)
    with pytest.raises(BadInputError, match="not a LoRAMoE adapter"):
        load_loramoe(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_share_the_path(method, tmp_path):
    recs = two_type_records(16)
    tok = byte_tokenizer([r.get("text", "") + r.get("prompt", "") + r.get("response", "") for r in recs])
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(method=method, adapter=LoRAMoEConfig(rank=2, dropout=0.05), steps=4, lr=1e-2, batch_size=8,
                         max_length=32, progress=False)
    res = finetune(model, tok, recs, cfg, out_dir=tmp_path / "run")
    assert res.history.terms["nll"][-1] < res.history.terms["nll"][0]
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    if method == "lora":
        layers = loramoe_layers(model)
        assert all(layer.num_experts == 1 and layer.router is None for layer in layers.values())
        assert changed == set()  # base weights frozen
        assert (tmp_path / "run" / "adapter" / ADAPTER_FILE).is_file()
        assert not (tmp_path / "run" / "routing_mass.json").exists()
    else:
        assert not loramoe_layers(model)
        assert "model.embed_tokens.weight" in changed and len(changed) > 10
        assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_prompt_tokens_get_no_loss():
    from moe_unlearn.loramoe.finetune import encode_records, make_batches

    recs = [{"prompt": "Q: 12", "response": " A: XY"}, {"text": "alpha beta"}]
    tok = byte_tokenizer(["Q: 12 A: XY alpha beta"])
    ex = encode_records(recs, tok, max_length=32)
    batch = make_batches(ex, 2, tok.pad_token_id, seed=0, shuffle=False)(0)[0]
    n_prompt = len(tok("Q: 12", add_special_tokens=False)["input_ids"])
    assert ex[0].num_prompt == n_prompt and ex[1].num_prompt == 0
    assert (batch["labels"][0, :n_prompt] == -100).all() and (batch["labels"][0, n_prompt:len(ex[0].ids)] >= 0).all()
    assert batch["labels"][0, -1].item() == tok.eos_token_id or len(ex[0].ids) < batch["labels"].shape[1]
    assert (batch["labels"][1, :len(ex[1].ids)] >= 0).all() and (batch["labels"][1, len(ex[1].ids):] == -100).all()


@pytest.fixture
def saved_model(tmp_path):
    recs = two_type_records(24)
    tok = byte_tokenizer([r.get("text", "") + r.get("prompt", "") + r.get("response", "") for r in recs])
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    tok.save_pretrained(d)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d, data


def test_cli_train_resume_and_bad_input(saved_model, tmp_path, capsys):
    model_dir, data = saved_model
    out = tmp_path / "run"
    common = ["loramoe", "train", "--model", str(model_dir), "--data", str(data), "--experts", "4", "--rank", "2",
              "--groups", "2,2", "--group-types", "world,task", "--batch-size", "8", "--max-length", "32",
              "--lr", "1e-2", "--no-progress"]
    assert main([*common, "--out", str(out), "--steps", "4", "--checkpoint-every", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == [4] and "lbc" in summary["final"]
    assert {"adapter", "checkpoints", "routing_mass.json", "history.json", "finetune_config.json"} <= {
        p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    run_cfg = json.loads((out / "finetune_config.json").read_text())
    assert run_cfg["config"]["adapter"]["lbc_weight"] == 0.1 and run_cfg["config"]["adapter"]["groups"] == [2, 2]
    assert FinetuneConfig.from_dict(run_cfg["config"]).to_dict() == run_cfg["config"]  # JSON round trip

    # an uninterrupted 6-step run equals 4 steps + resume to 6
    assert main([*common, "--out", str(out), "--steps", "6", "--checkpoint-every", "2", "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main([*common, "--out", str(straight), "--steps", "6"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(str(out / "adapter" / ADAPTER_FILE)), load_file(str(straight / "adapter" / ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    hist = json.loads((out / "history.json").read_text())
    assert hist["resumed_from"] == 4 and hist["steps"] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()

    # bad inputs: one clear error, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    for argv, msg in [
        (["--data", str(bad)], "needs a string 'text'"),
        (["--groups", "2,1"], "sum to num_experts"),
        (["--group-types", "x,y", "--lbc-weight", "0.5"], "no record has a 'type'"),
    ]:  # a flag given again overrides the one in `common`
        rc = main([*common, *argv, "--out", str(tmp_path / "never"), "--steps", "2"])
        assert rc == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "never").exists()
    assert main([*common, "--out", str(out), "--steps", "2"]) == 2  # not empty, no --resume
    assert "not empty" in capsys.readouterr().err


def test_load_records_with_datasets_rejects_malformed_json(tmp_path):
    from moe_unlearn.loramoe.finetune import load_finetune_records

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "type": "world"}\n{"prompt": "b", "response": "c"}\n')
    recs = load_finetune_records(p)
    assert recs[0]["text"] == "a" and recs[1]["response"] == "c" and recs[0]["type"] == "world"
    p.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError):
        load_finetune_records(p)
