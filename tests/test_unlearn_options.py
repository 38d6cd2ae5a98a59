"""The config carries its own metadata: CLI flags, strict run files, run identity and patch record
are derived from it; every string-keyed choice is a registry entry; ablate runs through the same
stages as every method (merge included)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import UnlearnConfig, apply_patch, revert_patch, unlearn
from moe_unlearn.unlearning.checks import check_unlearn_config
from moe_unlearn.unlearning.config import read_run_file
from moe_unlearn.unlearning.methods import METHODS
from moe_unlearn.unlearning.scopes import SCOPES

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(9)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]
KW = dict(tokenizer=TOK, batch_size=3, max_length=12, progress=False)


def _unlearn_parser() -> argparse.ArgumentParser:
    from moe_unlearn.commands import unlearn as cmd

    return cmd.add_parser(argparse.ArgumentParser().add_subparsers())


# -- the config's metadata -----------------------------------------------------------------------

def test_every_cli_option_has_its_flag_with_the_fields_help_and_choices():
    parser = _unlearn_parser()
    actions = {a.dest: a for a in parser._actions}
    for name, opt in UnlearnConfig.options().items():
        if not opt.cli:
            continue
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.help == opt.help and action.default is None
        if opt.choices is not None:
            assert list(action.choices) == list(opt.choices())
    assert list(actions["method"].choices) == list(METHODS) and "ablate" in METHODS
    assert list(actions["scope"].choices) == list(SCOPES)
    args = parser.parse_args(["--weight-decay", "0.5", "--merge", "--adapter-rank", "4"])
    assert args.weight_decay == 0.5 and args.merge is True and args.adapter_rank == 4


@pytest.mark.parametrize("text,match", [
    ('{"merge": "false"}', "merge must be true or false, got 'false'"),
    ('{"steps": 2.0}', "steps must be an integer"),
    ('{"lr": "fast"}', "lr must be a number"),
    ('{"scope": 3}', "scope must be a string"),
    ('{"method_kwargs": "beta=0.1"}', "method_kwargs must be a mapping"),
    ('{"adapter": "dora"}', "unknown adapter 'dora'; valid adapters: lora"),
])
def test_run_files_are_strictly_typed(tmp_path, text, match):
    f = tmp_path / "run.json"
    f.write_text(text)
    with pytest.raises(BadInputError, match=match):
        UnlearnConfig.from_dict(read_run_file(f))


def test_a_string_bool_in_a_run_file_fails_the_cli_with_one_error_and_writes_nothing(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text('merge: "false"\n')
    out = tmp_path / "o"
    assert main(["unlearn", "--config", str(f), "--model", "m", "--forget", "f", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "merge must be true or false" in err and "Traceback" not in err
    assert not out.exists()


def test_yaml_exponents_are_numbers(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1e-4\nprojection_energy: 9.5E-1\nseed: 3\n")
    cfg = UnlearnConfig.from_dict(read_run_file(f))
    assert cfg.lr == 1e-4 and cfg.projection_energy == 0.95 and cfg.seed == 3


def test_the_api_refuses_the_same_bad_types():
    for bad in (dict(merge="false"), dict(allow_shared=1), dict(batch_size=2.0), dict(gradient_checkpointing="yes")):
        with pytest.raises(BadInputError, match=next(iter(bad))):
            check_unlearn_config(UnlearnConfig.build(**bad), has_retain=False)


def test_identity_and_record_are_the_fields_marked_for_them(tmp_path):
    cfg = UnlearnConfig.build(scope="uoe", target="1:2", steps=2, lr=1e-2, weight_decay=0.25, batch_size=3,
                              max_length=12, progress=False, out_dir=tmp_path / "p")
    options = UnlearnConfig.options()
    assert set(cfg.identity()) == {k for k, o in options.items() if o.identity}
    assert {"method", "scope", "batch_size", "max_length", "adapter_rank"} <= set(cfg.identity())
    assert cfg.record()["adapter_rank"] is None  # recorded only with an adapter
    assert UnlearnConfig.build(cfg, adapter="lora").record()["adapter_rank"] == 8
    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, RETAIN, tokenizer=TOK, config=cfg)
    meta = json.loads((res.patch_path / "patch.json").read_text())
    hp = meta["hyperparameters"]
    assert {k: hp[k] for k in cfg.record()} == cfg.record() and hp["weight_decay"] == 0.25
    assert hp["beta"] == 0.1  # the method's own hyperparameters too


def test_registries_word_unknown_names():
    with pytest.raises(BadInputError, match="unknown scope 'some'; valid scopes: full, all_but_routers, experts, routers, uoe, topm"):
        SCOPES.lookup("some")
    with pytest.raises(BadInputError, match="valid methods: eul, ga, graddiff, npo, rmu, simnpo, ablate"):
        METHODS.lookup("dpo")
    assert [n for n, s in SCOPES.items() if s.reads_targets] == ["uoe", "topm"]
    assert [n for n, s in SCOPES.items() if s.adapters] == ["experts", "uoe", "topm"]
    assert not METHODS["ablate"].trains and all(METHODS[m].trains for m in METHODS if m != "ablate")


# -- ablate through the same stages ----------------------------------------------------------------

def test_ablate_with_merge_saves_the_ablated_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = unlearn(model, FORGET, method="ablate", scope="uoe", target="1:2", merge=True, out_dir=tmp_path / "m", **KW)
    assert res.merged_path == tmp_path / "m" and res.patch_path is None and res.trainable_params == 0
    layer = find_moe_layers(model)[1]
    x = torch.randn(3, model.config.hidden_size)
    assert torch.count_nonzero(layer.expert_forward(2, x)) == 0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    after = dict(saved.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == [layer.experts_path + ".down_proj"]
    assert torch.count_nonzero(find_moe_layers(saved)[1].expert_forward(2, x)) == 0


def test_ablate_patch_records_the_run_and_replays(tmp_path):
    model = tiny_model("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = unlearn(model, FORGET, method="ablate", scope="topm", target=["1:2", "0:3"], out_dir=tmp_path / "p", **KW)
    meta = json.loads((res.patch_path / "patch.json").read_text())
    assert meta["method"] == "ablate" and meta["hyperparameters"] == {"roles": ["down", "down_bias"]}
    assert meta["config"]["method"] == "ablate" and meta["steps_run"] == 0 and meta["ablated_params"] > 0
    revert_patch(model, res.patch_path)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    apply_patch(model, res.patch_path)
    assert res.details == {"ablated_params": meta["ablated_params"]}


def test_ablate_refuses_what_it_cannot_do_and_changes_nothing(tmp_path):
    model = tiny_model("qwen2_moe")  # has shared experts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for opts, match in [(dict(scope="routers"), "uoe or topm"), (dict(target="1:shared", allow_shared=True),
                                                                 "routed experts only"),
                        (dict(method_kwargs={"beta": 1}), "takes no hyperparameters"),
                        (dict(adapter="lora"), "trains nothing")]:
        with pytest.raises(BadInputError, match=match):
            unlearn(model, FORGET, **{"method": "ablate", "scope": "uoe", "target": "1:2", "merge": True,
                                      "out_dir": tmp_path / "o", **KW, **opts})
        assert not (tmp_path / "o").exists()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_ablate_merge_through_the_cli(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    forget = tmp_path / "forget.txt"
    forget.write_text("\n".join(FORGET))
    out = tmp_path / "merged"
    assert main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--method", "ablate", "--target",
                 "1:2", "--merge", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert (out / "config.json").exists()


def test_an_option_added_to_the_config_reaches_the_cli_the_checks_and_the_loop(tmp_path):
    """keep_checkpoints was added as one UnlearnConfig field: the flag, the range check and the training
    loop's setting (moe_unlearn.training reads the fields it shares with the config) follow from it."""
    with pytest.raises(BadInputError, match="keep_checkpoints must be >= 1"):
        check_unlearn_config(UnlearnConfig.build(keep_checkpoints=0), has_retain=False)
    assert _unlearn_parser().parse_args(["--keep-checkpoints", "3"]).keep_checkpoints == 3
    ck = tmp_path / "ck"
    ck.mkdir()  # existed before the run: kept after it
    unlearn(tiny_model("qwen3_moe"), FORGET, method="ga", scope="uoe", target="1:2", steps=4, checkpoint_every=1,
            keep_checkpoints=3, checkpoint_dir=ck, out_dir=tmp_path / "p", **KW)
    assert len(list(ck.glob("step_*.pt"))) == 3
