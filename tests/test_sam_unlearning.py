"""Sharpness-aware unlearning (sam_rho): the step gradient is the forget loss's gradient at
theta + rho * g / ||g|| over the trained slices, checked against a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.arch import find_moe_layers
from moe_unlearn.errors import BadInputError
from moe_unlearn.testing import tiny_model
from moe_unlearn.training import TrainHooks
from moe_unlearn.unlearning import unlearn
from moe_unlearn.unlearning.batches import tokenize
from moe_unlearn.unlearning.objectives import mean_nll

TOK = word_tokenizer()
FORGET = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(9)) for i in range(6)]
RHO = 0.05


class _FirstGrads(TrainHooks):
    """The trained leaves' gradients after the first backward (before clipping and the optimizer)."""

    def __init__(self):
        self.leaves, self.grads = None, None

    def on_train_start(self, optimizer):
        self.leaves = [p for group in optimizer.param_groups for p in group["params"]]

    def after_backward(self, step):
        if self.grads is None:
            self.grads = [p.grad.detach().clone() for p in self.leaves]


def _slice_grads(model, batch, slices):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = -mean_nll(logits, batch["labels"])  # GA
    params = list({id(s.param): s.param for s in slices}.values())
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params), strict=True))
    return [grads[id(s.param)].narrow(s.dim, s.start, s.stop - s.start) for s in slices]


def test_sam_step_gradient_matches_a_hand_computation():
    model = tiny_model("qwen3_moe", seed=2)
    hand = copy.deepcopy(model)
    slices = find_moe_layers(hand)[0].expert_slices(1)
    for p in hand.parameters():
        p.requires_grad_(True)
    (batch,) = tokenize(FORGET, TOK, batch_size=6, max_length=12, field_name=None, what="forget",
                        loss_tokens="answer", seed=0)
    g = _slice_grads(hand, batch, slices)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for s, x in zip(slices, g, strict=True):
            s.view().add_(RHO * x / norm)
    want = _slice_grads(hand, batch, slices)  # the forget gradient at theta + eps
    plain = g

    hook = _FirstGrads()  # routing frozen: the leaves are the target's slices (shadows), in slice order
    unlearn(model, FORGET, tokenizer=TOK, method="ga", scope="uoe", target="0:1", routing="frozen",
            sam_rho=RHO, steps=1, lr=1e-3, batch_size=6, max_length=12, max_grad_norm=0.0, progress=False,
            callbacks=[hook])
    assert [g.shape for g in hook.grads] == [w.shape for w in want]
    for got, w in zip(hook.grads, want, strict=True):
        assert torch.allclose(got, w, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(w, p, atol=1e-6) for w, p in zip(want, plain, strict=True))  # eps mattered


def test_sam_leaves_untrained_tensors_alone_and_differs_from_plain():
    a, b = tiny_model("qwen3_moe", seed=2), tiny_model("qwen3_moe", seed=2)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    kw = dict(tokenizer=TOK, method="npo", scope="uoe", target="0:1", steps=3, lr=0.05, batch_size=3, max_length=12,
              progress=False)
    retain = [" ".join(f"w{40 + (i * 5 + j) % 40}" for j in range(9)) for i in range(6)]
    res = unlearn(a, FORGET, retain, sam_rho=RHO, **kw)
    unlearn(b, FORGET, retain, **kw)
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                       "model.layers.0.mlp.gate.weight"} and changed
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert res.final_terms["loss"] == res.final_terms["loss"]  # finite, logged


@pytest.mark.parametrize("kw,match", [(dict(method="eul"), "sam_rho needs a forget loss of its own"),
                                      (dict(adapter="lora"), "does not combine with an adapter"),
                                      (dict(sam_rho=-1.0), "sam_rho")])
def test_bad_sam_options_fail_with_one_error(kw, match):
    retain = ["w50 w51 w52 w53"] * 3
    with pytest.raises(BadInputError, match=match):
        unlearn(tiny_model("qwen3_moe"), FORGET, retain, tokenizer=TOK, scope="uoe", target="0:1",
                **{"sam_rho": RHO, **kw}, progress=False)
