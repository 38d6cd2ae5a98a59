"""Bad inputs, by class: no code runs from inputs, nothing wrong is written with exit code 0, every input is
checked before the model loads, outputs land safely, and damaged files give one message, not a traceback."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import stat

import pytest
import torch
from _hardening_common import FORGET, KW, save_tiny
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file, save_file

from moe_unlearn import atomic, loading
from moe_unlearn.attribution import attribute_experts
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError, DataError, PatchError, TrainingDiverged
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainConfig, TrainHooks, train
from moe_unlearn.unlearning import apply_patch, unlearn
from moe_unlearn.unlearning.patch import TENSORS_FILE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny qwen3_moe with its tokenizer, and forget/retain files."""
    return save_tiny(tmp_path_factory.mktemp("hard"))


def _copy_model(saved, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(saved[1], dst)
    return dst


def _no_model_load(monkeypatch):
    """Make any model load fail loudly, to prove a check ran before it."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(loading, "load_model", boom)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- 1. no code execution from inputs ------------------------------------------------------------

def _with_auto_map(model_dir, marker, file="config.json"):
    """A folder whose config points at its own module; importing the module would create `marker`."""
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((model_dir / file).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                       "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model_dir / file).write_text(json.dumps(cfg))


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_model_code_never_runs_without_trust(saved, tmp_path, capsys, monkeypatch, file):
    model_dir = _copy_model(saved, tmp_path)
    marker = tmp_path / "ran"
    _with_auto_map(model_dir, marker, file)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on stdin"))
    forget = str(saved[2])
    for argv in (["inspect", str(model_dir)], ["inspect", str(model_dir), "--load-weights"],
                 ["attribute", "--model", str(model_dir), "--data", forget, "--out", str(tmp_path / "a")],
                 ["unlearn", "--model", str(model_dir), "--forget", forget, "--target", "1:2", "--out",
                  str(tmp_path / "u"), "--quiet"],
                 ["evaluate", "--model", str(model_dir), "--forget", forget, "--retain", forget, "--out",
                  str(tmp_path / "e"), "--quiet"],
                 ["loramoe", "train", "--model", str(model_dir), "--data", str(tmp_path / "x.jsonl"), "--out",
                  str(tmp_path / "l")]):
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert "ships its own Python code" in err and "--trust-remote-code" in err, err
    assert not marker.exists() and not {p.name for p in tmp_path.iterdir()} & {"a", "e", "u", "l"}
    # the check is the only barrier it raises: trusted, the folder passes it
    assert loading.check_model_dir(model_dir, trust_remote_code=True) == model_dir


def test_hub_names_are_never_looked_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("gpt2", "Qwen/Qwen1.5-MoE-A2.7B", "https://huggingface.co/gpt2"):
        with pytest.raises(BadInputError, match="nothing is downloaded"):
            loading.load_tokenizer(name)
        with pytest.raises(BadInputError, match="nothing is downloaded"):
            loading.load_model(name)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _leaf_run(ckpt, **cfg):
    w = torch.ones(3, requires_grad=True)
    config = TrainConfig(**{**dict(steps=2, lr=0.1, progress=False, checkpoint_dir=str(ckpt), resume=True), **cfg})
    return train([w], lambda b: {"loss": (w * b).sum() ** 2}, [torch.ones(3)], config)


def test_checkpoints_are_never_unpickled_and_damage_is_one_message(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "ran"
    good = tmp_path / "good"
    _leaf_run(good, checkpoint_every=1)
    real = torch.load(next(good.glob("step_*.pt")), weights_only=True)
    cases = {
        "pickle with code": lambda p: torch.save({"params": [_Evil(str(marker))]}, p),
        "plain pickle with code": lambda p: p.write_bytes(pickle.dumps(_Evil(str(marker)))),
        "garbage": lambda p: p.write_bytes(b"\x00not a checkpoint" * 10),
        "truncated": lambda p: p.write_bytes(next(good.glob("step_*.pt")).read_bytes()[:200]),
        "not a dict": lambda p: torch.save([1, 2, 3], p),
        "missing keys": lambda p: torch.save({"params": real["params"]}, p),
        "wrong shapes": lambda p: torch.save({**real, "params": [torch.ones(5)]}, p),
        "NaN values": lambda p: torch.save({**real, "params": [torch.full((3,), float("nan"))]}, p),
    }
    for what, write in cases.items():
        for old in ckpt.iterdir():
            old.unlink()
        write(ckpt / "step_00000001.pt")
        with pytest.raises(BadInputError, match="checkpoint") as info:
            _leaf_run(ckpt)
        assert str(ckpt) in str(info.value), what
    assert not marker.exists()


# -- 2. nothing wrong written with exit code 0 ---------------------------------------------------

def test_nan_or_inf_from_the_last_update_is_never_returned(tmp_path):
    big = torch.full((1,), 3.3e38, requires_grad=True)  # the loss is finite, its update overflows float32
    with pytest.raises(TrainingDiverged, match="NaN/inf weights"):
        train([big], lambda b: {"loss": -big.sum()}, [0], TrainConfig(steps=1, lr=3e37, progress=False))

    class Poison(TrainHooks):
        def after_step(self, step):
            with torch.no_grad():
                w[0] = float("nan")

    w = torch.ones(3, requires_grad=True)
    ckpt = tmp_path / "ck"
    with pytest.raises(TrainingDiverged):
        train([w], lambda b: {"loss": (w ** 2).sum()}, [0], TrainConfig(steps=3, lr=0.1, progress=False,
                                                                        checkpoint_every=1, checkpoint_dir=str(ckpt)),
              hooks=Poison())
    assert not list(ckpt.glob("step_*.pt"))  # no poisoned checkpoint either


def test_unlearn_never_writes_nan_patch_or_merged_model(tmp_path, monkeypatch):
    tok = word_tokenizer()
    model = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    real_step = torch.optim.AdamW.step

    def nan_step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_step)
    for scope, merge in (("uoe", False), ("full", True), ("routers", False)):
        out = tmp_path / f"{scope}{merge}"
        with pytest.raises(TrainingDiverged):
            unlearn(model, FORGET, tokenizer=tok, scope=scope, target="1:2" if scope == "uoe" else None, steps=1,
                    out_dir=out, merge=merge, **KW)
        assert not out.exists()
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    tok = word_tokenizer()
    ck = tmp_path / "ck"
    ck.mkdir()  # existed before: kept after the run
    base = dict(forget=FORGET, tokenizer=tok, method="npo", scope="uoe", target="1:2", steps=2, checkpoint_every=1,
                checkpoint_dir=ck, **KW)
    unlearn(tiny_model("qwen3_moe"), **{**base, "out_dir": tmp_path / "first"})
    assert list(ck.glob("step_*.pt"))
    for change, word in [(dict(target="1:3"), "targets"), (dict(method="ga"), "method"),
                         (dict(lr=5e-3), "lr"), (dict(forget=FORGET[::-1]), "forget"),
                         (dict(method_kwargs={"beta": 0.5}), "hparams")]:
        out = tmp_path / f"o{len(word)}"
        with pytest.raises(BadInputError, match=f"different run .*{word}"):
            unlearn(tiny_model("qwen3_moe"), **{**base, **change, "resume": True, "out_dir": out})
        assert not out.exists()
    res = unlearn(tiny_model("qwen3_moe"), **{**base, "resume": True, "out_dir": tmp_path / "same"})
    assert res.history.resumed_from == 2


@pytest.fixture()
def patch_dir(tmp_path):
    model = tiny_model("qwen3_moe")
    res = unlearn(model, FORGET, tokenizer=word_tokenizer(), scope="uoe", target="1:2", steps=1,
                  out_dir=tmp_path / "patch", **KW)
    return res.patch_path


def _rewrite_tensors(patch, fn):
    t = load_file(str(patch / TENSORS_FILE))
    fn(t)
    save_file(t, str(patch / TENSORS_FILE))


def _rewrite_meta(patch, fn):
    meta = json.loads((patch / "patch.json").read_text())
    fn(meta)
    (patch / "patch.json").write_text(json.dumps(meta))


def test_apply_patch_checks_the_stored_tensors_and_fields(patch_dir, tmp_path):
    def tweak(t):
        t["new.0"] = t["new.0"].clone()
        t["new.0"].view(-1)[0] += 1

    damages = {
        "one value changed": lambda p: _rewrite_tensors(p, tweak),
        "wrong shape (would broadcast)": lambda p: _rewrite_tensors(p, lambda t: t.update({"new.0": t["new.0"][:1]})),
        "wrong dtype": lambda p: _rewrite_tensors(p, lambda t: t.update({"new.0": t["new.0"].double()})),
        "tensor missing": lambda p: _rewrite_tensors(p, lambda t: t.pop("new.1")),
        "truncated file": lambda p: (p / TENSORS_FILE).write_bytes((p / TENSORS_FILE).read_bytes()[:100]),
        "entries not a list": lambda p: _rewrite_meta(p, lambda m: m.update(entries={"a": 1})),
        "dim is a string": lambda p: _rewrite_meta(p, lambda m: m["entries"][0].update(dim="0", start=0, stop=1)),
        "negative shape": lambda p: _rewrite_meta(p, lambda m: m["entries"][0].update(shape=[-1])),
        "hash not hex": lambda p: _rewrite_meta(p, lambda m: m["entries"][0].update(new_sha256="zz")),
        "unknown dtype": lambda p: _rewrite_meta(p, lambda m: m["entries"][0].update(dtype="int3")),
        "no base model": lambda p: _rewrite_meta(p, lambda m: m.pop("base_model")),
    }
    for what, damage in damages.items():
        p = tmp_path / "p"
        shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(patch_dir, p)
        damage(p)
        model = tiny_model("qwen3_moe")
        before = {n: v.detach().clone() for n, v in model.named_parameters()}
        with pytest.raises((PatchError, BadInputError)):
            apply_patch(model, p)
        assert all(torch.equal(before[n], v) for n, v in model.named_parameters()), what
    apply_patch(tiny_model("qwen3_moe"), patch_dir)  # the undamaged patch still applies


def test_attribution_of_another_model_is_refused(tmp_path):
    tok = word_tokenizer()
    other = tiny_model("qwen3_moe", num_experts=8)  # the same family, other experts
    attr = attribute_experts(other, FORGET, tokenizer=tok, progress=False)
    attr.to_json(tmp_path / "a.json")
    for a in (attr, attribute_experts(tiny_model("qwen3_moe", seed=3, hidden_size=48), FORGET, tokenizer=tok,
                                      progress=False)):
        with pytest.raises(BadInputError, match="different model"):
            unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=tok, target=a, steps=1, **KW)
    attr.meta.pop("model")  # an older file without the model's identity: the shape check still holds
    with pytest.raises(BadInputError, match="does not fit the model"):
        unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=tok, target=attr, steps=1, **KW)


def test_targets_a_scope_would_ignore_and_data_with_nothing_to_train_are_refused(saved, tmp_path, capsys):
    tok = word_tokenizer()
    model = tiny_model("qwen3_moe")
    for scope in ("full", "experts", "routers"):
        with pytest.raises(BadInputError, match="would ignore"):
            unlearn(model, FORGET, tokenizer=tok, scope=scope, target="1:2", steps=1, **KW)
    for forget in (["w1", "w2", "w3"], ["w5"], ["w7"] * 4):
        with pytest.raises(DataError, match="no scored token positions"):
            unlearn(model, forget, tokenizer=tok, target="1:2", steps=1, **KW)
    _, model_dir, forget_file = saved
    attribute_experts(model, FORGET, tokenizer=tok, progress=False).to_json(tmp_path / "a.json")
    common = ["unlearn", "--model", str(model_dir), "--forget", str(forget_file), "--quiet", "--steps", "1"]
    for extra, msg in [(["--scope", "full", "--target", "1:2"], "would ignore"),
                       (["--scope", "routers", "--attribution", str(tmp_path / "a.json")], "would ignore"),
                       (["--scope", "uoe", "--attribution", str(tmp_path / "nothing.json")], "cannot read"),
                       (["--scope", "uoe", "--top-m", "3", "--target", "1:2"], "--top-m"),
                       (["--target", "1:2", "--attribution", "x.json"], "not both")]:
        assert main([*common, *extra, "--out", str(tmp_path / "o")]) == 2
        assert msg in _err(capsys)
    assert not (tmp_path / "o").exists()


# -- 3. every input checked, before the model loads ----------------------------------------------

def test_cli_checks_every_input_before_loading_the_model(saved, tmp_path, capsys, monkeypatch):
    root, model_dir, forget = saved
    _no_model_load(monkeypatch)
    (tmp_path / "file").write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    m, f = str(model_dir), str(forget)
    unl = ["unlearn", "--model", m, "--forget", f, "--target", "1:2", "--quiet"]
    cases = [
        (unl + ["--out", str(tmp_path / "o"), "--lr", "-1"], "lr must be > 0"),
        (unl + ["--out", str(tmp_path / "o"), "--lr", "nan"], "finite"),
        (unl + ["--out", str(tmp_path / "o"), "--set", "beta=0"], "beta must be > 0"),
        (unl + ["--out", str(tmp_path / "o"), "--set", "beta=abc"], "must be a number"),
        (unl + ["--out", str(tmp_path / "o"), "--set", "retain_loss=mse"], "retain_loss must be one of"),
        (unl + ["--out", str(tmp_path / "o"), "--set", "gamma=-1"], "gamma must be >= 0"),
        (unl + ["--out", str(tmp_path / "o"), "--steps", "0"], "steps must be >= 1"),
        (unl + ["--out", str(tmp_path / "o"), "--anchor-weight", "inf"], "finite"),
        (unl + ["--out", str(tmp_path / "o"), "--device", "gpu0"], "unknown device"),
        (unl + ["--out", str(tmp_path / "o"), "--device", "cuda:7"], "CUDA"),
        (unl + ["--out", str(tmp_path / "file")], "not a directory"),
        # the MoE-aware and loading options of the phased engine / shared model flags, also before the load
        (unl + ["--out", str(tmp_path / "o"), "--projection-energy", "0"], "projection_energy must be > 0"),
        (unl + ["--out", str(tmp_path / "o"), "--router-projection", "grip"], "needs retain data"),
        (unl + ["--out", str(tmp_path / "o"), "--coverage", "0.5"], "use scope 'topm'"),
        (unl + ["--out", str(tmp_path / "o"), "--top-m", "3"], "only read by --scope topm"),
        (unl + ["--out", str(tmp_path / "o"), "--attribution", str(tmp_path / "file")], "not both"),
        (unl + ["--out", str(tmp_path / "o"), "--dtype", "int3"], "unknown dtype"),
        (unl + ["--out", str(tmp_path / "o"), "--device-map", "{bad"], "device-map"),
        (unl + ["--out", str(tmp_path / "o"), "--checkpoint-every", "-1"], "checkpoint_every must be >= 0"),
        (unl + ["--out", str(model_dir / "sub")], "inside the model's own directory"),
        (["unlearn", "--model", m, "--forget", str(empty), "--target", "1:2", "--out", str(tmp_path / "o")], "empty"),
        (["unlearn", "--model", m, "--forget", f, "--target", "one", "--out", str(tmp_path / "o")], "LAYER:EXPERT"),
        (["attribute", "--model", m, "--data", f, "--out", str(tmp_path / "file")], "not a directory"),
        (["attribute", "--model", m, "--data", f, "--out", str(tmp_path / "a"), "--device", "tpu"], "device"),
        (["evaluate", "--model", m, "--forget", f, "--retain", f, "--out", str(model_dir)], "model's own directory"),
        (["evaluate", "--model", m, "--forget", f, "--retain", f, "--out", str(tmp_path / "e"),
          "--reference-auc", "2"], "reference-auc must be <= 1"),
        (["evaluate", "--model", m, "--forget", f, "--retain", f, "--out", str(tmp_path / "e"),
          "--device", "cuda:9"], "CUDA"),
        (["loramoe", "train", "--model", m, "--data", f, "--out", str(tmp_path / "l"), "--lr", "-2"], "lr must be"),
        (["loramoe", "train", "--model", m, "--data", f, "--out", str(model_dir / "run")], "model's own directory"),
        (["loramoe", "train", "--model", m, "--data", f, "--out", str(tmp_path / "l"), "--router", "topk",
          "--top-k", "9"], "top_k"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert msg in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "file"]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(p.name for p in saved[1].iterdir())


def test_token_ids_beyond_the_embedding_are_refused(saved, tmp_path, capsys):
    big = word_tokenizer(300)  # ids up to 302; the model has 128 rows
    texts = ["w1 w2 w250 w3", "w4 w5 w6"]
    model = tiny_model("qwen3_moe")
    with pytest.raises(DataError, match="embedding has 128 rows"):
        unlearn(model, texts, tokenizer=big, target="1:2", steps=1, **KW)
    with pytest.raises(DataError, match="embedding has 128 rows"):
        attribute_experts(model, texts, tokenizer=big, progress=False)
    from moe_unlearn.eval import evaluate

    with pytest.raises(DataError, match="embedding has 128 rows"):
        evaluate(model, big, forget=texts, retain=texts, generate=False)
    model_dir = _copy_model(saved, tmp_path)
    big.save_pretrained(model_dir)
    data = tmp_path / "d.txt"
    data.write_text("\n".join(texts))
    assert main(["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    assert "embedding" in _err(capsys) and not (tmp_path / "a").exists()


def test_value_checks_of_configs_devices_top_k_and_choices(tmp_path):
    from moe_unlearn.arch import find_moe_layers
    from moe_unlearn.eval.items import as_mcq_items
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.unlearning.objectives import get_objective

    for kw in (dict(lr=-1.0), dict(lr=float("nan")), dict(lr=0.0), dict(weight_decay=-0.1), dict(betas=(1.0, 0.9)),
               dict(max_grad_norm=float("inf")), dict(grad_accum=1.5), dict(steps=True), dict(eps=0.0)):
        with pytest.raises(BadInputError):
            TrainConfig(**{"steps": 1, **kw}).validate()
    for method, hp in [("npo", {"beta": 0}), ("npo", {"beta": -0.1}), ("simnpo", {"beta": float("nan")}),
                       ("graddiff", {"alpha": "x"}), ("graddiff", {"gamma": True}), ("rmu", {"layer": -1}),
                       ("rmu", {"steering_coeff": 0})]:
        with pytest.raises(BadInputError, match="hyperparameter"):
            get_objective(method).hparams(hp)
    for name in ("gpu", "cuda:x", "tpu:0", ""):
        with pytest.raises(BadInputError):
            loading.resolve_device(name)
    assert loading.resolve_device("cpu").type == "cpu"
    with pytest.raises(BadInputError, match="top-8 of 6 experts"):
        find_moe_layers(tiny_model("qwen3_moe", num_experts_per_tok=8))
    for kw in (dict(router="topk", top_k=7), dict(alpha=float("inf")), dict(lbc_weight=float("nan")),
               dict(rank=2.5)):
        with pytest.raises(BadInputError):
            LoRAMoEConfig(**kw)
    for record in ({"question": "q", "choices": ["a", "a"], "answer": 0},
                   {"question": "q", "choices": ["a", ""], "answer": 0},
                   {"question": "q", "choices": ["a", None], "answer": 0},
                   {"question": "q", "choices": ["a", {"x": 1}], "answer": 0},
                   {"question": "q", "choices": ["a", "b"], "answer": "C"},
                   {"question": "", "choices": ["a", "b"], "answer": 0}):
        with pytest.raises(DataError):
            as_mcq_items([record])
    attr = attribute_experts(tiny_model("qwen3_moe"), FORGET, tokenizer=word_tokenizer(), progress=False)
    with pytest.raises(BadInputError, match="top_m=13"):
        unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=word_tokenizer(), scope="topm", target=attr, top_m=13,
                steps=1, **KW)


def test_loramoe_type_labels_must_match_a_group():
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune

    records = [{"text": "w1 w2 w3", "type": "world"}, {"text": "w4 w5", "type": "World"},
               {"text": "w6 w7", "type": "tsak"}]
    cfg = FinetuneConfig(adapter=LoRAMoEConfig(num_experts=4, rank=2, groups=[2, 2], group_types=["world", "task"],
                                               lbc_weight=0.1), steps=1, progress=False)
    with pytest.raises(DataError, match=r"\['World', 'tsak'\] match no group"):
        finetune(tiny_model("qwen3_moe"), word_tokenizer(), records, cfg)


# -- 4. output directories -----------------------------------------------------------------------

def test_output_dir_checks(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out, msg in [(".", "current directory"), ("", "current directory"), (str(tmp_path), "current directory"),
                     ("/", "root"), (str(tmp_path / "f"), "not a directory"),
                     (str(tmp_path / "f" / "sub"), "is a file"), (str(model_dir), "model's own directory"),
                     (str(model_dir / "a" / "b"), "model's own directory"), ("model/../model/x", "model's own")]:
        with pytest.raises(BadInputError, match=msg):
            atomic.check_out_dir(out, model_dirs=(model_dir,))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("1")
    with pytest.raises(BadInputError, match="not empty"):
        atomic.check_out_dir(tmp_path / "full", must_be_empty=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(BadInputError, match="not writable"):
        atomic.check_out_dir(tmp_path / "new")
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(BadInputError, match="MiB free"):
        atomic.check_out_dir(tmp_path / "new")


def test_disk_full_mid_save_is_one_message_and_nothing_half_written(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    import moe_unlearn.unlearning.patch as patch_mod

    def full(tensors, path, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(patch_mod, "save_file", full)
    out = tmp_path / "patch"
    rc = main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--target", "1:2", "--steps", "1",
               "--out", str(out), "--quiet"])
    err = _err(capsys)
    assert rc == 2 and "No space left on device" in err and "free some space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no patch, no temp dir


def test_stale_outputs_and_temps_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "report"
    with atomic.staged_files(out, owned=("a.json", "plot.png")) as stage:
        (stage / "a.json").write_text("1")
        (stage / "plot.png").write_text("old plot")
    (out / "mine.txt").write_text("keep")
    with atomic.staged_files(out, owned=("a.json", "plot.png")) as stage:
        (stage / "a.json").write_text("2")  # this run has no plot
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "mine.txt"]

    dead = 2 ** 22 + 12345  # above any pid_max default: no such process
    stale = [tmp_path / f".patch.tmp-{dead}-abcd1234", tmp_path / f".x.json.file-{dead}-q_w3e4r5.json",
             out / f".files.staging-{dead}-zz00zz00"]
    for s in stale:
        if "tmp" in s.name or "staging" in s.name:
            s.mkdir()
        else:
            s.write_text("half")
    live = tmp_path / f".patch.tmp-{os.getpid()}-live0000"
    live.mkdir()
    with atomic.atomic_dir(tmp_path / "patch") as d:
        (d / "f").write_text("1")
    atomic.write_text(tmp_path / "x.json", "{}")
    with atomic.staged_files(out, owned=("a.json",)) as stage:
        (stage / "a.json").write_text("3")
    assert not any(s.exists() for s in stale) and live.exists()
    fresh = tmp_path / "fresh"
    (fresh / f".patch.tmp-{dead}-x0x0x0x0").mkdir(parents=True)  # a dead writer's temp is not content
    assert atomic.check_out_dir(fresh, must_be_empty=True) == fresh.resolve() and not any(fresh.iterdir())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "sub").mkdir()
            atomic.write_text(d / "sub" / "f.txt", "x")
        atomic.write_text(tmp_path / "g.txt", "y")
        with atomic.staged_files(tmp_path / "s") as st:
            (st / "h.txt").write_text("z")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "d" / "sub" / "f.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o777 & ~mask


# -- 5. damaged files: one message, not a traceback ----------------------------------------------

def _drop_first_tensor(path):
    tensors = load_file(str(path))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(path) + ".new", metadata={"format": "pt"})
    os.replace(str(path) + ".new", path)


def test_damaged_weights_are_refused(saved, tmp_path, capsys):
    weights = "model.safetensors"
    damages = {
        "truncated": lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:1000]),
        "empty": lambda d: (d / weights).write_bytes(b""),
        "a tensor missing": lambda d: _drop_first_tensor(d / weights),
        "another model's weights": lambda d: tiny_model("qwen3_moe", hidden_size=48).save_pretrained(d),
        "config.json garbled": lambda d: (d / "config.json").write_text("{not json"),
    }
    for what, damage in damages.items():
        d = tmp_path / what.replace(" ", "_").replace("'", "")
        shutil.copytree(saved[1], d)
        cfg = (d / "config.json").read_text()
        damage(d)
        if what == "another model's weights":
            (d / "config.json").write_text(cfg)
        with pytest.raises(BadInputError):
            loading.load_model(d)
        assert main(["inspect", str(d), "--load-weights"]) == 2, what
        assert str(d) in _err(capsys)


def test_a_huge_single_line_is_cut_before_tokenizing(monkeypatch):
    from moe_unlearn.data import tokenize_batches
    from moe_unlearn.eval.items import EvalItem
    from moe_unlearn.eval.scoring import PromptFormat, encode_items

    tok = word_tokenizer()
    line = " ".join(f"w{i % 100}" for i in range(400_000))  # ~2 MB, one line
    seen = []
    real = type(tok).__call__

    def spy(self, text, *a, **k):
        seen.append(max(len(t) for t in text) if isinstance(text, list) else len(text))
        return real(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    tb = tokenize_batches([line, "w1 w2"], tok, batch_size=2, max_length=64)
    assert max(seen) < 20_000 and tb.num_truncated == 1
    assert tb.sequences[0].tolist() == [i % 100 + 3 for i in range(64)]  # what the whole line gives
    tok.truncation_side = "left"  # keep the end: the cut is taken from the end too
    tail = tokenize_batches([line], tok, batch_size=1, max_length=8)
    assert tail.sequences[0].tolist() == [i % 100 + 3 for i in range(92, 100)]
    tok.truncation_side = "right"
    seen.clear()
    enc = encode_items(tok, [EvalItem(text=line)], PromptFormat(max_length=32))
    assert max(seen) < 20_000 and enc[0].ids == [i % 100 + 3 for i in range(32)]
