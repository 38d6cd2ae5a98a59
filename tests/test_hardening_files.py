"""Bad inputs, third round, by class: numbers that come in from files are checked for finiteness and shape,
config fields for their declared types, results files cannot be mixed or lost, inputs are regular files of
bounded size, every way a reader can fail is one message (never a traceback), and multi-file outputs are
all-or-nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from _hardening_common import FORGET, KW, forbid_model_load, save_tiny, stderr_without_traceback
from _tiny_tokenizer import word_tokenizer
from safetensors.torch import load_file, save_file

from moe_unlearn import atomic, loading
from moe_unlearn.attribution import Attribution, attribute_experts
from moe_unlearn.cli import main
from moe_unlearn.errors import BadInputError, DataError, PatchError
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainConfig, train
from moe_unlearn.unlearning import apply_patch, revert_patch, unlearn
from moe_unlearn.unlearning.patch import META_FILE, TENSORS_FILE, tensor_hash
from moe_unlearn.validate import check_fields, check_type, parse_json, read_json_file

GATE = "model.layers.0.mlp.gate.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("hard3"))


_err = stderr_without_traceback
_no_model_load = forbid_model_load


def _copy(saved, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(saved[1], dst)
    return dst


# -- strict types of config fields ----------------------------------------------------------------

def test_typed_fields_never_coerce():
    refused = [(bool, "false"), (bool, "no"), (bool, "off"), (bool, 0), (bool, 1), (bool, None),
               (int, True), (int, 2.0), (int, "3"), (int, 2**64), (float, "1e-3"), (float, float("nan")),
               (float, float("inf")), (float, 1e39), (float, False), (str, 3), (str | None, 0),
               (list[int], "1,2"), (list[int], [1, "2"]), (tuple[int, ...], [1.5]), (tuple[float, float], [0.9]),
               (dict[str, float], ["a"]), (dict[str, float], {"a": "1"}), (int | None, "none")]
    for annotation, value in refused:
        with pytest.raises(BadInputError, match="must be|does not fit|overflows"):
            check_type("field", value, annotation)
    assert check_type("f", [1, 2], tuple[float, ...]) == (1.0, 2.0)
    assert check_type("f", "auto", bool | str) == "auto" and check_type("f", True, bool | str) is True
    assert check_type("f", None, float | None) is None and check_type("f", {"x": [1]}, dict[str, list[int]]) == {
        "x": [1]}


def test_every_config_checks_its_field_types(monkeypatch):
    from moe_unlearn.eval.relearn import RelearnConfig
    from moe_unlearn.frontier import FrontierConfig
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.loramoe.finetune import FinetuneConfig

    for kw in (dict(groups=["3", "3"], group_types=["a", "b"]), dict(rank="4"), dict(num_experts=6.0),
               dict(target_modules="q_proj"), dict(alpha="32"), dict(group_types=[1, 2], groups=[3, 3])):
        with pytest.raises(BadInputError):
            LoRAMoEConfig(**kw)
    for kw in (dict(resume="no"), dict(progress="false"), dict(steps="10"), dict(seed=-1), dict(lr=1e39)):
        with pytest.raises(BadInputError):
            FinetuneConfig(**kw) if "seed" not in kw and "lr" not in kw else FinetuneConfig(**kw).train_config(
                None).validate()
    for kw in (dict(resume="no"), dict(progress="no"), dict(steps=1, epochs=None, seed=2**64), dict(betas=[0.9]),
               dict(lr="1e-3")):
        with pytest.raises(BadInputError):
            TrainConfig(**{"steps": 1, **kw}).validate()
    for kw in (dict(fraction="0.1"), dict(steps=40.0), dict(seed=-1)):
        with pytest.raises(BadInputError):
            RelearnConfig(**kw).validate()
    monkeypatch.setattr("moe_unlearn.bench_model.load_or_build",
                        lambda *a, **k: pytest.fail("the bench model loaded before the config was checked"))
    for kw in (dict(seeds=(-1,)), dict(seeds=(0, 0)), dict(seeds=(2**64,)), dict(seeds=("0",)), dict(quick="no"),
               dict(batch_size=0), dict(steps=(40.5,)), dict(lrs={"uoe": ("0.1",)}), dict(eval_batch_size=True)):
        with pytest.raises(BadInputError):
            FrontierConfig(**kw).validate()
    cfg = check_fields(LoRAMoEConfig(target_modules=("q_proj",)))
    assert cfg.target_modules == ["q_proj"]


# -- readers: one message for every way a file can be bad -----------------------------------------

@pytest.mark.parametrize("text,word", [("[" * 60000, "nested too deeply"), ('{"a": NaN}', "finite"),
                                       ('{"a": -Infinity}', "finite"), ('{"a": 1e999}', "finite"),
                                       ('"\\ud800"', "lone surrogate"), ('{"\\udfff": 1}', "lone surrogate"),
                                       ("1" + "0" * 5000, "digits"), ("{'a': 1}", "not valid JSON")])
def test_parse_json_variants(text, word):
    with pytest.raises(DataError, match=word):
        parse_json(text)


def test_every_reader_survives_deep_nesting_and_bad_text(saved, tmp_path):
    from moe_unlearn.data import load_records, load_texts
    from moe_unlearn.loramoe.config import LoRAMoEConfig
    from moe_unlearn.unlearning.patch import read_patch_meta

    deep = "[" * 100000
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": ' + deep + "}\n")
    (tmp_path / "d.json").write_text(deep)
    (tmp_path / "s.jsonl").write_text('{"text": "a \\ud83d b"}\n')
    (tmp_path / "n.jsonl").write_text('{"text": "x", "score": NaN}\n')
    for name, word in (("d.jsonl", "line 2.*nested"), ("d.json", "nested"), ("s.jsonl", "surrogate"),
                       ("n.jsonl", "finite")):
        with pytest.raises(DataError, match=word):
            load_records(tmp_path / name)
    with pytest.raises(DataError, match="surrogate"):
        load_texts(["fine", "bad \udc80 text"])
    (tmp_path / "a.json").write_text(deep)
    with pytest.raises(DataError, match="nested"):
        Attribution.from_json(tmp_path / "a.json")
    (tmp_path / "l.json").write_text(deep)
    with pytest.raises(BadInputError, match="nested"):
        LoRAMoEConfig.load(tmp_path / "l.json")
    (tmp_path / "dm.json").write_text(deep)
    with pytest.raises(BadInputError, match="nested"):
        loading.parse_device_map(str(tmp_path / "dm.json"))
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / META_FILE).write_text(deep)
    (patch / TENSORS_FILE).write_bytes(b"")
    with pytest.raises(BadInputError, match="nested"):
        read_patch_meta(patch)
    model_dir = _copy(saved, tmp_path)
    (model_dir / "config.json").write_text(deep)
    with pytest.raises(BadInputError, match="nested"):
        loading.load_config(model_dir)


def test_text_fields_must_be_text():
    from moe_unlearn.data import load_examples
    from moe_unlearn.eval.items import item_from_record

    for record in ({"question": "q", "answer": {"x": 1}}, {"question": "q", "answer": ["a"]},
                   {"question": {"q": 1}, "answer": "a"}, {"question": "q", "answer": None},
                   {"question": "q", "answer": True}, {"text": {"t": 1}}, {"text": "a\ud800"}):
        with pytest.raises(DataError, match="holds a|surrogate|string"):
            load_examples([record])
    for record in ({"question": "q", "answer": {"x": 1}}, {"question": ["q"], "answer": "a"}, {"text": 3.5j}):
        with pytest.raises(DataError):
            item_from_record(record)
    assert load_examples([{"question": "q", "answer": 42}])[0].completion.strip() == "42"  # numbers are text


def test_inputs_must_be_regular_files_of_bounded_size(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    (tmp_path / "dir.txt").mkdir()
    for data, word in ((fifo, "FIFO"), (tmp_path / "zero.jsonl", "device"), (tmp_path / "dir.txt", "directory")):
        assert main(["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "a")]) == 2
        assert word in _err(capsys)
    tok = _copy(saved, tmp_path, "tok")
    (tok / "tokenizer.json").unlink()
    (tok / "tokenizer.json").symlink_to("/dev/zero")
    cfg = _copy(saved, tmp_path, "cfg")
    (cfg / "config.json").unlink()
    os.mkfifo(cfg / "config.json")
    for folder, word in ((tok, "tokenizer.json is a device"), (cfg, "config.json is a FIFO")):
        assert main(["attribute", "--model", str(folder), "--data", str(forget), "--out", str(tmp_path / "a")]) == 2
        assert word in _err(capsys)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(["w1 w2"] * 1000))
    with pytest.raises(DataError, match="more than"):
        read_json_file(big, max_bytes=1000)
    assert not (tmp_path / "a").exists()


# -- numbers from files: weights, patches, attributions ---------------------------------------------

def _edit_weights(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d, **kw):
    c = json.loads((d / "config.json").read_text())
    c.update(kw)
    (d / "config.json").write_text(json.dumps(c))


def test_weights_and_config_sizes_are_checked(saved, tmp_path, monkeypatch):
    damages = {
        "nan router": (lambda d: _edit_weights(d, lambda t: t[GATE].fill_(float("nan"))), "NaN or inf"),
        "inf embedding": (lambda d: _edit_weights(d, lambda t: t["model.embed_tokens.weight"].__setitem__(
            (2, 5), float("inf"))), "NaN or inf"),
        "int32 router": (lambda d: _edit_weights(d, lambda t: t.__setitem__(GATE, t[GATE].to(torch.int32))),
                         "not floating point"),
        "more layers": (lambda d: _edit_config(d, num_hidden_layers=3), "3 layers"),
        "huge layers": (lambda d: _edit_config(d, num_hidden_layers=2_000_000), "num_hidden_layers"),
        "more experts": (lambda d: _edit_config(d, num_local_experts=9, num_experts=9), "9 experts"),
        "huge experts": (lambda d: _edit_config(d, num_local_experts=4_000_000, num_experts=4_000_000),
                         "number of experts"),
    }
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained
    for what, (damage, word) in damages.items():
        d = _copy(saved, tmp_path, what.replace(" ", "_"))
        damage(d)
        allocate = what in ("nan router", "inf embedding")  # only these need the weights to see the problem
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real if allocate else
                            lambda *a, **k: pytest.fail("the model was built before the check"))
        with pytest.raises(BadInputError, match=word):
            loading.load_model(d)
    huge = _copy(saved, tmp_path, "inspect")
    _edit_config(huge, num_hidden_layers=2_000_000)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: pytest.fail("built on the meta device before the sizes were checked"))
    assert main(["inspect", str(huge)]) == 2


def test_attribution_never_ranks_nan_routing(saved):
    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    with pytest.raises(BadInputError, match="NaN"):
        attribute_experts(model, FORGET, tokenizer=word_tokenizer(), progress=False)


@pytest.fixture(scope="module")
def attribution_dict():
    return attribute_experts(tiny_model("qwen3_moe"), FORGET, tokenizer=word_tokenizer(), progress=False).to_dict()


def test_attribution_files_are_checked_before_the_model_loads(saved, tmp_path, capsys, monkeypatch,
                                                             attribution_dict):
    _no_model_load(monkeypatch)
    d = attribution_dict
    variants = {
        "nan": lambda x: x.__setitem__("affinity", [[float("nan")] * len(r) for r in x["affinity"]]),
        "fewer rows": lambda x: [x[k].pop() for k in ("affinity", "frequency", "mean_score", "counts")],
        "more layers": lambda x: x.__setitem__("layers", x["layers"] + [7]),
        "ragged": lambda x: x["affinity"][0].pop(),
        "top_k too big": lambda x: x.__setitem__("top_k", [99] * len(x["top_k"])),
        "string count": lambda x: x.__setitem__("num_tokens", "12"),
        "negative": lambda x: x["counts"][0].__setitem__(0, -3),
        "bool layer": lambda x: x.__setitem__("layers", [True, 1]),
        "score fn": lambda x: x.__setitem__("score_fns", ["relu"] * len(x["layers"])),
        "stability": lambda x: x.__setitem__("stability", [2.0] * len(x["layers"])),
    }
    for what, change in variants.items():
        x = json.loads(json.dumps(d))
        change(x)
        path = tmp_path / f"{what.replace(' ', '_')}.json"
        path.write_text(json.dumps(x))
        with pytest.raises(DataError):
            Attribution.from_json(path)
        assert main(["unlearn", "--model", str(saved[1]), "--forget", str(saved[2]), "--attribution", str(path),
                     "--out", str(tmp_path / "o"), "--quiet"]) == 2, what
        assert "attribution" in _err(capsys)
    (tmp_path / "inf.json").write_text(json.dumps(d).replace(f'"num_tokens": {d["num_tokens"]}',
                                                             '"num_tokens": 1e999'))
    with pytest.raises(DataError, match="finite"):
        Attribution.from_json(tmp_path / "inf.json")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    tok = word_tokenizer()
    unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=tok, target="1:2", steps=1, out_dir=root / "values", **KW)
    unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=tok, target="1:2", steps=1, out_dir=root / "lora",
            adapter="lora", adapter_rank=2, **KW)
    return root


def _tamper(src, dst, fn):
    """A copy of patch `src` changed by fn(tensors, meta), every hash re-recorded: only the number and shape
    checks can tell."""
    shutil.copytree(src, dst)
    t = load_file(str(dst / TENSORS_FILE))
    meta = json.loads((dst / META_FILE).read_text())
    fn(t, meta)
    for i, m in enumerate(meta["entries"]):
        if m.get("kind") == "lowrank":
            m["factor_sha256"] = {k: tensor_hash(t[f"{k}.{i}"]) for k in ("a", "b", "fix_index", "fix_value")}
        else:
            m.update({f"{k}_sha256": tensor_hash(t[f"{k}.{i}"]) for k in ("orig", "new")})
        if m.get("gram"):
            m["gram"]["sha256"] = {k: tensor_hash(t[f"gram_{k}.{i}"]) for k in ("forget", "retain")}
    save_file(t, str(dst / TENSORS_FILE))
    (dst / META_FILE).write_text(json.dumps(meta))
    return dst


def test_patch_numbers_and_shapes_are_checked(patches, tmp_path):
    meta = json.loads((patches / "lora" / META_FILE).read_text())
    li = next(i for i, m in enumerate(meta["entries"]) if m.get("kind") == "lowrank")

    def fix_outside(t, m):
        t[f"fix_index.{li}"] = torch.tensor([10**6], dtype=torch.int32)
        t[f"fix_value.{li}"] = torch.zeros(1, dtype=t[f"fix_value.{li}"].dtype)

    def energy(t, m):
        m["entries"][li]["gram"]["forget_energy"] = 7.0

    def squeeze(t, m):
        m["entries"][li]["layout"]["squeeze"] = 2

    variants = {
        "nan new values": ("values", lambda t, m: t["new.0"].view(-1).__setitem__(0, float("nan")), "NaN"),
        "inf orig values": ("values", lambda t, m: t["orig.0"].view(-1).__setitem__(1, float("-inf")), "NaN"),
        "fix index outside": ("lora", fix_outside, "outside"),
        "negative fix index": ("lora", lambda t, m: t[f"fix_index.{li}"].__setitem__(
            slice(None), -1) if t[f"fix_index.{li}"].numel() else fix_outside(t, m), "outside"),
        "a of wrong shape": ("lora", lambda t, m: t.__setitem__(f"a.{li}", torch.zeros(2, 7)), "shape"),
        "b of wrong rank": ("lora", lambda t, m: t.__setitem__(f"b.{li}", torch.zeros(t[f"b.{li}"].shape[0], 3)),
                            "shape"),
        "inf in b": ("lora", lambda t, m: t[f"b.{li}"].view(-1).__setitem__(0, float("inf")), "NaN"),
        "gram of wrong width": ("lora", lambda t, m: t.__setitem__(f"gram_forget.{li}", torch.zeros(5, 3)), "shape"),
        "nan gram": ("lora", lambda t, m: t[f"gram_forget.{li}"].view(-1).__setitem__(0, float("nan")), "NaN"),
        "gram energy": ("lora", energy, "energy"),
        "layout squeeze": ("lora", squeeze, "layout"),
        "int a": ("lora", lambda t, m: t.__setitem__(f"a.{li}", t[f"a.{li}"].to(torch.int32)), "stored as"),
    }
    for what, (src, change, word) in variants.items():
        patch = _tamper(patches / src, tmp_path / what.replace(" ", "_"), change)
        for fn in (apply_patch, revert_patch):
            model = tiny_model("qwen3_moe")
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with pytest.raises(PatchError, match=word):
                fn(model, patch)
            assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), what


def test_fuse_refuses_wrong_gram_factors(patches, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model("qwen3_moe").save_pretrained(model_dir)
    meta = json.loads((patches / "lora" / META_FILE).read_text())
    li = next(i for i, m in enumerate(meta["entries"]) if m.get("gram"))
    bad = _tamper(patches / "lora", tmp_path / "bad", lambda t, m: t.__setitem__(f"gram_forget.{li}",
                                                                                  torch.zeros(3, 2)))
    rc = main(["fuse", "--model", str(model_dir), "--patch", str(patches / "lora"), "--patch", str(bad), "--out",
               str(tmp_path / "f")])
    assert rc == 2 and "gram_forget" in _err(capsys) and not (tmp_path / "f").exists()


# -- frontier results: never mixed, never lost -------------------------------------------------------

def _results(path, **over):
    from moe_unlearn.frontier import FrontierConfig, protocol

    run = {"method": "npo", "variant": "uoe", "lr": 0.01, "seed": 0, "steps": 40, "forget_em": 0.1,
           "utility_em": 0.5, "neighbor_em": 0.4, "overlap_retain": 0.9}
    data = {"model": "natural", "quick": True, "protocol": protocol(FrontierConfig(quick=True)), "runs": [run]}
    data.update(over)
    path.write_text(json.dumps(data))
    return data


def test_frontier_results_files_are_checked_whole(tmp_path, monkeypatch):
    from moe_unlearn.frontier import (
        FrontierConfig,
        merge_results,
        read_results,
        results_lock,
        results_path,
        run_frontier,
    )

    monkeypatch.setattr("moe_unlearn.bench_model.load_or_build",
                        lambda *a, **k: pytest.fail("the bench model loaded before the results file was checked"))
    path = results_path(tmp_path, "natural", quick=True)
    good = _results(path)
    assert read_results(path)["runs"] == good["runs"]
    run = good["runs"][0]
    for runs in ([1, "x"], [{**run, "lr": "0.01"}], [{k: v for k, v in run.items() if k != "seed"}],
                 [{**run, "forget_em": 2.0}], [{**run, "utility_em": None}], [{**run, "steps": 0}],
                 [{**run, "seed": True}], [{**run, "lr": -1.0}]):
        _results(path, runs=runs)
        with pytest.raises(DataError, match="run 0 is malformed"):
            run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)
    assert read_results(_results(path, runs=[{**run, "diverged": "NaN loss", "forget_em": None}]) and path)
    for change, word in ((dict(batch_size=8), "batch_size: 16 there, 8 now"), (dict(max_length=32), "max_length")):
        _results(path)
        with pytest.raises(DataError, match=word):
            run_frontier(FrontierConfig(quick=True, **change), out_dir=tmp_path)
    proto = _results(path)["protocol"]
    _results(path, protocol={**proto, "lr_schedule": "cosine"})
    with pytest.raises(DataError, match="lr_schedule"):
        run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)
    _results(path, quick=False)
    with pytest.raises(DataError, match="not a frontier result"):
        run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)
    # one writer per results file: a second run (or merge) is refused while the first holds the lock
    _results(path)
    with results_lock(path):
        with pytest.raises(BadInputError, match="another process is writing"):
            run_frontier(FrontierConfig(quick=True), out_dir=tmp_path)
        with pytest.raises(BadInputError, match="another process is writing"):
            merge_results(path, [path])
    other = tmp_path / "other.json"
    _results(other, protocol={**proto, "batch_size": 4})
    with pytest.raises(DataError, match="another protocol"):
        merge_results(path, [other])
    assert json.loads(path.read_text()) == _results(tmp_path / "same.json")


# -- tracebacks become exit codes; sizes checked before allocating -------------------------------------

def test_cli_numbers_that_overflow_inside_torch_are_refused_up_front(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    m, f = str(model_dir), str(forget)
    unl = ["unlearn", "--model", m, "--forget", f, "--target", "1:2", "--quiet", "--out", str(tmp_path / "o")]
    monkeypatch.setattr("moe_unlearn.bench_model.load_or_build",
                        lambda *a, **k: pytest.fail("the bench model loaded before the flags were checked"))
    _no_model_load(monkeypatch)
    cases = [(unl + ["--seed", str(2**64)], "64-bit"), (unl + ["--seed", "-1"], "seed"),
             (unl + ["--lr", "1e39"], "float32"), (unl + ["--lr", "1e300"], "float32"),
             (unl + ["--anchor-weight", "1e40"], "float32"),
             (["frontier", "--quick", "--seeds=-1", "--out", str(tmp_path / "fr")], "seeds"),
             (["frontier", "--quick", "--seeds", "0,0", "--out", str(tmp_path / "fr")], "seed"),
             (["frontier", "--quick", "--seeds", str(2**70), "--out", str(tmp_path / "fr")], "64-bit"),
             (["attribute", "--model", m, "--data", f, "--out", str(tmp_path / "a"), "--seed", str(2**64)], "seed")]
    for argv, word in cases:
        assert main(argv) == 2, argv
        assert word in _err(capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sizes_are_checked_before_allocating(saved, tmp_path, capsys):
    _, model_dir, forget = saved
    for rank, match in ((90_000_000, "adapter_rank 90000000 exceeds"), (300_000_000, "adapter_rank must be <=")):
        with pytest.raises(BadInputError, match=match):
            unlearn(tiny_model("qwen3_moe"), FORGET, tokenizer=word_tokenizer(), target="1:2", steps=1,
                    adapter="lora", adapter_rank=rank, **KW)
    for flags in (["--experts", "50000000"], ["--rank", "100000000"], ["--experts", "4000", "--rank", "2000000"]):
        assert main(["loramoe", "train", "--model", str(model_dir), "--data", str(forget), "--out",
                     str(tmp_path / "l"), "--targets", "q_proj,v_proj", "--steps", "1", *flags]) == 2
        assert "GiB" in _err(capsys)
    assert not (tmp_path / "l").exists()


def test_interrupts_and_closed_pipes_are_quiet(monkeypatch, capsys):
    import moe_unlearn.commands.inspect as inspect_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    def closed_pipe(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(inspect_cmd, "run", interrupted)
    assert main(["inspect", "x"]) == 130
    err = _err(capsys)
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(inspect_cmd, "run", closed_pipe)
    assert main(["inspect", "x"]) == 141
    assert _err(capsys) == ""


def test_writers_that_fail_without_oserror_are_disk_errors(saved, tmp_path, capsys, monkeypatch):
    for text in ("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/3: "
                 "file write failed", "Error while serializing: IoError(Os { code: 28, kind: StorageFull })"):
        with pytest.raises(OSError) as info:
            with atomic.atomic_path(tmp_path / "x.pt"):
                raise RuntimeError(text)
        assert info.value.errno in (errno.ENOSPC, errno.EIO)
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through unchanged
        with atomic.atomic_path(tmp_path / "y.pt"):
            raise RuntimeError("unrelated")
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    def full(*a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device")

    monkeypatch.setattr(torch, "save", full)
    _, model_dir, forget = saved
    out = tmp_path / "o"
    assert main(["unlearn", "--model", str(model_dir), "--forget", str(forget), "--target", "1:2", "--steps", "2",
                 "--checkpoint-every", "1", "--out", str(out), "--quiet"]) == 2
    err = _err(capsys)
    assert "No space left" in err and "free some space" in err
    assert not out.exists() and not list((tmp_path / "o.ckpt").glob("*")) if (tmp_path / "o.ckpt").exists() else True


def test_stray_files_beside_checkpoints_are_not_checkpoints(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "step_final.pt").write_bytes(b"not mine")
    (ckpt / "step_12x.pt").write_bytes(b"nor this")
    (ckpt / "step_00000099.pt").mkdir()  # a folder, not a checkpoint
    os.mkfifo(ckpt / "step_00000098.pt")  # opening it would hang
    w = torch.ones(3, requires_grad=True)
    hist = train([w], lambda b: {"loss": (w * b).sum() ** 2}, [torch.ones(3)],
                 TrainConfig(steps=2, lr=0.1, progress=False, checkpoint_dir=str(ckpt), checkpoint_every=1,
                             resume=True))
    assert hist.resumed_from is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002.pt", "step_00000098.pt", "step_00000099.pt",
                                                      "step_12x.pt", "step_final.pt"]


# -- multi-file outputs: all or nothing ------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", [1, 2])
def test_staged_outputs_are_all_or_nothing(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "out"
    with atomic.staged_files(out, owned=("a.json", "b.png", "c.txt")) as st:
        for name in ("a.json", "b.png", "c.txt"):
            (st / name).write_text("old " + name)
    (out / "mine.txt").write_text("keep")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == fail_at + 3:  # after the three moves aside, fail on a move in
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        with atomic.staged_files(out, owned=("a.json", "b.png", "c.txt")) as st:
            for name in ("a.json", "b.png"):  # this run writes no c.txt: it would be removed
                (st / name).write_text("new " + name)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.png", "c.txt", "mine.txt"]
    assert all((out / n).read_text() == "old " + n for n in ("a.json", "b.png", "c.txt"))


def test_attribute_out_is_both_files_or_neither(saved, tmp_path, capsys, monkeypatch):
    _, model_dir, forget = saved
    out = tmp_path / "a"
    argv = ["attribute", "--model", str(model_dir), "--data", str(forget), "--out", str(out)]
    assert main(argv) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace

    def fail_png(src, dst):
        if str(dst).endswith("attribution.png") and ".staging" in str(src):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_png)
    assert main(argv + ["--max-length", "8"]) == 2
    _err(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_ablate_merge_writes_a_model_and_a_failed_write_restores_the_experts(tmp_path, monkeypatch):
    import moe_unlearn.unlearning.patch as patch_mod

    model = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = unlearn(model, FORGET, tokenizer=word_tokenizer(), method="ablate", target="1:2", merge=True,
                  out_dir=tmp_path / "merged", **KW)
    assert res.merged_path is not None and (tmp_path / "merged" / "config.json").exists()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patch_mod, "save_file", full)
    model = tiny_model("qwen3_moe")
    with pytest.raises(OSError):
        unlearn(model, FORGET, tokenizer=word_tokenizer(), method="ablate", target="1:2", out_dir=tmp_path / "p", **KW)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not (tmp_path / "p").exists()


def test_adapter_files_are_read_safely(tmp_path):
    from moe_unlearn.loramoe.peft_io import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, import_peft

    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    for name, cfg, weights, word in (("deep", "[" * 100000, b"", "nested"),
                                     ("r string", json.dumps({**good, "r": "2"}), b"", "integer"),
                                     ("alpha nan", json.dumps(good).replace('"lora_alpha": 4', '"lora_alpha": NaN'),
                                      b"", "finite"),
                                     ("garbled", json.dumps(good), b"\x00garbage" * 4, "damaged")):
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / PEFT_CONFIG_FILE).write_text(cfg)
        (d / PEFT_WEIGHTS_FILE).write_bytes(weights)
        with pytest.raises(BadInputError, match=word):
            import_peft(tiny_model("qwen3_moe"), d)
