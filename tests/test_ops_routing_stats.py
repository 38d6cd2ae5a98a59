"""routing_stats: Triton (interpreter on the CPU, compiled on a GPU) and CUDA backends against the torch
reference. TRITON_INTERPRET is decided in conftest.py."""

import moe_unlearn.kernels.routing_stats as rs_kernel
import pytest
import torch

from moe_unlearn.errors import BackendUnavailable, BadInputError
from moe_unlearn.ops import choose_backend, routing_stats, routing_stats_torch

FIELDS = ("gate_sum", "select_count", "score_sum", "tokens_per_seq")


def distinct_logits(T, E, dtype, gen):
    """Logits without ties inside a row (even in fp16), so every backend must pick the same top-K."""
    ranks = torch.argsort(torch.rand(T, E, generator=gen), dim=1).float()
    return (ranks * (4.0 / E) - 2.0 + 0.01 * torch.rand(T, E, generator=gen)).to(dtype)


def assert_stats_close(got, ref, *, check_topk=False):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(a, b), name
    if check_topk:
        assert torch.equal(got.topk_idx, ref.topk_idx)


CASES = [
    # T, E, K, S, dtype, fused, score_fn, sorted, masked, given_topk
    (301, 10, 3, 7, torch.float32, False, "softmax", True, True, False),
    (257, 64, 8, 5, torch.float16, False, "softmax", False, False, False),
    (130, 6, 2, 3, torch.float32, True, "sigmoid", True, True, False),
    (99, 5, 2, 4, torch.float16, True, "softmax", False, True, True),
    (70, 3, 1, 2, torch.float32, False, "sigmoid", True, False, True),
    (163, 64, 8, 6, torch.bfloat16, False, "softmax", False, True, False),
    (88, 7, 3, 3, torch.bfloat16, True, "sigmoid", True, False, False),
]


@pytest.mark.interpret
@pytest.mark.parametrize("T,E,K,S,dtype,fused,score_fn,is_sorted,masked,given", CASES)
def test_triton_matches_torch(T, E, K, S, dtype, fused, score_fn, is_sorted, masked, given):
    gen = torch.Generator().manual_seed(hash((T, E, K)) % 2**31)
    seq = torch.randint(0, S, (T,), generator=gen)
    if is_sorted:
        seq = seq.sort().values
    mask = torch.rand(T, generator=gen) > 0.25 if masked else None
    topk = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if given else None
    kw = dict(top_k=K, seq_ids=seq, num_seqs=S, mask=mask, topk_idx=topk, score_fn=score_fn, return_topk=True)
    if fused:
        H = 40
        kw.update(hidden=torch.randn(T, H, generator=gen).to(dtype),
                  router_weight=(torch.randn(E, H, generator=gen) / H**0.5).to(dtype),
                  router_bias=torch.randn(E, generator=gen).to(dtype))
        logits = None
    else:
        logits = distinct_logits(T, E, dtype, gen)
    got = routing_stats(logits, backend="triton", **kw)
    ref = routing_stats_torch(logits, **kw)
    assert_stats_close(got, ref, check_topk=True)


@pytest.mark.interpret
def test_many_programs_tiles_and_short_sequences():
    """Small blocks force many programs x several tiles, with sequences (some empty) crossing program
    boundaries: exercises the slot bookkeeping and the fixed-order reduction."""
    gen = torch.Generator().manual_seed(1)
    T, E, K, S = 203, 20, 4, 40
    lengths = torch.randint(0, 6, (S,), generator=gen)
    lengths[3] = lengths[10] = 0  # empty sequences in the middle
    lengths[-1] = T - lengths[:-1].sum()
    seq = torch.repeat_interleave(torch.arange(S), lengths)
    logits = distinct_logits(T, E, torch.float32, gen)
    mask = torch.rand(T, generator=gen) > 0.1
    kw = dict(top_k=K, seq_ids=seq, num_seqs=S, mask=mask)
    ref = routing_stats_torch(logits, **kw)
    for block_t, tiles in [(16, 1), (16, 3), (32, 2)]:
        for sorted_flag in (None, True):  # told, or found out
            got = rs_kernel.routing_stats_triton(logits, block_t=block_t, tiles_per_prog=tiles,
                                                 seq_sorted=sorted_flag, **kw)
            assert_stats_close(got, ref)
    assert ref.tokens_per_seq[3] == 0 and ref.tokens_per_seq[10] == 0


@pytest.mark.interpret
def test_empty_batch_and_non_contiguous_logits():
    E, S = 7, 3
    empty = routing_stats(torch.zeros(0, E), top_k=2, seq_ids=torch.zeros(0, dtype=torch.long), num_seqs=S,
                          backend="triton", return_topk=True)
    assert empty.gate_sum.shape == (S, E) and not empty.gate_sum.any()
    assert empty.tokens_per_seq.tolist() == [0, 0, 0] and empty.topk_idx.shape == (0, 2)

    gen = torch.Generator().manual_seed(2)
    T = 150
    big = distinct_logits(E, 2 * T, torch.float32, gen)  # [E, 2T] storage; logits = every other column, transposed
    logits = big[:, ::2].t()
    assert not logits.is_contiguous()
    seq = torch.randint(0, S, (T,), generator=gen)
    kw = dict(top_k=3, seq_ids=seq, num_seqs=S, return_topk=True)
    assert_stats_close(routing_stats(logits, backend="triton", **kw), routing_stats_torch(logits.contiguous(), **kw),
                       check_topk=True)


@pytest.mark.interpret
def test_outputs_poisoned_before_the_call(monkeypatch):
    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-12345)

    monkeypatch.setattr(rs_kernel, "new_empty", poisoned)
    gen = torch.Generator().manual_seed(3)
    T, E, S = 120, 9, 4
    logits = distinct_logits(T, E, torch.float32, gen)
    kw = dict(top_k=2, seq_ids=torch.randint(0, S, (T,), generator=gen), num_seqs=S, return_topk=True)
    got = rs_kernel.routing_stats_triton(logits, block_t=16, tiles_per_prog=2, **kw)
    assert_stats_close(got, routing_stats_torch(logits, **kw), check_topk=True)


@pytest.mark.interpret
def test_deterministic_bitwise():
    gen = torch.Generator().manual_seed(4)
    T, E, S = 260, 12, 6
    logits = torch.randn(T, E, generator=gen)
    kw = dict(top_k=2, seq_ids=torch.randint(0, S, (T,), generator=gen), num_seqs=S)
    a = rs_kernel.routing_stats_triton(logits, block_t=32, tiles_per_prog=2, **kw)
    b = rs_kernel.routing_stats_triton(logits, block_t=32, tiles_per_prog=2, **kw)
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name))


@pytest.mark.interpret
def test_own_topk_distinct_when_fewer_than_k_logits_are_finite():
    """Rows with 1 or 2 finite logits and K = 3: the K indices stay distinct (finite ones first, the rest the
    lowest-index -inf columns) and the stats equal torch's for that selection."""
    gen = torch.Generator().manual_seed(9)
    T, E, K, S = 40, 6, 3, 2
    logits = torch.full((T, E), float("-inf"))
    for t in range(T):
        cols = torch.randperm(E, generator=gen)[: 1 + t % 2]
        logits[t, cols] = torch.randn(len(cols), generator=gen)
    seq = (torch.arange(T) >= T // 2).long()
    got = routing_stats(logits, top_k=K, seq_ids=seq, num_seqs=S, return_topk=True, backend="triton")
    idx = got.topk_idx
    for t in range(T):
        row = idx[t].tolist()
        assert len(set(row)) == K, row
        n_fin = 1 + t % 2
        assert set(row[:n_fin]) == set(torch.isfinite(logits[t]).nonzero().flatten().tolist())
        rest = sorted(set(range(E)) - set(row[:n_fin]))[: K - n_fin]
        assert row[n_fin:] == rest
    ref = routing_stats_torch(logits, top_k=K, seq_ids=seq, num_seqs=S, topk_idx=idx)
    assert_stats_close(got, ref)


def test_values_checked_without_sync_on_cuda_and_sortedness_promise(monkeypatch):
    """CPU: bad ids and a false seq_sorted=True promise raise BadInputError. CUDA tensors: the checks are
    device-side assertions (torch._assert_async), so no host sync; we record them instead of running CUDA."""
    seq = torch.tensor([0, 1, 1, 0])
    logits = torch.randn(4, 3)
    with pytest.raises(BadInputError, match="seq_sorted"):
        routing_stats(logits, top_k=1, seq_ids=seq, num_seqs=2, seq_sorted=True)
    with pytest.raises(BadInputError, match="seq_sorted must be"):
        routing_stats(logits, top_k=1, seq_ids=seq, num_seqs=2, seq_sorted="yes")
    from moe_unlearn.ops import api

    asserted, stacked = [], []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append((bool(cond), msg)))
    real_stack = torch.stack
    monkeypatch.setattr(torch, "stack", lambda *a, **k: stacked.append(1) or real_stack(*a, **k))

    class OnCuda(torch.Tensor):  # a CPU tensor that reports a CUDA device: the checks only branch on .device
        @property
        def device(self):
            return torch.device("cuda", 0)

    api._check_values(seq.as_subclass(OnCuda), None, 2, 3, True)
    assert not stacked  # no host-side check
    assert [ok for ok, _ in asserted] == [True, True, False] and "seq_sorted=True" in asserted[-1][1]
    monkeypatch.setenv("MOE_UNLEARN_SYNC_CHECKS", "1")
    with pytest.raises(BadInputError, match="seq_sorted"):
        api._check_values(seq.as_subclass(OnCuda), None, 2, 3, True)


def test_bad_inputs_raise_one_clear_error():
    logits = torch.randn(10, 4)
    seq = torch.zeros(10, dtype=torch.long)
    with pytest.raises(BadInputError, match="seq_ids"):
        routing_stats(logits, top_k=2, seq_ids=seq + 5, num_seqs=2)
    with pytest.raises(BadInputError, match="top_k"):
        routing_stats(logits, top_k=5, seq_ids=seq, num_seqs=1)
    with pytest.raises(BadInputError, match="topk_idx"):
        routing_stats(logits, top_k=2, seq_ids=seq, num_seqs=1, topk_idx=torch.full((10, 2), 4))
    with pytest.raises(BadInputError, match="seq_ids"):
        routing_stats(logits, top_k=2, seq_ids=seq[:5], num_seqs=1)
    with pytest.raises(BadInputError, match="backend"):
        routing_stats(logits, top_k=2, seq_ids=seq, num_seqs=1, backend="fast")


@pytest.mark.interpret
def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MOE_UNLEARN_BACKEND", raising=False)
    assert choose_backend("routing_stats", cpu) == "torch"  # CPU tensors: torch unless asked
    monkeypatch.setenv("MOE_UNLEARN_BACKEND", "triton")
    assert choose_backend("routing_stats", cpu) == "triton"  # interpreter is on in tests
    assert choose_backend("routing_stats", cpu, backend="torch") == "torch"  # kwarg beats the environment
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        choose_backend("routing_stats", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        choose_backend("routing_stats", cpu, backend="cuda")
    # The automatic choice really runs the torch path on the CPU: make the Triton launcher explode.
    monkeypatch.delenv("MOE_UNLEARN_BACKEND")
    monkeypatch.setattr(rs_kernel, "routing_stats_triton", lambda *a, **k: 1 / 0)
    out = routing_stats(torch.randn(5, 4), top_k=1, seq_ids=torch.zeros(5, dtype=torch.long), num_seqs=1)
    assert int(out.select_count.sum()) == 5


def test_cuda_extension_offers_no_routing_stats(monkeypatch):
    """The CUDA routing kernel was removed: a built extension on a CUDA device is still refused for
    routing_stats, with the reason (the op passes no CUDA names to the dispatch)."""
    import moe_unlearn.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "cuda_extension", lambda: object())
    with pytest.raises(BackendUnavailable, match="no 'routing_stats'"):
        choose_backend("routing_stats", torch.device("cuda", 0), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_torch(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    T, E, K, S = 5003, 64, 6, 37
    logits = distinct_logits(T, E, dtype, gen).cuda()
    seq = torch.randint(0, S, (T,), generator=gen).cuda()
    mask = (torch.rand(T, generator=gen) > 0.2).cuda()
    for sorted_ids in (True, False):
        s = seq.sort().values if sorted_ids else seq
        kw = dict(top_k=K, seq_ids=s, num_seqs=S, mask=mask, return_topk=True)
        got = routing_stats(logits, backend=backend, **kw)
        ref = routing_stats_torch(logits, **kw)
        for name in FIELDS:
            a, b = getattr(got, name), getattr(ref, name)
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
            else:
                assert torch.equal(a, b), name
        assert torch.equal(got.topk_idx, ref.topk_idx)
    if backend == "triton":  # fused router GEMM
        H = 256
        hid = torch.randn(T, H, generator=gen).to(dtype).cuda()
        w = (torch.randn(E, H, generator=gen) / H**0.5).to(dtype).cuda()
        kw = dict(top_k=K, seq_ids=seq, num_seqs=S, hidden=hid, router_weight=w)
        got, ref = routing_stats(None, backend="triton", **kw), routing_stats_torch(None, **kw)
        # bf16/fp16 tensor-core dots reorder the sums: allow a few top-K flips at near-ties.
        assert (got.select_count - ref.select_count).abs().sum() <= 0.002 * T * K
        torch.testing.assert_close(got.score_sum, ref.score_sum, rtol=1e-3, atol=1e-2)


@pytest.mark.interpret
@pytest.mark.parametrize("T,E,K,dtype", [
    (131, 64, 8, torch.bfloat16),   # 32-bit keys (16-bit logits)
    (97, 37, 4, torch.float16),     # 32-bit keys, odd E
    (75, 64, 4, torch.float32),     # 64-bit keys
    (53, 5, 5, torch.bfloat16),     # K = E: every expert
])
def test_ties_go_to_the_lowest_index_with_poisoned_outputs(monkeypatch, T, E, K, dtype):
    """Rows full of tied logits (about three experts per value) and rows where fewer than K are finite:
    the kernel's own top-K takes the highest logit, lowest index first, exactly as a stable descending sort,
    so counts, sums and indices equal the reference given that selection. Every output buffer starts NaN."""

    def poisoned(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-12345)

    monkeypatch.setattr(rs_kernel, "new_empty", poisoned)
    gen = torch.Generator().manual_seed(T + E)
    logits = torch.randint(-4, max(E // 3, 2) - 4, (T, E), generator=gen).float() * 0.5
    logits[::7, 2:] = float("-inf")
    logits = logits.to(dtype)
    rows_with_ties = (logits.float().sort(1).values.diff(dim=1) == 0).any(1).float().mean().item()
    assert rows_with_ties > 0.8  # (the -inf rows tie as well, which diff() does not count)
    S = 4
    seq = torch.randint(0, S, (T,), generator=gen).sort().values
    mask = torch.rand(T, generator=gen) > 0.1
    got = rs_kernel.routing_stats_triton(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask, return_topk=True,
                                         seq_sorted=True, block_t=16, tiles_per_prog=2)
    lowest_first = torch.sort(-logits.float(), dim=1, stable=True).indices[:, :K]
    ref = routing_stats_torch(logits, top_k=K, seq_ids=seq, num_seqs=S, mask=mask, topk_idx=lowest_first,
                              return_topk=True)
    assert_stats_close(got, ref, check_topk=True)
