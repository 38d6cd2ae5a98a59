"""Optional megablocks support (moe_unlearn/arch/megablocks.py).

megablocks cannot be installed here (its CUDA extension does not build), so most tests run against a STAND-IN:
small modules whose classes carry megablocks' module paths (`megablocks.layers.moe` ...) and
attribute layout, and whose forward implements megablocks' math as we read it in the
megablocks 0.9/0.10 sources (facts and file paths in the docstring of
moe_unlearn/arch/megablocks.py). The stand-in therefore encodes OUR READING of megablocks: it
checks that the adapter agrees with that reading, not that the reading is right.
`test_real_megablocks_dmoe` (skipped unless `import megablocks` works and CUDA is present) is
the test that validates the adapter against the real package.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_unlearn.arch import RoutingCapture, find_moe_layers, model_summary
from moe_unlearn.arch.discovery import adapter_for
from moe_unlearn.arch.megablocks import MegablocksLayer, is_megablocks_block
from moe_unlearn.errors import NotAnMoEModel, UnsupportedFamily

H, I, E = 16, 8, 6  # noqa: E741 (hidden, ffn, experts as in the docs)


# -- the stand-in (our reading of megablocks 0.10; see the module docstring) -----------------

@dataclasses.dataclass
class Arguments:
    hidden_size: int = H
    ffn_hidden_size: int = I
    bias: bool = True
    return_bias: bool = True
    activation_fn: Any = partial(F.gelu, approximate="tanh")
    moe_num_experts: int = E
    moe_top_k: int = 2
    moe_capacity_factor: int = 0  # 0: no token dropping in the plain MoE (the stand-in never drops)
    moe_normalize_expert_weights: float | None = None
    moe_jitter_eps: float | None = None
    moe_expert_model_parallelism: bool = False
    mlp_type: str = "mlp"
    mlp_impl: str = "sparse"
    uniform_expert_assignment: bool = False
    shared_expert: bool = False
    shared_expert_weighted_sum: bool = False


Arguments.__module__ = "megablocks.layers.arguments"  # set after @dataclass, which looks the module up


class LearnedRouter(nn.Module):
    __module__ = "megablocks.layers.router"

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.layer = nn.Linear(args.hidden_size, args.moe_num_experts, bias=False)

    def forward(self, x):
        if self.training and self.args.moe_jitter_eps is not None:
            eps = self.args.moe_jitter_eps
            x = x * (1.0 - eps + torch.rand(x.size(), dtype=x.dtype) * 2 * eps)
        scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
        if self.args.moe_top_k == 1:
            weights, indices = scores.max(dim=-1, keepdim=True)
        else:
            weights, indices = torch.topk(scores, self.args.moe_top_k, dim=-1)
        if self.args.moe_normalize_expert_weights:
            weights = weights / torch.norm(weights, p=self.args.moe_normalize_expert_weights, dim=-1, keepdim=True)
        return scores, weights, indices


class MLP(nn.Module):
    """Plain MoE experts: w1 [E, H, I], w2 [E, I, H]; bmm(act(bmm(x, w1)), w2)."""

    __module__ = "megablocks.layers.mlp"

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.w1 = nn.Parameter(torch.randn(args.moe_num_experts, args.hidden_size, args.ffn_hidden_size) * 0.3)
        self.w2 = nn.Parameter(torch.randn(args.moe_num_experts, args.ffn_hidden_size, args.hidden_size) * 0.3)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.args.activation_fn(x @ self.w1[e]) @ self.w2[e]


class SparseMLP(nn.Module):
    """dMoE experts: w1, w2 [E*I, H]; act(x @ w1_e.T) @ w2_e."""

    __module__ = "megablocks.layers.mlp"

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        rows = args.moe_num_experts * args.ffn_hidden_size
        self.w1 = nn.Parameter(torch.randn(rows, args.hidden_size) * 0.3)
        self.w2 = nn.Parameter(torch.randn(rows, args.hidden_size) * 0.3)

    def _rows(self, w: torch.Tensor, e: int) -> torch.Tensor:
        n = self.args.ffn_hidden_size
        return w[e * n:(e + 1) * n]

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.args.activation_fn(x @ self._rows(self.w1, e).t()) @ self._rows(self.w2, e)


class SparseGLU(SparseMLP):
    """dMoE GLU experts: adds v1 [E*I, H]; (act(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e."""

    __module__ = "megablocks.layers.glu"

    def __init__(self, args: Arguments):
        super().__init__(args)
        self.v1 = nn.Parameter(torch.randn(args.moe_num_experts * args.ffn_hidden_size, args.hidden_size) * 0.3)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.args.activation_fn(x @ self._rows(self.w1, e).t()) * (x @ self._rows(self.v1, e).t())
        return h @ self._rows(self.w2, e)


class ParallelMLP(nn.Module):
    """out[t] = sum_k weights[t, k] * mlp_{idx[t, k]}(x_t); bias [H] returned apart (return_bias)."""

    __module__ = "megablocks.layers.moe"

    def __init__(self, args: Arguments):
        super().__init__()
        self.args = args
        self.num_experts, self.top_k = args.moe_num_experts, args.moe_top_k
        self.mlp = self._make_mlp(args)
        self.bias = nn.Parameter(torch.randn(args.hidden_size) * 0.1) if args.bias else None

    def _make_mlp(self, args):
        return MLP(args)

    def forward(self, x, scores, expert_weights, top_experts):
        shape = x.size()
        flat = x.view(-1, shape[-1])
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for k in range(self.top_k):
                out[t] += expert_weights[t, k] * self.mlp.one(int(top_experts[t, k]), flat[t:t + 1])[0]
        out = out.view(shape)
        if self.bias is not None:
            return (out, self.bias) if self.args.return_bias else out + self.bias
        return out


class ParallelDroplessMLP(ParallelMLP):
    __module__ = "megablocks.layers.dmoe"

    def _make_mlp(self, args):
        return SparseGLU(args) if args.mlp_type == "glu" else SparseMLP(args)


class MoE(nn.Module):
    __module__ = "megablocks.layers.moe"

    def __init__(self, args: Arguments):
        super().__init__()
        self.router = LearnedRouter(args)
        self.experts = self._init_experts_mlp(args)
        self.shared_expert = None

    def _init_experts_mlp(self, args):
        return ParallelMLP(args)

    def forward(self, x):
        scores, expert_weights, top_experts = self.router(x)
        return self.experts(x, scores, expert_weights, top_experts)


class dMoE(MoE):  # noqa: N801 (megablocks' name)
    __module__ = "megablocks.layers.dmoe"

    def _init_experts_mlp(self, args):
        return ParallelDroplessMLP(args)


# -- a custom model built from them (no transformers MoE family) -----------------------------

class _Config:
    model_type = "my_custom_lm"


class _Layer(nn.Module):
    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.ffn = ffn

    def forward(self, h):
        out = self.ffn(self.norm(h))
        if isinstance(out, tuple):
            out = out[0] + out[1]
        return h + out


class CustomLM(nn.Module):
    def __init__(self, block: str = "dmoe", mlp_type: str = "glu", dense_layers: bool = True, **kw):
        super().__init__()
        self.config = _Config()
        self.embed = nn.Embedding(64, H)
        cls = dMoE if block == "dmoe" else MoE
        ffns = []
        for i in range(3):
            if dense_layers and i == 1:
                ffns.append(nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H)))
            else:
                ffns.append(cls(Arguments(mlp_type=mlp_type, **kw)))
        self.layers = nn.ModuleList(_Layer(f) for f in ffns)
        self.head = nn.Linear(H, 64)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


VARIANTS = {
    "dmoe-glu-top2": dict(block="dmoe", mlp_type="glu"),
    "dmoe-mlp-top2-pnorm": dict(block="dmoe", mlp_type="mlp", moe_normalize_expert_weights=1.0),
    "dmoe-glu-top1": dict(block="dmoe", mlp_type="glu", moe_top_k=1),
    "moe-mlp-top2": dict(block="moe", mlp_type="mlp", moe_normalize_expert_weights=2.0),
    "dmoe-glu-nobias": dict(block="dmoe", mlp_type="glu", bias=False, moe_top_k=3),
}


def _model(variant: str, seed: int = 0) -> CustomLM:
    torch.manual_seed(seed)
    return CustomLM(**VARIANTS[variant]).eval()


def _ids(seed: int = 0, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


class _RouterOutputs:
    """What each megablocks LearnedRouter returned, and each block's input."""

    def __init__(self, layers):
        self.out: dict[int, tuple] = {}
        self.inp: dict[int, torch.Tensor] = {}
        self._h = []
        for lay in layers:
            self._h.append(lay.block.router.register_forward_hook(self._on_router(lay.layer_idx)))
            self._h.append(lay.block.register_forward_pre_hook(self._on_block(lay.layer_idx)))

    def _on_router(self, i):
        def hook(module, args, output):
            self.out[i] = tuple(t.detach().clone() for t in output)
        return hook

    def _on_block(self, i):
        def hook(module, args):
            self.inp[i] = args[0].detach().clone()
        return hook

    def remove(self):
        for h in self._h:
            h.remove()


# -- tests -----------------------------------------------------------------------------------

def test_recognised_by_class_name_and_module_only():
    args = Arguments()
    assert is_megablocks_block(dMoE(args)) and is_megablocks_block(MoE(args))
    assert not is_megablocks_block(ParallelMLP(args))

    class MoE2(nn.Module):  # a class called MoE elsewhere is not megablocks
        pass
    MoE2.__name__ = "MoE"
    assert not is_megablocks_block(MoE2())

    class UserBlock(dMoE):  # a user subclass outside megablocks still is
        __module__ = "my_project.model"
    assert is_megablocks_block(UserBlock(args))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_find_moe_layers_finds_the_megablocks_blocks(variant):
    model = _model(variant)
    assert adapter_for(model) is MegablocksLayer
    layers = find_moe_layers(model)
    kw = VARIANTS[variant]
    assert [lay.layer_idx for lay in layers] == [0, 2]  # the dense layer 1 is skipped
    for lay in layers:
        assert isinstance(lay, MegablocksLayer)
        assert lay.num_experts == E and lay.top_k == kw.get("moe_top_k", 2)
        assert lay.path == f"layers.{lay.layer_idx}.ffn"
        assert lay.router_path == f"layers.{lay.layer_idx}.ffn.router.layer"
        assert lay.is_glu == (kw["mlp_type"] == "glu")
        assert lay.is_3d == (kw["block"] == "moe")
        assert lay.drops_tokens is False  # capacity factor 0


def test_blocks_outside_a_layer_list_are_numbered_in_order():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = dMoE(Arguments()), dMoE(Arguments())
    layers = find_moe_layers(Flat())
    assert [(lay.layer_idx, lay.path) for lay in layers] == [(0, "first"), (1, "second")]


def test_a_model_with_neither_raises_not_an_moe_model():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _Config()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
    with pytest.raises(NotAnMoEModel):
        find_moe_layers(Dense())
    with pytest.raises(NotAnMoEModel):
        find_moe_layers(nn.Sequential(nn.Linear(4, 4)))


def test_sharded_experts_are_refused():
    model = _model("dmoe-glu-top2")
    mlp = model.layers[0].ffn.experts.mlp
    mlp.w1 = nn.Parameter(mlp.w1.data[: 3 * I].clone())  # what one rank of 2-way expert parallelism holds
    with pytest.raises(UnsupportedFamily, match="w1"):
        find_moe_layers(model)
    model = _model("dmoe-glu-top2")
    model.layers[0].ffn.router.args.moe_expert_model_parallelism = True
    with pytest.raises(UnsupportedFamily, match="parallelism"):
        find_moe_layers(model)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_route_equals_the_routers_own_topk(variant):
    model = _model(variant)
    layers = find_moe_layers(model)
    spy = _RouterOutputs(layers)
    try:
        with torch.no_grad():
            model(_ids())
    finally:
        spy.remove()
    for lay in layers:
        scores, weights, idx = spy.out[lay.layer_idx]
        with torch.no_grad():
            r = lay.route(spy.inp[lay.layer_idx])
        assert torch.equal(r.topk_idx, idx)
        assert torch.equal(r.topk_weight, weights.float())
        torch.testing.assert_close(r.scores, scores.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_capture_records_the_router_output(variant):
    model = _model(variant)
    layers = find_moe_layers(model)
    spy = _RouterOutputs(layers)
    ids = _ids(1)
    with torch.no_grad():
        plain = model(ids)
    try:
        with RoutingCapture(model, layers, hidden_states=True) as cap, torch.no_grad():
            captured = model(ids)
    finally:
        spy.remove()
    assert torch.equal(plain, captured)  # hooks leave the model's output unchanged
    rec = cap.last
    assert set(rec.layers) == {0, 2}
    for lay in layers:
        scores, weights, idx = spy.out[lay.layer_idx]
        r = rec.layers[lay.layer_idx]
        assert torch.equal(r.topk_idx, idx)
        assert torch.equal(r.topk_weight, weights)
        torch.testing.assert_close(torch.softmax(r.logits, -1), scores, rtol=0, atol=1e-6)
        assert torch.equal(r.hidden, spy.inp[lay.layer_idx].reshape(-1, H))
        torch.testing.assert_close(r.routing(lay).scores, scores, rtol=0, atol=1e-6)


def test_capture_in_training_sees_the_jittered_logits():
    """With moe_jitter_eps the router scales its input by noise in training; the capture hooks
    the router's linear, so it records the logits the routing actually used."""
    model = _model("dmoe-glu-top2")
    for layer in (model.layers[0], model.layers[2]):
        layer.ffn.router.args.moe_jitter_eps = 0.3
    model.train()
    layers = find_moe_layers(model)
    spy = _RouterOutputs(layers)
    try:
        with RoutingCapture(model, layers) as cap, torch.no_grad():
            model(_ids(2, seq=20))
    finally:
        spy.remove()
    for lay in layers:
        _, weights, idx = spy.out[lay.layer_idx]
        assert torch.equal(cap.last.layers[lay.layer_idx].topk_idx, idx)
        assert torch.equal(cap.last.layers[lay.layer_idx].topk_weight, weights)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_writing_an_expert_changes_only_its_tokens(variant):
    model = _model(variant, seed=1)
    lay = find_moe_layers(model)[-1]
    hidden = torch.randn(2, 15, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing = lay.route(hidden)
        counts = torch.bincount(routing.topk_idx.reshape(-1), minlength=lay.num_experts)
        counts[counts == routing.topk_idx.shape[0]] = 0
        expert = int(counts.argmax())
        chosen = routing.selected(expert).view(2, 15)
        assert chosen.any() and not chosen.all()
        before = lay.block_output(hidden)
        new = {role: torch.randn(v.shape) for role, v in lay.get_expert(expert).items()}
        lay.set_expert(expert, new)
        after = lay.block_output(hidden)
    assert torch.equal((after != before).any(dim=-1), chosen)
    for role, value in lay.get_expert(expert).items():
        assert torch.equal(value, new[role]), role


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expert_views_rebuild_the_block_output(variant):
    """sum_k w_k * expert_k(x) + output bias equals the block's own output."""
    model = _model(variant)
    for lay in find_moe_layers(model):
        x = torch.randn(12, H, generator=torch.Generator().manual_seed(lay.layer_idx))
        with torch.no_grad():
            want = lay.block_output(x.view(1, 12, H))[0]
            r = lay.route(x)
            got = torch.zeros_like(x)
            for k in range(lay.top_k):
                for e in r.topk_idx[:, k].unique().tolist():
                    rows = r.topk_idx[:, k] == e
                    got[rows] += r.topk_weight[rows, k, None] * lay.expert_forward(e, x[rows])
            if lay.experts.bias is not None:
                got += lay.experts.bias
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_expert_slices_partition_the_expert_weights(variant):
    model = _model(variant)
    lay = find_moe_layers(model)[0]
    params = dict(model.named_parameters())
    covered: dict[str, torch.Tensor] = {}
    for e in range(lay.num_experts):
        slices = lay.expert_slices(e)
        assert {s.role for s in slices} == ({"gate", "up", "down"} if lay.is_glu else {"up", "down"})
        for s in slices:
            assert params[s.name] is s.param
            m = s.mask()
            assert not (covered.get(s.name, torch.zeros_like(m)) & m).any()
            covered[s.name] = covered.get(s.name, torch.zeros_like(m)) | m
    assert all(bool(m.all()) for m in covered.values())
    assert lay.expert_num_params() == (3 if lay.is_glu else 2) * H * I
    views = lay.get_expert(1)
    assert views["up"].shape == (I, H) and views["down"].shape == (H, I)


def test_router_parameters_are_the_router_linear_weight():
    model = _model("dmoe-glu-top2")
    for lay in find_moe_layers(model):
        named = lay.router_parameters()
        assert [n for n, _ in named] == [f"layers.{lay.layer_idx}.ffn.router.layer.weight"]
        assert named[0][1] is lay.block.router.layer.weight


def test_model_summary_works_on_a_megablocks_model():
    s = model_summary(_model("dmoe-glu-top2"))
    assert s["family"] == "my_custom_lm" and s["routing_rule"] == "softmax-topk-pnorm"
    assert s["moe_layer_indices"] == [0, 2] and s["dense_layer_indices"] == [1]
    assert s["num_experts"] == E and s["params_per_expert"] == 3 * H * I


# -- the real package: the test that validates the stand-in's reading -------------------------

def _real_megablocks():
    try:
        import megablocks.layers.arguments  # noqa: F401
        import megablocks.layers.dmoe  # noqa: F401
    except Exception as exc:  # ImportError, or its CUDA extension failing to load
        pytest.skip(f"megablocks does not import here: {exc!r}")
    if not torch.cuda.is_available():
        pytest.skip("megablocks' kernels need a CUDA device")


@pytest.mark.parametrize("mlp_type", ["glu", "mlp"])
def test_real_megablocks_dmoe(mlp_type):
    """The same checks on a real megablocks dMoE (runs only where megablocks imports)."""
    _real_megablocks()
    from megablocks.layers.arguments import Arguments as RealArguments
    from megablocks.layers.dmoe import dMoE as RealDMoE

    try:
        import grouped_gemm  # noqa: F401
        impl = "grouped"
    except ImportError:
        impl = "sparse"
    torch.manual_seed(0)
    hidden, ffn = 128, 128
    args = RealArguments(hidden_size=hidden, ffn_hidden_size=ffn, moe_num_experts=4, moe_top_k=2, mlp_type=mlp_type,
                         mlp_impl=impl, moe_normalize_expert_weights=1.0, fp16=False, bf16=True,
                         device=torch.cuda.current_device(), init_method=partial(nn.init.normal_, std=0.1),
                         output_layer_init_method=partial(nn.init.normal_, std=0.1))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([RealDMoE(args)])

    model = Holder().eval()
    (lay,) = find_moe_layers(model)
    assert lay.num_experts == 4 and lay.top_k == 2 and lay.is_glu == (mlp_type == "glu")
    x = torch.randn(64, 1, hidden, device="cuda", dtype=torch.bfloat16)
    spy = _RouterOutputs([lay])
    try:
        with RoutingCapture(model, [lay]) as cap, torch.no_grad():
            lay.block(x)
    finally:
        spy.remove()
    scores, weights, idx = spy.out[0]
    with torch.no_grad():
        r = lay.route(x)
    assert torch.equal(r.topk_idx, idx) and torch.equal(r.topk_weight, weights.float())
    rec = cap.last.layers[0]
    assert torch.equal(rec.topk_idx, idx) and torch.equal(rec.topk_weight, weights)
    torch.testing.assert_close(torch.softmax(rec.logits.float(), -1), scores.float(), rtol=0, atol=1e-2)

    flat = x.view(-1, hidden)
    with torch.no_grad():
        want = lay.block_output(x).view(-1, hidden).float()
        got = torch.zeros_like(flat, dtype=torch.float32)
        for k in range(lay.top_k):
            for e in r.topk_idx[:, k].unique().tolist():
                rows = r.topk_idx[:, k] == e
                got[rows] += r.topk_weight[rows, k, None] * lay.expert_forward(e, flat[rows]).float()
        if lay.experts.bias is not None:
            got += lay.experts.bias.float()
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)

    counts = torch.bincount(r.topk_idx.reshape(-1), minlength=4)
    counts[counts == flat.shape[0]] = 0
    expert = int(counts.argmax())
    chosen = r.selected(expert)
    with torch.no_grad():
        before = lay.block_output(x).view(-1, hidden)
        lay.set_expert(expert, {role: torch.randn_like(v) for role, v in lay.get_expert(expert).items()})
        after = lay.block_output(x).view(-1, hidden)
    assert torch.equal((after != before).any(dim=-1), chosen)
