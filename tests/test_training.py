"""The shared training loop: accumulation, schedules, resume, divergence, epochs."""

from __future__ import annotations

import math
import os

import pytest
import torch

from moe_unlearn.errors import BadInputError, TrainingDiverged
from moe_unlearn.training import TrainConfig, TrainHooks, latest_checkpoint, train


def _regression_data(n: int = 16, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.arange(1.0, d + 1) + 0.1 * torch.randn(n, generator=g)
    return x, y


def _mse_fn(w):
    def loss_fn(batch):
        x, y = batch
        err = ((x @ w - y) ** 2).mean()
        return {"loss": err, "mse": err.detach(), "wnorm": w.detach().norm()}
    return loss_fn


def test_loss_falls_and_terms_are_recorded():
    x, y = _regression_data()
    w = torch.zeros(4, requires_grad=True)
    hist = train([w], _mse_fn(w), [(x, y)], TrainConfig(steps=60, lr=0.1, progress=False, max_grad_norm=None))
    assert hist.steps == list(range(1, 61))
    assert set(hist.terms) == {"loss", "mse", "wnorm"}
    assert hist.terms["loss"][-1] < 0.05 * hist.terms["loss"][0]
    assert hist.optimizer_state_bytes == 2 * 4 * 4 + 4  # exp_avg + exp_avg_sq (4 fp32 each) + step scalar


def test_grad_accum_matches_one_big_batch():
    """Two micro-batches of 8 with grad_accum=2 == one batch of 16 (the loss is a mean)."""
    x, y = _regression_data()
    w1 = torch.zeros(4, requires_grad=True)
    train([w1], _mse_fn(w1), [(x, y)], TrainConfig(steps=5, lr=0.05, progress=False))
    w2 = torch.zeros(4, requires_grad=True)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    train([w2], _mse_fn(w2), halves, TrainConfig(steps=5, lr=0.05, grad_accum=2, progress=False))
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules(schedule):
    w = torch.zeros(1, requires_grad=True)
    loss_fn = lambda b: {"loss": (w - 1).pow(2).sum()}
    total, warm, base = 10, 3, 0.5
    hist = train([w], loss_fn, [0], TrainConfig(steps=total, lr=base, lr_schedule=schedule, warmup_steps=warm,
                                                progress=False))
    for i, lr in enumerate(hist.lr):
        if i < warm:
            expect = base * (i + 1) / warm
        else:
            p = (i - warm) / (total - warm)
            expect = {"constant": base, "linear": base * (1 - p),
                      "cosine": base * 0.5 * (1 + math.cos(math.pi * p))}[schedule]
        assert lr == pytest.approx(expect), (i, lr, expect)


def test_epochs_count_steps_and_see_every_batch():
    seen = []
    w = torch.zeros(1, requires_grad=True)

    def loss_fn(b):
        seen.append(b)
        return {"loss": (w - b).pow(2).sum()}

    batches = [torch.tensor(float(i)) for i in range(5)]
    hist = train([w], loss_fn, batches, TrainConfig(epochs=2, grad_accum=2, progress=False))
    assert len(hist.steps) == 2 * 3  # ceil(5 / 2) steps per epoch
    assert [float(b) for b in seen] == [0, 1, 2, 3, 4] * 2


class _Interrupt(Exception):
    pass


class _StopAt(TrainHooks):
    def __init__(self, step):
        self.step = step

    def after_step(self, step):
        if step == self.step:
            raise _Interrupt


def _noisy_setup(seed_offset=0):
    """A loss with randomness (dropout-like noise) and epoch-shuffled batches, to exercise RNG and
    data-position restore."""
    x, y = _regression_data(n=12)
    w = torch.zeros(4, requires_grad=True)

    def batches(epoch):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(100 + epoch))
        return [(x[order[i:i + 4]], y[order[i:i + 4]]) for i in range(0, 12, 4)]

    def loss_fn(batch):
        xb, yb = batch
        keep = (torch.rand(xb.shape) > 0.2).float()
        err = (((xb * keep) @ w - yb) ** 2).mean()
        return {"loss": err}

    return w, loss_fn, batches


def test_resumed_run_ends_where_uninterrupted_one_does(tmp_path):
    cfg = dict(steps=11, lr=0.05, lr_schedule="cosine", warmup_steps=2, grad_accum=2, weight_decay=0.01,
               seed=3, progress=False)
    w_ref, loss_fn, batches = _noisy_setup()
    ref = train([w_ref], loss_fn, batches, TrainConfig(**cfg))

    ckpt = str(tmp_path / "ckpt")
    w, loss_fn, batches = _noisy_setup()
    with pytest.raises(_Interrupt):
        train([w], loss_fn, batches, TrainConfig(**cfg, checkpoint_every=3, checkpoint_dir=ckpt),
              hooks=_StopAt(8))
    assert os.path.basename(latest_checkpoint(ckpt)) == "step_00000006.pt"
    assert len(os.listdir(ckpt)) == 1  # keep_checkpoints=1, no temp files left

    w2, loss_fn, batches = _noisy_setup()  # a fresh process: fresh weights, resume from disk
    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG state
    hist = train([w2], loss_fn, batches, TrainConfig(**cfg, checkpoint_every=3, checkpoint_dir=ckpt, resume=True))
    assert hist.resumed_from == 6
    assert hist.steps == list(range(1, 12))
    torch.testing.assert_close(w2, w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(hist.terms["loss"]), torch.tensor(ref.terms["loss"]))


def test_nan_loss_raises_before_updating_and_writes_nothing(tmp_path):
    w = torch.ones(3, requires_grad=True)
    calls = []

    def loss_fn(b):
        calls.append(1)
        val = (w ** 2).sum()
        return {"loss": val * (float("nan") if len(calls) == 3 else 1.0)}

    ckpt = tmp_path / "ckpt"
    before = {}

    class Snap(TrainHooks):
        def after_step(self, step):
            before["w"] = w.detach().clone()

    with pytest.raises(TrainingDiverged, match="step 3"):
        train([w], loss_fn, [0], TrainConfig(steps=5, lr=0.1, checkpoint_every=5, checkpoint_dir=str(ckpt),
                                             progress=False), hooks=Snap())
    assert torch.equal(w.detach(), before["w"])  # the NaN step was not applied
    assert not ckpt.exists()


def test_bad_configs():
    w = torch.zeros(1, requires_grad=True)
    fn = lambda b: {"loss": w.sum()}
    with pytest.raises(BadInputError, match="exactly one of steps or epochs"):
        train([w], fn, [0], TrainConfig(progress=False))
    with pytest.raises(BadInputError, match="constant, linear, cosine"):
        train([w], fn, [0], TrainConfig(steps=1, lr_schedule="step", progress=False))
    with pytest.raises(BadInputError, match="checkpoint_dir"):
        train([w], fn, [0], TrainConfig(steps=1, resume=True, progress=False))
    with pytest.raises(BadInputError, match="requires_grad"):
        train([torch.zeros(1)], fn, [0], TrainConfig(steps=1, progress=False))
    with pytest.raises(BadInputError, match="yielded nothing"):
        train([w], fn, [], TrainConfig(steps=1, progress=False))
