"""UNDO restricted to the trained experts (distill_steps): the trained tensors are noised and the
unlearned model is distilled back into them; nothing else changes."""

from __future__ import annotations

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.errors import BadInputError
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(9)) for i in range(6)]
RETAIN = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]
KW = dict(tokenizer=TOK, method="npo", scope="topm", target=["0:1", "1:3"], routing="frozen", steps=3, lr=0.05,
          batch_size=3, max_length=12, progress=False)


def test_only_the_trained_experts_change_and_the_distillation_fits_the_teacher():
    model = tiny_model("qwen3_moe", seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = tiny_model("qwen3_moe", seed=4)
    unlearn(plain, FORGET, RETAIN, **KW)
    res = unlearn(model, FORGET, RETAIN, distill_steps=20, distill_noise=1.0, **KW)
    trained = {(lay.layer_idx, e) for lay, e in ((find_moe_layers(model)[0], 1), (find_moe_layers(model)[1], 3))}
    for lay in find_moe_layers(model):
        for e in range(lay.num_experts):
            for sl in lay.expert_slices(e):
                old = before[sl.name].narrow(sl.dim, sl.start, sl.stop - sl.start)
                same = torch.equal(sl.view(), old)
                assert same != ((lay.layer_idx, e) in trained), (sl.name, e)  # trained slices moved, no other
    expert_names = {sl.name for lay in find_moe_layers(model) for e in range(lay.num_experts)
                    for sl in lay.expert_slices(e)}
    for n, p in model.named_parameters():
        if n not in expert_names:
            assert torch.equal(p, before[n]), n  # routers, attention, embeddings: untouched
    undo = res.details["undo"]
    assert undo["steps"] == 20 and undo["final_kl"] < undo["first_kl"]  # the student moves toward the teacher
    # not the plain unlearned weights: the noised copy was retrained
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(),
                                                     strict=True))


@pytest.mark.parametrize("kw,match", [(dict(adapter="lora"), "distill_steps noises and retrains"),
                                      (dict(distill_noise=0.0), "distill_noise")])
def test_bad_distillation_options_fail_with_one_error(kw, match):
    with pytest.raises(BadInputError, match=match):
        unlearn(tiny_model("qwen3_moe"), FORGET, RETAIN, **{**KW, "distill_steps": 2, **kw})
