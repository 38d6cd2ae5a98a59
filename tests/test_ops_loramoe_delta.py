"""loramoe_delta: Triton forward/backward (interpreter on the CPU, compiled on a GPU) and the CUDA forward
against the torch reference and its autograd. TRITON_INTERPRET is decided in conftest.py."""

import contextlib
import types

import moe_unlearn.kernels._common as kcommon
import moe_unlearn.kernels.loramoe_delta as ld_kernel
import pytest
import torch

from moe_unlearn.errors import BackendUnavailable, BadInputError
from moe_unlearn.ops import dense_gates, dispatch, loramoe_delta, loramoe_delta_loop, loramoe_delta_torch


def make_inputs(T, d_in, d_out, E, r, dtype, seed, topk=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    A = torch.randn(E, r, d_in, generator=gen) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=gen) / r**0.5
    if topk is None:
        g = {"gates": torch.softmax(torch.randn(T, E, generator=gen), -1)}
    else:
        idx = torch.stack([torch.randperm(E, generator=gen)[:topk] for _ in range(T)]) if T else torch.zeros(0, topk)
        g = {"topk_idx": idx.long(), "topk_weight": torch.rand(T, topk, generator=gen)}
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in g.items()}
    return x.to(dtype), A.to(dtype), B.to(dtype), cast


def run_with_grads(fn, x, A, B, g, dout, **kw):
    """Forward and the gradients of <out, dout> w.r.t. x, A, B and the gate values."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    gl = {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v) for k, v in g.items()}
    out = fn(*leaves, **gl, **kw)
    gate_leaf = gl.get("gates", gl.get("topk_weight"))
    grads = torch.autograd.grad(out, [*leaves, gate_leaf], dout)
    return [out, *grads]


def assert_matches_reference(got, x, A, B, g, dout, scale, dtype):
    """fp32: close to the fp32 reference. fp16: error vs the fp32 reference within twice the error of the
    torch reference run in fp16 (plus a small floor), i.e. no worse than the plain-torch formulation."""
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in g.items()}
    ref32 = run_with_grads(loramoe_delta_torch, x.float(), A.float(), B.float(), up, dout.float(), scale=scale)
    names = ["out", "dx", "dA", "dB", "dgate"]
    if dtype == torch.float32:
        for name, a, b in zip(names, got, ref32, strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6, msg=name)
        return
    ref16 = run_with_grads(loramoe_delta_torch, x, A, B, g, dout, scale=scale)
    for name, a, b16, b in zip(names, got, ref16, ref32, strict=True):
        assert a.dtype == dtype, name
        assert torch.isfinite(a).all(), name
        err = (a.float() - b).abs().max().item()
        ref_err = (b16.float() - b).abs().max().item()
        assert err <= 2 * ref_err + 2e-3 * b.abs().max().item(), (name, err, ref_err)


CASES = [
    # T, d_in, d_out, E, r, dtype, topk
    (150, 40, 33, 5, 4, torch.float32, None),
    (70, 24, 50, 3, 16, torch.float32, 2),
    (130, 64, 40, 7, 64, torch.float16, None),  # 7 x 64 columns: unfused (shrink + expand) path
    (77, 48, 56, 6, 8, torch.float16, 2),
    (91, 40, 36, 5, 8, torch.bfloat16, None),
    (45, 24, 20, 2, 200, torch.bfloat16, None),  # r > 128: the rank is split into two 128-column chunks
]


@pytest.mark.interpret
@pytest.mark.parametrize("T,d_in,d_out,E,r,dtype,topk", CASES)
def test_triton_forward_and_grads_match_reference(T, d_in, d_out, E, r, dtype, topk):
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, dtype, seed=T + r, topk=topk)
    dout = torch.randn(T, d_out, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = run_with_grads(loramoe_delta, x, A, B, g, dout, scale=2.0, backend="triton")
    assert_matches_reference(got, x, A, B, g, dout, 2.0, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("E,r,cols_max,rank_chunk_max", [
    (5, 8, 16, 128),   # 3 expert blocks of 2 x 8 columns (unfused, last block half padding)
    (5, 8, 64, 128),   # one 8 x 8 block: fused forward (several token tiles per program) + one-pass dx/dA
    (3, 24, 32, 16),   # r = 24 -> padded 32 -> two 16-column rank chunks per expert (dgates summed over chunks)
])
def test_small_blocks_split_reduction_and_poisoned_buffers(monkeypatch, E, r, cols_max, rank_chunk_max):
    """Many tiles in every grid dimension, a 3-way split of the T reductions (dA, dB), with every buffer the
    launchers allocate filled with NaN first: nothing may read memory it did not write."""
    monkeypatch.setattr(ld_kernel, "new_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    monkeypatch.setattr(kcommon, "sm_count", lambda device: 1)
    monkeypatch.setattr(ld_kernel, "sm_count", lambda device: 1)  # one program walks every token tile
    T, d_in, d_out = 90, 40, 36
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, torch.float32, seed=11)
    gates = g["gates"]
    cfg = ld_kernel.make_config(E, r, block_t=16, block_k=16, split_t=3, cols_max=cols_max,
                                rank_chunk_max=rank_chunk_max)
    assert cfg.fused == (cols_max == 64) and cfg.rank_chunks == (2 if r == 24 else 1)
    out, h = ld_kernel.loramoe_delta_forward(x, A, B, gates, 0.5, config=cfg)
    dout = torch.randn(T, d_out)
    grads = ld_kernel.loramoe_delta_backward(dout, x, A, B, gates, h, 0.5, config=cfg)
    ref = run_with_grads(loramoe_delta_torch, x, A, B, g, dout, scale=0.5)
    for a, b in zip([out, *grads], ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The fused forward without a backward writes no h, and the same delta.
    out2, h2 = ld_kernel.loramoe_delta_forward(x, A, B, gates, 0.5, config=cfg, save_h=False)
    assert (h2 is None) == cfg.fused
    torch.testing.assert_close(out2, ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_zero_width_output_gives_zero_gradients(monkeypatch):
    """d_out = 0: the delta is empty and every gradient is exactly zero (was NaN gate gradients: the saved h
    was an unwritten buffer)."""
    monkeypatch.setattr(ld_kernel, "new_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    x, A, B, g = make_inputs(20, 16, 0, 3, 4, torch.float32, seed=12)
    got = run_with_grads(loramoe_delta, x, A, B, g, torch.zeros(20, 0), backend="triton")
    assert got[0].shape == (20, 0)
    for grad in got[1:]:
        assert torch.equal(grad, torch.zeros_like(grad))


def test_launchers_guard_the_tensor_device(monkeypatch):
    """Triton launches on the current CUDA device, so every launcher makes the tensor's device current."""
    seen = []

    def recording_guard(device):
        seen.append(device)
        return contextlib.nullcontext()

    assert isinstance(kcommon.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = kcommon.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    if not kcommon.interpreting():
        pytest.skip("the launch half runs under the interpreter")
    monkeypatch.setattr(ld_kernel, "device_guard", recording_guard)
    x, A, B, g = make_inputs(20, 16, 12, 3, 4, torch.float32, seed=13)
    run_with_grads(loramoe_delta, x, A, B, g, torch.randn(20, 12), backend="triton")
    assert len(seen) == 2 and all(d == x.device for d in seen)  # forward and backward


def test_launchers_refuse_the_wrong_device_kind(monkeypatch):
    """Interpreted kernels refuse CUDA tensors and compiled kernels CPU tensors (no silent CPU copies)."""
    monkeypatch.setattr(kcommon, "interpreting", lambda: True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kcommon.check_launchable(types.SimpleNamespace(device=torch.device("cuda", 0)))  # only .device is read
    kcommon.check_launchable(torch.zeros(1))
    monkeypatch.setattr(kcommon, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        kcommon.check_launchable(torch.zeros(1))


def test_auto_dispatch_prefers_triton_and_never_the_cuda_extension(monkeypatch):
    """On CUDA tensors the automatic choice is Triton, even with the CUDA extension built (never measured faster);
    under TRITON_INTERPRET=1 Triton is refused for CUDA tensors and auto falls to torch, not to the interpreter."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("MOE_UNLEARN_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "cuda_extension", lambda: object())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in ("loramoe_delta", "routing_stats"):
        assert dispatch.choose_backend(op, cuda, cuda_ops=(op,)) == "triton"
        assert dispatch.choose_backend(op, cuda, backend="cuda", cuda_ops=(op,)) == "cuda"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose_backend("loramoe_delta", cuda, cuda_ops=("loramoe_delta",)) == "torch"
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        dispatch.choose_backend("loramoe_delta", cuda, backend="triton")


@pytest.mark.interpret
def test_accumulates_into_out_with_gradients():
    T, d_in, d_out, E, r = 60, 32, 24, 4, 4
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, torch.float32, seed=3, topk=2)
    w0 = torch.randn(d_out, d_in)
    dout = torch.randn(T, d_out)
    results = []
    for backend in ("triton", "torch"):
        xl, Al, Bl = (t.clone().requires_grad_() for t in (x, A, B))
        wl = g["topk_weight"].clone().requires_grad_()
        base = xl @ w0.t()  # a non-leaf base output, as W0 x in a wrapped linear
        res = loramoe_delta(xl, Al, Bl, topk_idx=g["topk_idx"], topk_weight=wl, scale=3.0, out=base, backend=backend)
        assert res is base
        grads = torch.autograd.grad(res, (xl, Al, Bl, wl), dout)
        results.append([res.detach(), *grads])
    expected = x @ w0.t() + loramoe_delta_torch(x, A, B, topk_idx=g["topk_idx"], topk_weight=g["topk_weight"], scale=3.0)
    torch.testing.assert_close(results[0][0], expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_empty_batch_and_non_contiguous_inputs():
    E, r, d_in, d_out = 3, 4, 20, 18
    x0, A, B, g = make_inputs(0, d_in, d_out, E, r, torch.float32, seed=5)
    got = run_with_grads(loramoe_delta, x0, A, B, g, torch.zeros(0, d_out), backend="triton")
    assert got[0].shape == (0, d_out) and got[1].shape == (0, d_in)
    assert not got[2].any() and not got[3].any() and got[4].shape == (0, E)

    T = 70
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, 2 * d_in, generator=gen)[:, ::2]  # strided columns
    A = torch.randn(E, d_in, r, generator=gen).transpose(1, 2)  # [E, r, d_in] view of other storage
    B = torch.randn(d_out, E, r, generator=gen).permute(1, 0, 2)
    gates = torch.rand(E, T, generator=gen).t()
    dout = torch.randn(d_out, T, generator=gen).t()
    assert not any(t.is_contiguous() for t in (x, A, B, gates, dout))
    got = run_with_grads(loramoe_delta, x, A, B, {"gates": gates}, dout, scale=1.5, backend="triton")
    ref = run_with_grads(loramoe_delta_torch, x.contiguous(), A.contiguous(), B.contiguous(),
                         {"gates": gates.contiguous()}, dout.contiguous(), scale=1.5)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stacked_reference_equals_per_expert_loop():
    x, A, B, g = make_inputs(40, 16, 12, 5, 4, torch.float32, seed=8)
    torch.testing.assert_close(loramoe_delta_torch(x, A, B, g["gates"], scale=0.7),
                               loramoe_delta_loop(x, A, B, g["gates"], scale=0.7), rtol=1e-5, atol=1e-6)


@pytest.mark.interpret
def test_dispatch_and_bad_inputs(monkeypatch):
    x, A, B, g = make_inputs(8, 16, 12, 3, 4, torch.float32, seed=9)
    monkeypatch.delenv("MOE_UNLEARN_BACKEND", raising=False)
    monkeypatch.setattr(ld_kernel, "loramoe_delta_triton", lambda *a, **k: 1 / 0)
    out = loramoe_delta(x, A, B, g["gates"])  # CPU + automatic -> torch, never the (patched) Triton path
    torch.testing.assert_close(out, loramoe_delta_torch(x, A, B, g["gates"]))
    with pytest.raises(ZeroDivisionError):
        loramoe_delta(x, A, B, g["gates"], backend="triton")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        loramoe_delta(x, A, B, g["gates"], backend="cuda")
    monkeypatch.setenv("MOE_UNLEARN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable):
        loramoe_delta(x, A, B, g["gates"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BadInputError, match="dtype"):
        loramoe_delta(x, A.half(), B, g["gates"])
    with pytest.raises(BadInputError, match="B must be"):
        loramoe_delta(x, A, B[:, :, :2], g["gates"])
    with pytest.raises(BadInputError, match="gates"):
        loramoe_delta(x, A, B, g["gates"][:, :2])
    with pytest.raises(BadInputError, match="out must be"):
        loramoe_delta(x, A, B, g["gates"], out=torch.zeros(8, 5))
    with pytest.raises(BadInputError, match="topk"):
        loramoe_delta(x, A, B)


def test_dense_gates_grad_flows_to_topk_weights():
    idx = torch.tensor([[0, 2], [1, 0]])
    w = torch.tensor([[0.3, 0.7], [0.6, 0.4]], requires_grad=True)
    d = dense_gates(3, idx, w)
    torch.testing.assert_close(d, torch.tensor([[0.3, 0.0, 0.7], [0.4, 0.6, 0.0]]))
    (d * torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert w.grad.tolist() == [[1.0, 3.0], [5.0, 4.0]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("r", [4, 16, 64])
def test_gpu_triton_matches_torch(dtype, r):
    T, d_in, d_out, E = 1000, 256, 192, 6
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, dtype, seed=r, topk=2 if r == 16 else None)
    dev = {k: v.cuda() for k, v in g.items()}
    dout = torch.randn(T, d_out).to(dtype).cuda()
    got = run_with_grads(loramoe_delta, x.cuda(), A.cuda(), B.cuda(), dev, dout, scale=2.0, backend="triton")
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in dev.items()}
    ref = run_with_grads(loramoe_delta_torch, x.cuda().float(), A.cuda().float(), B.cuda().float(), up,
                         dout.float(), scale=2.0)
    low = run_with_grads(loramoe_delta_torch, x.cuda(), A.cuda(), B.cuda(), dev, dout, scale=2.0)
    for a, b, c in zip(got, ref, low, strict=True):
        err = (a.float() - b).abs().max().item()
        base_err = (c.float() - b).abs().max().item()
        assert err <= 2 * base_err + 1e-4 * b.abs().max().item(), (err, base_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_cuda_forward_matches_torch(dtype):
    from moe_unlearn.ops.dispatch import cuda_extension

    if cuda_extension() is None:
        pytest.skip("moe_unlearn._C not built")
    T, d_in, d_out, E, r = 1000, 256, 192, 6, 8
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, dtype, seed=2)
    x, A, B, gates = x.cuda(), A.cuda(), B.cuda(), g["gates"].cuda()
    with torch.no_grad():
        got = loramoe_delta(x, A, B, gates, scale=2.0, backend="cuda")
        base = torch.randn(T, d_out, device="cuda").to(dtype)
        acc = loramoe_delta(x, A, B, gates, scale=2.0, out=base.clone(), backend="cuda")
    ref = loramoe_delta_torch(x.float(), A.float(), B.float(), gates.float(), scale=2.0)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(acc.float(), base.float() + ref, rtol=tol, atol=tol)


@pytest.mark.interpret
@pytest.mark.parametrize("T,d_in,d_out,E,r,K,dtype", [
    (53, 40, 36, 20, 16, 3, torch.float32),   # 20 experts x 16 > 256 columns: routed through the sorted pairs
    (37, 24, 20, 33, 8, 2, torch.bfloat16),
    (0, 24, 20, 33, 8, 2, torch.float32),
])
def test_routed_topk_matches_reference(T, d_in, d_out, E, r, K, dtype):
    """Many experts: top-K runs on pairs sorted by expert (cost follows K). Forward, gradients in x, A, B and the
    weights, and accumulation into `out` match the dense torch reference; experts nobody picked get dA = dB = 0."""
    from moe_unlearn.ops.api import routed_pays

    assert routed_pays(E, r, K, d_in, d_out, torch.tensor([], dtype=dtype).element_size())
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, dtype, seed=E + r, topk=K)
    gen = torch.Generator().manual_seed(T)
    if T:  # expert E - 1 is never picked
        g["topk_idx"] = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    dout = torch.randn(T, d_out, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = run_with_grads(loramoe_delta, x, A, B, g, dout, scale=1.5, backend="triton")
    if T == 0:
        assert got[0].shape == (0, d_out) and got[1].shape == (0, d_in) and got[4].shape == (0, K)
        assert not got[2].any() and not got[3].any()
        return
    assert_matches_reference(got, x, A, B, g, dout, 1.5, dtype)
    unused = sorted(set(range(E)) - set(g["topk_idx"].flatten().tolist()))
    assert E - 1 in unused and not got[2][unused].any() and not got[3][unused].any()
    base = torch.randn(T, d_out).to(dtype)
    with torch.no_grad():
        acc = loramoe_delta(x, A, B, out=base.clone(), scale=1.5, backend="triton", **g)
    ref = base.float() + loramoe_delta_torch(x.float(), A.float(), B.float(), topk_idx=g["topk_idx"],
                                             topk_weight=g["topk_weight"].float(), scale=1.5)
    torch.testing.assert_close(acc.float(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-4,
                               atol=2e-2 if dtype != torch.float32 else 1e-4)


def test_topk_values_checked():
    x, A, B, g = make_inputs(6, 16, 12, 4, 4, torch.float32, seed=14, topk=2)
    bad = g["topk_idx"].clone()
    bad[2, 1] = 4
    with pytest.raises(BadInputError, match="topk_idx values"):
        loramoe_delta(x, A, B, topk_idx=bad, topk_weight=g["topk_weight"])
    dup = g["topk_idx"].clone()
    dup[3] = torch.tensor([1, 1])
    with pytest.raises(BadInputError, match="twice"):
        loramoe_delta(x, A, B, topk_idx=dup, topk_weight=g["topk_weight"])


def test_routed_pays_cost_model():
    """Dense tensor-core GEMMs win at E=64 top-4, d=4096, bf16 (~57 KB vs ~107 KB per token); the routed
    path wins with fewer experts per token (E=128 top-2), without tensor cores (fp32) and never for the narrow
    mixtures the fused forward keeps on chip (E=8, r=16)."""
    from moe_unlearn.ops.api import routed_pays

    assert not routed_pays(64, 16, 4, 4096, 4096, 2)
    assert routed_pays(128, 16, 2, 4096, 4096, 2) and routed_pays(64, 16, 4, 4096, 4096, 4)
    assert not routed_pays(8, 16, 2, 4096, 4096, 2) and not routed_pays(8, 16, 2, 4096, 4096, 4)


@pytest.mark.interpret
@pytest.mark.parametrize("T,d_in,d_out,E,r,K,dtype", [
    (45, 33, 29, 13, 5, 1, torch.float32),    # K = 1, odd everything
    (61, 40, 27, 17, 16, 3, torch.float16),
    (38, 24, 31, 9, 3, 4, torch.bfloat16),
])
def test_routed_kernels_poisoned_buffers_every_dtype(monkeypatch, T, d_in, d_out, E, r, K, dtype):
    """The routed kernels called directly (whatever routed_pays says), every buffer they allocate poisoned
    with NaN: the [T, K, d] intermediates in the model dtype, the fused K-sum and the weight gradients write
    every element they return. Fresh random inputs; forward, gradients and accumulation into a base."""
    import moe_unlearn.kernels.loramoe_routed as lr

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-12345)

    monkeypatch.setattr(lr, "new_empty", poisoned)
    calls = []
    real_sum_k = lr.sum_k
    monkeypatch.setattr(lr, "sum_k", lambda y, out, k, accumulate: calls.append(y.dtype) or real_sum_k(
        y, out, k, accumulate))
    x, A, B, g = make_inputs(T, d_in, d_out, E, r, dtype, seed=T * K + 1, topk=K)
    dout = torch.randn(T, d_out, generator=torch.Generator().manual_seed(T)).to(dtype)

    def routed(x, A, B, topk_idx, topk_weight, scale):
        return lr.loramoe_delta_routed_triton(x, A, B, topk_idx, topk_weight, scale=scale)

    got = run_with_grads(routed, x, A, B, g, dout, scale=0.75)
    assert_matches_reference(got, x, A, B, g, dout, 0.75, dtype)
    assert calls and all(c == dtype for c in calls)  # intermediates in the model dtype, reduced by sum_k
    base = torch.randn(T, d_out).to(dtype)
    with torch.no_grad():
        acc = lr.loramoe_delta_routed_triton(x, A, B, g["topk_idx"], g["topk_weight"], scale=0.75, out=base.clone())
    ref = base.float() + loramoe_delta_torch(x.float(), A.float(), B.float(), topk_idx=g["topk_idx"],
                                             topk_weight=g["topk_weight"].float(), scale=0.75)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(acc.float(), ref, rtol=tol, atol=tol)
