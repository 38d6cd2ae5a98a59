"""A Hugging Face Trainer as the loop of unlearn(): bit-exact against the built-in loop, and the two
traps (leaf gradients the Trainer never clears, clipping of the model's empty gradients) are real."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_tokenizer import word_tokenizer

from moe_unlearn.errors import BadInputError
from moe_unlearn.integrations import hf_trainer
from moe_unlearn.integrations.hf_trainer import trainer_loop, unlearn_with_trainer
from moe_unlearn.testing import tiny_model
from moe_unlearn.unlearning import unlearn

FORGET = [{"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 40} w{i + 41} w{i + 42}"} for i in range(8)]
RETAIN = [{"question": f"w{i + 60} w{i + 61}", "answer": f"w{i + 80} w{i + 81}"} for i in range(8)]
OPTS = dict(method="npo", scope="uoe", target="1:2", steps=4, lr=3e-2, batch_size=2, max_grad_norm=0.05,
            progress=False)


def _run(trainer: bool, **kw):
    model = tiny_model("olmoe")
    opts = {**OPTS, **kw}
    if trainer:
        res = unlearn_with_trainer(model, FORGET, RETAIN, tokenizer=word_tokenizer(), **opts)
    else:
        res = unlearn(model, FORGET, RETAIN, tokenizer=word_tokenizer(), **opts)
    return model, res


@pytest.mark.parametrize("kw", [{}, {"grad_accum": 2, "lr_schedule": "cosine", "warmup_steps": 1}])
def test_trainer_loop_is_bit_exact(kw):
    ref_model, ref = _run(False, **kw)
    hf_model, hf = _run(True, **kw)
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), hf_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert ref.history.terms == hf.history.terms and ref.history.lr == hf.history.lr
    assert ref.history.grad_norm == hf.history.grad_norm and max(hf.history.grad_norm) > OPTS["max_grad_norm"]
    assert not torch.equal(ref_model.model.layers[1].mlp.gate.weight, tiny_model("olmoe").model.layers[1].mlp.gate.weight)


def test_both_traps_matter(monkeypatch):
    ref_model, _ = _run(False)
    # trap 1: without clearing the leaves' gradients after each step, they accumulate and the run drifts
    monkeypatch.setattr(hf_trainer.LeafStepCallback, "on_step_end",
                        lambda self, args, state, control, **kw: (self.run.hooks.after_step(state.global_step),
                                                                  self.run.history.record(state.global_step, {}, 0, 0),
                                                                  control)[-1])
    drift_model, _ = _run(True)
    w = "model.layers.1.mlp.experts.gate_up_proj"
    assert not torch.equal(ref_model.state_dict()[w], drift_model.state_dict()[w])
    monkeypatch.undo()
    # trap 2: the Trainer's own clipping (of the model's empty gradients) clips nothing
    monkeypatch.setattr(hf_trainer.UnlearnLossMixin, "_clip_grad_norm", lambda self, model: (
        self.moe_run.hooks.after_backward(self.state.global_step + 1),
        float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.05)))[-1])
    unclipped_model, _ = _run(True)
    assert not torch.equal(ref_model.state_dict()[w], unclipped_model.state_dict()[w])


def test_trainer_callbacks_and_patch(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(state.global_step)

    model = tiny_model("olmoe")
    res = unlearn_with_trainer(model, FORGET, RETAIN, tokenizer=word_tokenizer(), trainer_callbacks=[Spy()],
                               training_args={"output_dir": str(tmp_path / "hf")}, out_dir=str(tmp_path / "patch"),
                               **OPTS)
    assert seen == [1, 2, 3, 4] and len(res.history.steps) == 4
    assert json.loads((tmp_path / "patch" / "patch.json").read_text())["targets"] == ["1:2"]
    with pytest.raises(BadInputError, match="not supported with the HF Trainer"):
        with trainer_loop(tiny_model("olmoe")):
            unlearn(tiny_model("olmoe"), FORGET, RETAIN, tokenizer=word_tokenizer(), checkpoint_every=2,
                    checkpoint_dir=str(tmp_path / "ck"), **OPTS)
