"""attribute_experts / Attribution: planted routing, agreement with a naive computation from
output_router_logits, invariance to batching and padding, ranking rules, persistence, errors."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import ADAPTERS
from moe_unlearn.attribution import (
    SHARED_EXPERT,
    Attribution,
    AttributionStabilityWarning,
    attribute_experts,
    split_halves,
)
from moe_unlearn.errors import BadInputError, DataError, NotAnMoEModel
from moe_unlearn.testing import (
    SHARED_EXPERT_FAMILIES,
    SIGMOID_FAMILIES,
    TINY_FAMILIES,
    tiny_dense_model,
    tiny_model,
)

needs_deepseek_v3 = pytest.mark.skipif("deepseek_v3" not in ADAPTERS, reason="no deepseek_v3 adapter (yet)")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def random_texts(n: int, seed: int = 0, words: range = range(100), lo: int = 2, hi: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.choice(words)}" for _ in range(rng.randrange(lo, hi))) for _ in range(n)]


# -- planted routing ----------------------------------------------------------------

PLANTED = range(10, 20)  # words whose tokens are planted onto expert 3 of layer 1


def planted_model(tok):
    """qwen3_moe whose layer-1 router sends tokens of the PLANTED words to expert 3: those tokens'
    embeddings get a large positive component on hidden dim 0 (every other token a negative one)
    and router row 3 of layer 1 reads only that dim."""
    model = tiny_model("qwen3_moe", seed=3)
    ids = [tok.convert_tokens_to_ids(f"w{w}") for w in PLANTED]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = -1.0
        emb[ids, 0] = 4.0
        router = model.model.layers[1].mlp.gate.weight
        router[3] = 0.0
        router[3, 0] = 20.0
    return model


def test_planted_expert_ranks_first(tok):
    model = planted_model(tok)
    planted = attribute_experts(model, random_texts(24, seed=1, words=PLANTED), tokenizer=tok, batch_size=8,
                                progress=False)
    best = planted.top(1)[0]
    assert (best.layer, best.expert) == (1, 3) and not best.near_tie
    assert planted.target() == (1, 3)
    row = planted.layers.index(1)
    assert planted.frequency[row, 3] == 1.0  # every planted token selects it
    # on text without the planted words, (1, 3) is not preferred: the plant is what moved it
    control = attribute_experts(model, random_texts(24, seed=1, words=range(30, 100)), tokenizer=tok,
                                progress=False)
    assert control.affinity[row, 3] < 0.5 * planted.affinity[row, 3]
    assert control.target() != (1, 3)


# -- agreement with a naive computation ---------------------------------------------

def _naive_selection(model, family: str, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full scores [T, E] and top-K indices [T, K] recomputed from the config (independent of the adapters)."""
    cfg = model.config
    if family == "qwen3_moe":
        scores = torch.softmax(logits.float(), -1)
        return scores, scores.topk(cfg.num_experts_per_tok, -1).indices
    if family == "deepseek_v3":
        scores = torch.sigmoid(logits.float())
        return scores, None  # selection depends on the layer's bias: done by the caller
    raise AssertionError(family)


def _deepseek_v3_topk(scores: torch.Tensor, bias: torch.Tensor, cfg) -> torch.Tensor:
    choice = scores + bias
    T, E = choice.shape
    groups = choice.view(T, cfg.n_group, E // cfg.n_group)
    group_score = groups.topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, cfg.n_group, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(cfg.topk_group, -1).indices, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    return choice.topk(cfg.num_experts_per_tok, -1).indices


def naive_attribution(model, family, texts, tok):
    """One unpadded sequence per forward, output_router_logits, plain loops."""
    gates_per_seq, sel, score_sum, tokens = [], 0, 0, 0
    moe_layer_ids = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            out = model(input_ids=ids, output_router_logits=True)
            per_layer = []
            sel_l, score_l = [], []
            for li, logits in zip(moe_layer_ids, out.router_logits, strict=True):
                scores, idx = _naive_selection(model, family, logits)
                if idx is None:
                    bias = model.model.layers[li].mlp.gate.e_score_correction_bias
                    idx = _deepseek_v3_topk(scores, bias, model.config)
                onehot = torch.zeros_like(scores).scatter(1, idx, 1.0)
                per_layer.append((scores * onehot).mean(0))
                sel_l.append(onehot.sum(0))
                score_l.append(scores.sum(0))
            gates_per_seq.append(torch.stack(per_layer))
            sel = sel + torch.stack(sel_l)
            score_sum = score_sum + torch.stack(score_l)
            tokens += ids.shape[1]
    return moe_layer_ids, torch.stack(gates_per_seq).mean(0), sel, score_sum / tokens, tokens


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("deepseek_v3", marks=needs_deepseek_v3)])
def test_agrees_with_naive_router_logits(family, tok):
    model = tiny_model(family, seed=5)
    texts = random_texts(13, seed=2)
    layer_ids, affinity, counts, mean_score, tokens = naive_attribution(model, family, texts, tok)
    attr = attribute_experts(model, texts, tokenizer=tok, batch_size=5, progress=False)
    assert attr.layers == layer_ids
    assert attr.num_sequences == len(texts) and attr.num_tokens == tokens
    assert torch.equal(attr.counts, counts.long())
    torch.testing.assert_close(attr.affinity, affinity, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attr.mean_score, mean_score, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attr.frequency, counts / tokens)
    assert attr.score_fns == ["sigmoid" if family == "deepseek_v3" else "softmax"] * len(layer_ids)


@needs_deepseek_v3
def test_shared_experts_listed_not_selected(tok):
    model = tiny_model("deepseek_v3", seed=0)
    attr = attribute_experts(model, random_texts(6), tokenizer=tok, progress=False)
    assert attr.layers == [1, 2] and attr.shared_layers == [1, 2]
    assert all(not e.shared for e in attr.top(5))
    with_shared = attr.top(3, include_shared=True)
    assert [(e.layer, e.expert, e.score, e.shared) for e in with_shared[:2]] == [
        (1, SHARED_EXPERT, 1.0, True), (2, SHARED_EXPERT, 1.0, True)]
    assert with_shared[2] == attr.top(1)[0]


# -- invariance ------------------------------------------------------------------------

def test_invariant_to_batch_size_and_padding_side(tok):
    model = tiny_model("qwen3_moe", seed=1)
    texts = random_texts(17, seed=4)
    ref = attribute_experts(model, texts, tokenizer=tok, batch_size=1, progress=False)
    for bs, side in [(4, "right"), (4, "left"), (17, "left"), (6, "right")]:
        other = attribute_experts(model, texts, tokenizer=tok, batch_size=bs, padding_side=side, progress=False)
        assert torch.equal(other.counts, ref.counts), (bs, side)
        for name in ("affinity", "frequency", "mean_score"):
            torch.testing.assert_close(getattr(other, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
        assert (other.num_sequences, other.num_tokens) == (ref.num_sequences, ref.num_tokens)


def test_layers_subset_and_truncation_and_mode_restored(tok):
    model = tiny_model("qwen3_moe", seed=1).train()
    texts = random_texts(9, seed=6, lo=2, hi=30)
    full = attribute_experts(model, texts, tokenizer=tok, max_length=12, progress=False)
    assert model.training  # the caller's mode comes back
    one = attribute_experts(model, texts, tokenizer=tok, max_length=12, layers=[1], progress=False)
    assert one.layers == [1] and torch.equal(one.affinity[0], full.affinity[1])
    n_long = sum(len(t.split()) > 12 for t in texts)
    assert n_long > 0 and full.num_truncated == n_long
    assert full.num_tokens == sum(min(len(t.split()), 12) for t in texts)
    with pytest.raises(BadInputError, match="MoE layers are"):
        attribute_experts(model, texts, tokenizer=tok, layers=[7], progress=False)


# -- stability --------------------------------------------------------------------------

def test_stability_matches_separate_halves_and_warns(tok):
    model = tiny_model("qwen3_moe", seed=2)
    texts = random_texts(20, seed=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attr = attribute_experts(model, texts, tokenizer=tok, stability=True, seed=11, progress=False)
    halves = split_halves(len(texts), seed=11)
    parts = [attribute_experts(model, [t for t, h in zip(texts, halves.tolist(), strict=True) if h == side],
                               tokenizer=tok, progress=False) for side in (0, 1)]
    expected = []
    for r, k in enumerate(attr.top_k):
        tops = [{e.expert for e in p.ranking(layer=p.layers[r])[:k]} for p in parts]
        expected.append(len(tops[0] & tops[1]) / k)
    assert attr.stability == expected and attr.stability_seed == 11
    low = sum(expected) / len(expected) < 0.5
    assert any(issubclass(w.category, AttributionStabilityWarning) for w in caught) == low


def test_stability_warning_on_tiny_data(tok):
    # two one-word sequences on a random router: the halves cannot agree on the top-2 of every layer
    model = tiny_model("qwen3_moe", seed=0)
    with pytest.warns(AttributionStabilityWarning, match="too few"):
        attr = attribute_experts(model, ["w1", "w2 w90 w3"], tokenizer=tok, stability=True, progress=False)
    assert sum(attr.stability) / len(attr.stability) < 0.5


# -- ranking / persistence ------------------------------------------------------------------

def _handmade(affinity) -> Attribution:
    a = torch.tensor(affinity, dtype=torch.float32)
    L, E = a.shape
    return Attribution(layers=[2 * i for i in range(L)], affinity=a, frequency=a.clone(), mean_score=a.clone(),
                       counts=torch.arange(L * E).reshape(L, E), top_k=[2] * L, score_fns=["softmax"] * L,
                       shared_layers=[2], num_sequences=3, num_tokens=10)


def test_top_tie_breaking_and_near_tie_flag():
    attr = _handmade([[0.10, 0.30, 0.30], [0.299, 0.20, 0.05]])
    top = attr.top(4)
    # equal scores: lower layer, then lower expert first; 0.299 is within 1% of 0.30
    assert [(e.layer, e.expert) for e in top] == [(0, 1), (0, 2), (2, 0), (2, 1)]
    assert [e.near_tie for e in top] == [True, True, False, False]
    per_layer = attr.top(1, per_layer=True)
    assert [(e.layer, e.expert, e.near_tie) for e in per_layer] == [(0, 1, True), (2, 0, False)]
    clear = _handmade([[0.10, 0.40, 0.30], [0.2, 0.1, 0.0]])
    assert clear.top(1)[0].near_tie is False and clear.target() == (0, 1)
    assert clear.top(1, include_shared=True)[0] == clear.top(1, include_shared=True)[0]
    assert clear.top(1, include_shared=True)[0].expert == SHARED_EXPERT
    with pytest.raises(BadInputError):
        clear.top(0)


def test_json_roundtrip_and_plot(tmp_path, tok):
    attr = attribute_experts(tiny_model("qwen3_moe"), random_texts(5), tokenizer=tok, stability=True,
                             progress=False)
    attr.to_json(tmp_path / "a.json")
    back = Attribution.from_json(tmp_path / "a.json")
    for name in ("affinity", "frequency", "mean_score", "counts"):
        assert torch.equal(getattr(back, name), getattr(attr, name))
    assert (back.layers, back.num_tokens, back.stability, back.top(2)) == (
        attr.layers, attr.num_tokens, attr.stability, attr.top(2))
    attr.plot(tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]  # no temp files left
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError):
        Attribution.from_json(tmp_path / "bad.json")
    with pytest.raises(DataError):
        Attribution.from_json(tmp_path / "missing.json")


# -- bad input ------------------------------------------------------------------------------

def test_bad_inputs(tmp_path, tok):
    model = tiny_model("qwen3_moe")
    with pytest.raises(DataError, match="empty"):
        attribute_experts(model, [], tokenizer=tok, progress=False)
    with pytest.raises(NotAnMoEModel):
        attribute_experts(tiny_dense_model(), ["w1 w2"], tokenizer=tok, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        attribute_experts(model, tmp_path / "nope.txt", tokenizer=tok, progress=False)
    bad = tmp_path / "f.jsonl"
    bad.write_text('{"text": "w1"}\n{"prompt": "w2"}\n')
    with pytest.raises(DataError, match="line 2"):
        attribute_experts(model, bad, tokenizer=tok, progress=False)
    with pytest.raises(BadInputError, match="tokenizer"):
        attribute_experts(model, ["w1"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jsonl"]


# -- every family ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_every_family(family, tok):
    """Each token selects exactly K experts (frequency rows sum to K), gate mass stays in [0, 1] per
    token for softmax routers, the score kind and shared experts are those of the family."""
    if family not in ADAPTERS:
        pytest.skip(f"no {family} adapter")
    model = tiny_model(family)
    attr = attribute_experts(model, random_texts(4, seed=3), tokenizer=tok, batch_size=3, progress=False)
    k = torch.tensor(attr.top_k, dtype=torch.float32)
    torch.testing.assert_close(attr.frequency.sum(1), k)
    assert torch.equal(attr.counts.sum(1), k.long() * attr.num_tokens)
    assert attr.score_fns == ["sigmoid" if family in SIGMOID_FAMILIES else "softmax"] * len(attr.layers)
    assert bool(attr.shared_layers) == (family in SHARED_EXPERT_FAMILIES)
    assert (attr.affinity >= 0).all() and attr.num_sequences == 4
    if family not in SIGMOID_FAMILIES:
        torch.testing.assert_close(attr.mean_score.sum(1), torch.ones(len(attr.layers)))
        assert (attr.affinity.sum(1) <= 1 + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_cuda_matches_cpu(family, tok):
    """On CUDA the op dispatches to a compiled backend; the attribution must not change."""
    texts = random_texts(10, seed=9)
    cpu = attribute_experts(tiny_model(family), texts, tokenizer=tok, batch_size=4, progress=False)
    gpu = attribute_experts(tiny_model(family).cuda(), texts, tokenizer=tok, batch_size=4, progress=False)
    assert torch.equal(gpu.counts, cpu.counts)
    for name in ("affinity", "frequency", "mean_score"):
        torch.testing.assert_close(getattr(gpu, name), getattr(cpu, name), atol=1e-5, rtol=1e-4)
