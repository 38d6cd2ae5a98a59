"""device_map / dtype through the one loader; unlearning and attribution on a dispatched model.

Only one CPU "device" exists here, so the CPU tests dispatch the model with accelerate's hooks
forced on (the code path of a multi-GPU device_map: every layer called through an
AlignDevicesHook); the test that splits the layers over two GPUs is skipped without them."""

from __future__ import annotations

import argparse

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.attribution import attribute_experts
from moe_unlearn.cli import main
from moe_unlearn.commands import load_from_args
from moe_unlearn.errors import BadInputError
from moe_unlearn.loading import parse_device_map, parse_dtype
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(9)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=12, progress=False)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(d)
    TOK.save_pretrained(d)
    return d


def _args(model_dir, **kw):
    return argparse.Namespace(model=str(model_dir), **{"device": None, "device_map": None, "dtype": None,
                                                       "trust_remote_code": False, **kw})


def test_shared_loader_flags(model_dir, tmp_path):
    model, tok = load_from_args(_args(model_dir, device_map="auto", dtype="bf16"))
    assert tok is not None and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_from_args(_args(model_dir, device="cpu", dtype="float32"))
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training
    with pytest.raises(BadInputError, match="not both"):
        load_from_args(_args(model_dir, device="cpu", device_map="auto"))
    with pytest.raises(BadInputError, match="unknown dtype"):
        parse_dtype("int3")
    with pytest.raises(BadInputError, match="not valid JSON"):
        parse_device_map("{model.layers.0: 0")
    with pytest.raises(BadInputError, match="expected auto"):
        parse_device_map("everywhere")
    f = tmp_path / "map.json"
    f.write_text('{"": "cpu"}')
    assert parse_device_map(str(f)) == {"": "cpu"}


def test_every_command_takes_the_model_flags(model_dir, tmp_path, capsys):
    data = tmp_path / "forget.txt"
    data.write_text("\n".join(FORGET))
    flags = ["--device-map", '{"": "cpu"}', "--dtype", "bfloat16"]
    assert main(["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "a"),
                 *flags]) == 0
    assert main(["unlearn", "--model", str(model_dir), "--forget", str(data), "--target", "1:0", "--steps", "1",
                 "--out", str(tmp_path / "p"), "--quiet", *flags]) == 0
    assert main(["inspect", str(model_dir), "--dtype", "bf16", "--json"]) == 0
    rc = main(["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "b"),
               "--device", "cpu", "--device-map", "auto"])
    assert rc == 2 and "not both" in capsys.readouterr().err


def _dispatched(seed=0):
    from accelerate import dispatch_model

    model = tiny_model("qwen3_moe", seed=seed)
    names = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    return dispatch_model(model, device_map=dict.fromkeys(names, "cpu"), force_hooks=True)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_unlearning_a_dispatched_model_matches_a_plain_one(prefix_cache):
    results = []
    for model in (tiny_model("qwen3_moe"), _dispatched()):
        res = unlearn(model, FORGET, RETAIN, method="npo", scope="uoe", target="1:2", steps=2, lr=1e-2,
                      retain_routing_weight=0.5, prefix_cache=prefix_cache, **KW)
        results.append(({n: p.detach().clone() for n, p in model.named_parameters()}, res.final_terms))
    (a, ta), (b, tb) = results
    assert hasattr(_dispatched().model.layers[1], "_hf_hook")
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    assert ta == pytest.approx(tb, rel=1e-5)
    att = [attribute_experts(m, FORGET, **KW).affinity for m in (tiny_model("qwen3_moe"), _dispatched())]
    assert torch.allclose(att[0], att[1], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_device_map_matches_one_gpu():
    from accelerate import dispatch_model

    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
             "model.norm": 1, "lm_head": 1}
    results = []
    for two in (False, True):
        model = tiny_model("qwen3_moe")
        model = dispatch_model(model, device_map=split) if two else model.to("cuda:0")
        att = attribute_experts(model, FORGET, **KW)
        res = unlearn(model, FORGET, RETAIN, method="npo", scope="uoe", target=None, steps=2, lr=1e-2,
                      retain_routing_weight=0.5, **KW)
        rmu = unlearn(model, FORGET, RETAIN, method="rmu", scope="uoe", target="1:0", steps=1, lr=1e-3, **KW)
        results.append((att.affinity, res.targets, {n: p.detach().cpu() for n, p in model.named_parameters()},
                        rmu.final_terms))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5) and results[0][1] == results[1][1]
    for n, v in results[0][2].items():
        assert torch.allclose(v, results[1][2][n], atol=1e-4), n
    assert results[0][3] == pytest.approx(results[1][3], rel=1e-3)
