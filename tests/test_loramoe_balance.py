"""The localized balancing constraint: hand computation, padding, groups, context, direction after training."""

import random
import statistics

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from moe_unlearn.errors import BadInputError
from moe_unlearn.loramoe import (
    LoRAMoEConfig,
    add_loramoe,
    localized_balance_loss,
    loramoe_layers,
    routing_context,
)
from moe_unlearn.loramoe.finetune import FinetuneConfig, finetune


def cv2(values):
    """Squared coefficient of variation with the unbiased variance, by hand."""
    return statistics.variance(values) / statistics.fmean(values) ** 2


def fixed_case():
    # B=2 samples, S=3 tokens, E=4 experts; sample 0 has one padding token with all mass on expert 0
    gates = torch.tensor([[[.4, .3, .2, .1], [.1, .2, .3, .4], [1., 0., 0., 0.]],
                          [[.25, .25, .25, .25], [.7, .1, .1, .1], [.05, .05, .1, .8]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return gates, mask


@pytest.mark.parametrize("convention", ["divide", "official"])
def test_lbc_equals_hand_computation(convention):
    gates, mask = fixed_case()
    # Q by hand (padding excluded): sample 0 -> [.5, .5, .5, .5]; sample 1 -> [1.0, .4, .45, 1.15]
    q = {(0, 0): .5, (1, 0): .5, (2, 0): .5, (3, 0): .5, (0, 1): 1.0, (1, 1): .4, (2, 1): .45, (3, 1): 1.15}
    expert_group = [0, 0, 1, 1]
    sample_group = [0, 1]  # sample 0 is served by group 0, sample 1 by group 1
    d = 0.1
    z = []
    for (n, m), v in q.items():
        i = 1 + d if expert_group[n] == sample_group[m] else 1 - d
        z.append(v * i if convention == "official" else v / i)
    got = localized_balance_loss(gates, mask, torch.tensor(sample_group), torch.tensor(expert_group), d, convention)
    assert got.item() == pytest.approx(cv2(z), rel=1e-5)


def test_padding_is_excluded_and_untyped_samples_are_left_out():
    gates, mask = fixed_case()
    eg, sg = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    base = localized_balance_loss(gates, mask, sg, eg, 0.1)
    changed = gates.clone()
    changed[0, 2] = torch.tensor([0., 0., 0., 1.])  # only the padding token changes
    assert localized_balance_loss(changed, mask, sg, eg, 0.1).item() == pytest.approx(base.item(), rel=1e-6)
    # counting the padding token would change it
    assert localized_balance_loss(gates, None, sg, eg, 0.1).item() != pytest.approx(base.item(), rel=1e-3)
    # a third, untyped sample does not change the loss
    g3 = torch.cat([gates, torch.rand(1, 3, 4).softmax(-1)])
    m3 = torch.cat([mask, torch.ones(1, 3, dtype=torch.long)])
    got = localized_balance_loss(g3, m3, torch.tensor([0, 1, -1]), eg, 0.1)
    assert got.item() == pytest.approx(base.item(), rel=1e-6)
    # nothing typed: no loss
    assert localized_balance_loss(gates, mask, torch.tensor([-1, -1]), eg, 0.1).item() == 0.0


def test_three_groups():
    torch.manual_seed(0)
    gates = torch.rand(3, 4, 5).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    eg = [0, 1, 1, 2, 2]
    sg = [2, 0, 1]
    d = 0.2
    z = []
    for m in range(3):
        for n in range(5):
            q = sum(gates[m, s, n].item() for s in range(4) if mask[m, s])
            z.append(q / (1 + d if eg[n] == sg[m] else 1 - d))
    got = localized_balance_loss(gates, mask, torch.tensor(sg), torch.tensor(eg), d)
    assert got.item() == pytest.approx(cv2(z), rel=1e-5)


@pytest.mark.parametrize("convention,matching_gets_more", [("divide", True), ("official", False)])
def test_lbc_optimum_direction(convention, matching_gets_more):
    """Minimising the LBC alone over free routing logits: the predicted mass ratio appears."""
    torch.manual_seed(0)
    logits = torch.zeros(2, 5, 4, requires_grad=True)  # 2 samples, 5 tokens, 4 experts
    eg, sg, d = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1]), 0.1
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        localized_balance_loss(logits.softmax(-1), None, sg, eg, d, convention).backward()
        opt.step()
    q = logits.softmax(-1).sum(1)  # [2, 4]
    ratio = (q[0, :2].sum() / q[0, 2:].sum()).item()  # sample 0's matching / non-matching group
    want = (1 + d) / (1 - d) if matching_gets_more else (1 - d) / (1 + d)
    assert ratio == pytest.approx(want, rel=1e-2)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def byte_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def two_type_records(n=48, seed=0):
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        if i % 2 == 0:
            recs.append({"text": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(6)),
                         "type": "world"})
        else:
            recs.append({"prompt": "Q: " + "".join(rng.choice("0123456789") for _ in range(4)),
                         "response": " A: " + "".join(rng.choice("XYZ") for _ in range(3)), "type": "task"})
    return recs


@pytest.mark.parametrize("convention,matching_gets_more", [("divide", True), ("official", False)])
def test_short_training_separates_groups_in_predicted_direction(convention, matching_gets_more, tmp_path):
    recs = two_type_records()
    tok = byte_tokenizer([r.get("text", "") + r.get("prompt", "") + r.get("response", "") for r in recs])
    model = tiny_llama()
    adapter = LoRAMoEConfig(num_experts=4, rank=2, dropout=0.05, groups=[2, 2], group_types=["world", "task"],
                            lbc_weight=1.0, lbc_convention=convention)
    cfg = FinetuneConfig(method="loramoe", adapter=adapter, steps=30, lr=2e-2, batch_size=8, max_length=32,
                         progress=False)
    result = finetune(model, tok, recs, cfg, out_dir=tmp_path / "run")
    share = result.routing  # type -> [mass of group 0 ("world"), mass of group 1 ("task")]
    world_on_world, task_on_task = share["world"][0], share["task"][1]
    if matching_gets_more:
        assert world_on_world > 0.52 and task_on_task > 0.52, share
    else:
        assert world_on_world < 0.48 and task_on_task < 0.48, share
    assert result.history.terms["lbc"][-1] < result.history.terms["lbc"][0]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter", "routing_mass.json", "history.json", "finetune_config.json",
            "routing_mlp_down_proj.png", "routing_mlp_gate_proj.png"} <= files


def test_context_reaches_layers_only_inside_and_checks_shapes():
    model = add_loramoe(tiny_llama(), LoRAMoEConfig(num_experts=4, rank=2, groups=[2, 2], group_types=["a", "b"],
                                                    lbc_weight=0.5))
    ids = torch.randint(0, 300, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    with routing_context(model, mask, ["a", "b"]) as ctx:
        model(input_ids=ids, attention_mask=mask)
        with pytest.raises(BadInputError, match="do not nest"):
            with routing_context(model, mask, ["a", "b"]):
                pass
    assert len(ctx.records) == len(loramoe_layers(model)) == 6
    assert ctx.balance_loss().item() > 0
    assert all(layer.context is None for layer in loramoe_layers(model).values())
    # outside a context nothing is recorded and generate() works
    out = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert out.shape == (2, 8)
    with pytest.raises(BadInputError, match="type labels"):
        with routing_context(model, mask, ["a"]):
            pass
    with pytest.raises(BadInputError, match="exactly one forward"):
        with routing_context(model, mask[:, :3], ["a", "b"]):
            model(input_ids=ids, attention_mask=mask)


def test_observer_mass_per_type_excludes_padding(tmp_path):
    import json

    from moe_unlearn.loramoe import RoutingContext, RoutingMassObserver

    gates, mask = fixed_case()
    ctx = RoutingContext(mask, ["a", None], group_types=["a", "b"], expert_group=[0, 0, 1, 1], delta=0.1,
                         convention="divide")
    ctx.record("model.layers.0.mlp.up_proj", gates.reshape(6, 4))
    obs = RoutingMassObserver()
    obs.update(ctx)
    obs.update(ctx)  # accumulates
    mean = obs.mean_gate()["model.layers.0.mlp.up_proj"]
    assert mean["a"] == pytest.approx([.25, .25, .25, .25])  # (.4+.1)/2 ... the padding token's [1,0,0,0] is out
    assert mean["<untyped>"] == pytest.approx([1.0 / 3, .4 / 3, .45 / 3, 1.15 / 3])
    assert obs.summary([0, 0, 1, 1])["<untyped>"] == pytest.approx([1.4 / 3, 1.6 / 3])
    files = obs.save(tmp_path, [0, 0, 1, 1], ["a", "b"])
    assert sorted(p.name for p in files) == ["routing_mass.json", "routing_mlp_up_proj.png"]
    saved = json.loads((tmp_path / "routing_mass.json").read_text())
    assert saved["tokens"]["model.layers.0.mlp.up_proj"] == {"a": 4, "<untyped>": 6}
