"""Storage maps on planted cases whose ground truth is known by construction.

A tiny Qwen2-MoE with a word-level tokenizer. Expert `E_KEY` of the last MoE layer is amplified
(its down projection x 40), expert `E_NULL` of the same layer outputs exactly zero. Facts are
single-token answers defined from the model itself:
- forget items: prompts whose greedy answer differs between the model and the same model with
  E_KEY's weights zeroed (so zeroing E_KEY removes every one of them, provably);
- utility items: prompts whose answer is the same in both (so zeroing E_KEY keeps them all).
Zeroing E_NULL changes no output at all (its output is already zero), though tokens route to it.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.errors import BadInputError
from moe_unlearn.locate import (
    Component,
    LocateConfig,
    knowledge_check,
    knowledge_premise,
    middle_layers,
    storage_map,
)
from moe_unlearn.testing import tiny_model

E_KEY, E_NULL = 1, 4
WORDS = [f"w{i}" for i in range(120)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "Question:", "Answer:", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


@torch.no_grad()
def _answers(model, tok, prompts):
    """Greedy next token after each prompt and its top-1 margin."""
    out = []
    for p in prompts:
        ids = torch.tensor([tok(f"Question: {p}\nAnswer:")["input_ids"]])
        logits = model(input_ids=ids).logits[0, -1]
        top = logits.topk(2)
        out.append((int(top.indices[0]), float(top.values[0] - top.values[1])))
    return out


@pytest.fixture(scope="module")
def planted():
    tok = _tokenizer()
    model = tiny_model("qwen2_moe", seed=3, vocab_size=len(tok), hidden_size=32, num_experts=6,
                       num_experts_per_tok=2, mlp_only_layers=[])
    layer = find_moe_layers(model)[-1]
    with torch.no_grad():
        layer.get_expert(E_KEY)["down"].mul_(40.0)
        layer.get_expert(E_NULL)["down"].zero_()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(300)]
    full = _answers(model, tok, prompts)
    saved = layer.get_expert(E_KEY)["down"].clone()
    with torch.no_grad():
        layer.get_expert(E_KEY)["down"].zero_()
    without = _answers(model, tok, prompts)
    with torch.no_grad():
        layer.get_expert(E_KEY)["down"].copy_(saved)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    forget, utility = [], []
    for p, (a, ma), (b, mb) in zip(prompts, full, without, strict=True):
        if not vocab[a].startswith("w") or min(ma, mb) < 1e-3:
            continue  # a marker as answer, or a near tie: not a clean fact
        (forget if a != b else utility).append({"question": p, "answer": vocab[a]})
    forget, utility = forget[:24], utility[:24]
    assert len(forget) >= 8 and len(utility) >= 8, (len(forget), len(utility))
    return model, tok, layer.layer_idx, forget, utility


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_zeroing_the_planted_expert_removes_exactly_the_forget_facts(planted):
    model, tok, lay, forget, utility = planted
    before = _state(model)
    comps = [Component("key", "experts", "target", (lay,), ((lay, E_KEY),)),
             Component("null", "experts", "target", (lay,), ((lay, E_NULL),)),
             Component(f"routed experts {lay}", "routed", "routed experts", (lay,))]
    smap = storage_map(model, tok, forget, utility, components=comps, progress=False,
                       config=LocateConfig(methods=("zero", "mean", "reinit"), sample=64))
    assert smap.baseline["forget"]["em"] == 1.0 and smap.baseline["utility"]["em"] == 1.0
    key = smap.row("key", "zero")
    assert key["forget"]["em"] == 0.0 and key["utility"]["em"] == 1.0
    assert key["selectivity"] == pytest.approx(1.0 / 0.01)
    null = smap.row("null", "zero")  # its output is zero already: nothing changes
    assert null["forget"]["em"] == 1.0 and null["utility"]["em"] == 1.0 and null["selectivity"] == 0.0
    assert smap.row("null", "mean")["forget"]["em"] == 1.0  # its mean output is zero too
    assert smap.row("key", "reinit")["forget"]["em"] < 0.5  # random small weights lose the amplified output
    for k, v in model.state_dict().items():  # re-initialisation is undone
        assert torch.equal(v, before[k]), k


def test_knowledge_check_says_which_expert_holds_the_facts(planted):
    model, tok, lay, forget, utility = planted
    yes = knowledge_check(model, tok, forget, utility, [(lay, E_KEY)])
    no = knowledge_check(model, tok, forget, utility, [(lay, E_NULL)])
    assert yes.holds and yes.forget_after == 0.0 and yes.utility_after == 1.0
    assert not no.holds and no.forget_after == 1.0


def test_premise_verdict_uses_knowledge(planted):
    from moe_unlearn.attribution import PremiseWarning, attribute_experts

    model, tok, lay, forget, utility = planted
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in forget]
    retain = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in utility]
    att = attribute_experts(model, texts, tokenizer=tok, progress=False, retain=retain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routing_only = att.premise([(lay, E_NULL)], warn=False)
    assert routing_only.knowledge is None
    p_null = knowledge_premise(att, [(lay, E_NULL)], model, tok, forget, utility, warn=False)
    assert p_null.knowledge is not None and not p_null.knowledge.holds and not p_null.holds
    with pytest.warns(PremiseWarning, match="do not hold the forget knowledge"):
        knowledge_premise(att, [(lay, E_NULL)], model, tok, forget, utility)
    p_key = knowledge_premise(att, [(lay, E_KEY)], model, tok, forget, utility, warn=False)
    assert p_key.knowledge.holds and p_key.holds  # knowledge decides, whatever the routing numbers say
    d = p_key.to_dict()
    assert d["knowledge"]["holds"] is True and "coverage" in d


def test_default_components_and_outputs(planted, tmp_path):
    model, tok, lay, forget, utility = planted
    smap = storage_map(model, tok, forget, utility, progress=False, config=LocateConfig(methods=("zero",)))
    names = [r["component"] for r in smap.rows]
    assert "embeddings" in names and any(n.startswith("attention") for n in names)
    assert any(n.startswith("shared expert") for n in names) and any(n.startswith("target") for n in names)
    assert any(n.startswith("coverage") for n in names) and any(n.startswith("top expert") for n in names)
    assert smap.row("embeddings", "zero")["forget"]["em"] < 1.0  # no input, no answers
    files = smap.write(tmp_path, "sm")
    assert [f.name for f in files] == ["sm.json", "sm.md", "sm.png"] and all(f.stat().st_size > 0 for f in files)
    assert "| embeddings |" in files[1].read_text()


def test_plain_texts_use_nll(planted):
    model, tok, lay, forget, utility = planted
    f = [{"text": f"{r['question']} {r['answer']}"} for r in forget]
    u = [{"text": f"{r['question']} {r['answer']}"} for r in utility]
    smap = storage_map(model, tok, f, u, progress=False, config=LocateConfig(methods=("zero",)),
                       components=[Component("key", "experts", "target", (lay,), ((lay, E_KEY),))])
    assert smap.metric == "nll" and smap.baseline["forget"]["em"] is None
    assert smap.row("key", "zero")["forget"]["nll"] != smap.baseline["forget"]["nll"]


def test_bad_inputs(planted):
    model, tok, lay, forget, utility = planted
    with pytest.raises(BadInputError, match="method"):
        storage_map(model, tok, forget, utility, config=LocateConfig(methods=("drop",)), progress=False)
    with pytest.raises(BadInputError, match="layers the model does not have"):
        storage_map(model, tok, forget, utility, progress=False,
                    components=[Component("x", "routed", "routed experts", (17,))])
    mixed = storage_map(model, tok, forget, [{"text": "w1 w2 w3"}], progress=False,  # EM needs QA on both sides
                        components=[Component("x", "routed", "routed experts", (lay,))])
    assert mixed.metric == "nll"
    assert middle_layers(6) == (2, 3, 4) and middle_layers(2) == (1,)


def _saved(planted, tmp_path, utility_name: str):
    """The planted model saved with its tokenizer, and its forget / utility items as .jsonl files."""
    import json

    model, tok, _, forget, utility = planted
    mdir = tmp_path / "m"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    paths = {}
    for name, recs in (("forget", forget), (utility_name, utility)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return mdir, paths


def test_cli(planted, tmp_path, capsys):
    import json

    from moe_unlearn.cli import main

    model, tok, lay, forget, utility = planted
    mdir, paths = _saved(planted, tmp_path, "utility")
    out = tmp_path / "out"
    args = ["locate", "--model", str(mdir), "--forget", str(paths["forget"]), "--utility", str(paths["utility"]),
            "--out", str(out), "--sample", "16", "--device", "cpu"]
    assert main([*args, "--methods", "zero,melt"]) == 2
    assert "unknown ablation method" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--methods", "zero"]) == 0
    data = json.loads((out / "storage_map.json").read_text())
    assert data["metric"] == "em" and {r["method"] for r in data["rows"]} == {"zero"}
    assert (out / "storage_map.png").stat().st_size > 0 and "| component |" in capsys.readouterr().out


def test_unlearn_cli_warns_when_the_targets_do_not_hold_the_knowledge(planted, tmp_path, capsys):

    from moe_unlearn.cli import main

    model, tok, lay, forget, utility = planted
    mdir, paths = _saved(planted, tmp_path, "retain")

    def run(expert: int, *extra: str) -> str:
        out = tmp_path / f"out{expert}{len(extra)}"
        args = ["unlearn", "--model", str(mdir), "--forget", str(paths["forget"]), "--retain", str(paths["retain"]),
                "--target", f"{lay}:{expert}", "--steps", "1", "--out", str(out), "--quiet", "--device", "cpu", *extra]
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert main(args) == 0
        assert (out / "patch.json").is_file()
        return capsys.readouterr().err

    assert "do not hold the forget knowledge" in run(E_NULL)  # routed to, but stores nothing
    assert "do not hold the forget knowledge" not in run(E_KEY)  # zeroing it removes every forget answer
    assert "do not hold the forget knowledge" not in run(E_NULL, "--no-knowledge-check")


def test_locate_bench_writes_the_storage_map_of_a_bench_model(bench_cache, tmp_path):
    import json

    from moe_unlearn.bench_model.storage import locate_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quick model is below the EM target on purpose
        smap = locate_bench("natural", quick=True, cache_root=bench_cache, out_dir=tmp_path, progress=False,
                            config=LocateConfig(methods=("zero", "mean"), sample=16))
    data = json.loads((tmp_path / "storage_natural_quick.json").read_text())
    assert data["meta"]["model"] == "natural" and len(data["meta"]["weights_sha256"]) == 64
    assert {r["method"] for r in data["rows"]} == {"zero", "mean"} and len(smap.rows) == len(data["rows"])
    assert (tmp_path / "storage_natural_quick.png").is_file() and (tmp_path / "storage_natural_quick.md").is_file()


def test_locate_bench_checks_the_implant_against_the_reference(tmp_path):
    from moe_unlearn.bench_model.storage import REFERENCE_TOLERANCE, locate_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own cache: the shared one holds only the quick natural model
        smap = locate_bench("implanted", quick=True, cache_root=tmp_path / "cache", out_dir=tmp_path, progress=False,
                            config=LocateConfig(methods=("zero",), sample=16))
    ref, chk = smap.meta["reference"], smap.meta["implant_check"]
    assert ref["name"] == "quick-retrained" and chk["tolerance"] == REFERENCE_TOLERANCE
    row = smap.row("implant 1/2", "zero")
    assert chk["zero"]["forget_gap"] == pytest.approx(abs(row["forget"]["em"] - ref["forget"]["em"]), abs=1e-4)
    assert chk["zero"]["passes"] == (chk["zero"]["forget_gap"] <= REFERENCE_TOLERANCE
                                     and chk["zero"]["utility_gap"] <= REFERENCE_TOLERANCE)
    assert "Implant check" in (tmp_path / "storage_implanted_quick.md").read_text()
