"""Tests of kernels/personalized_scm.py against planrec.personalized_scm.

On a machine without CUDA these run the Triton kernels in the interpreter (TRITON_INTERPRET=1,
set here before triton or kernels is imported). kernels/gpu_check.sh runs them natively on a GPU
with TRITON_INTERPRET=0 and KERNEL_TEST_PROFILE=native (fixed hypothesis seed, fewer kernel
variants to compile). Sizes are kept small: the interpreter executes each program in Python.

Tolerances. Both sides compute in float32 with different operation orders. A solve's error is
about N * cond(S) * eps_32 * max|x| (eps_32 = 6e-8) and the gradients add one more solve with
the same S, so e*, grad_z and grad_A are compared with atol = 5e-6 * cond(S) * max|reference|
(plus rtol = 1e-4), with cond(S) computed in float64 from the sampled masks (draws with
cond(S) > 1e3 are discarded); grad_A, a sum of terms that can cancel, against the larger of its
own size and the terms' (compare_with_eager). The worst seen over 100 random draws was 1.5e-7 * cond * max|ref|,
a 30x margin. The logits' gradients soft * (g - <soft, g>) / tau cancel, so they are measured
against max|g| / tau (g the total gradient arriving on the mask; worst seen 1.1e-7). A real bug
(a wrong sign, a missing term, another sample's noise) is O(1) relative. The masks (exactly 0/1
on both sides) are compared exactly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib   # noqa: E402
import math        # noqa: E402

import pytest      # noqa: E402
import torch       # noqa: E402
try:
    import triton                  # noqa: E402
    import triton.language as tl   # noqa: E402
except ImportError:                # no Triton (not Linux): only the eager fallback is tested
    triton = None
from hypothesis import HealthCheck, assume, given, settings, strategies as st   # noqa: E402

import planrec     # noqa: E402
import kernels     # noqa: E402

mod = importlib.import_module("kernels.personalized_scm")
mod.POISON_OUTPUTS = True      # unwritten output elements stay NaN and fail the comparisons
fused = kernels.personalized_scm

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(triton is None or (not INTERPRET and not torch.cuda.is_available()),
                                  reason="no Triton, or TRITON_INTERPRET=0 and no CUDA device")
# Two hypothesis profiles. "interpret" (default, CI): random draws over every awkward shape.
# "native" (KERNEL_TEST_PROFILE=native, kernels/gpu_check.sh): a fixed seed and narrowed
# strategies, so a native GPU run compiles a handful of kernel variants (each new padded shape or
# flag set is a cold compile) and is reproducible.
PROFILE = os.environ.get("KERNEL_TEST_PROFILE", "interpret")
if PROFILE not in ("interpret", "native"):
    raise ValueError(f"KERNEL_TEST_PROFILE must be interpret or native, got {PROFILE!r}")
NATIVE = PROFILE == "native"
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=NATIVE,
                max_examples=int(os.environ.get("KERNEL_TEST_EXAMPLES", "12" if NATIVE else "25")))
N_STRATEGY = st.sampled_from([3, 6]) if NATIVE else st.integers(2, 7)      # padded to 4 and 8
D_STRATEGY = st.sampled_from([3, 5]) if NATIVE else st.integers(1, 6)      # padded to 4 and 8
# Forced small blocks: several programs, partial blocks and several column chunks even at tiny sizes.
BLOCKS_STRATEGY = st.sampled_from([None] if NATIVE else
                                  [None, mod.Blocks(rows=2, examples=1, cols=2), mod.Blocks(rows=4, examples=2, cols=4)])
TINY = torch.finfo(torch.float32).tiny


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_inputs(B, N, d, seed, scale="small", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, d, generator=g)
    A = torch.randn(N, N, generator=g)
    if scale == "small":
        A = A * (0.5 / A.norm())                  # ||(M*A)^T||_2 <= 0.5, so cond(S) <= 3
    else:
        A = A * (1.5 / math.sqrt(N))              # off-diagonal mass ~1.5: pivoting happens
    logits_A = 2 * torch.randn(B, N, N, generator=g)
    logits_e = 2 * torch.randn(B, N, generator=g)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (z, A, logits_A, logits_e)]


def make_uniforms(B, S, N, seed):
    g = torch.Generator().manual_seed(seed + 1)
    uA = torch.rand(B, S, N, N, generator=g).clamp_(min=TINY)
    ue = torch.rand(B, S, N, generator=g).clamp_(min=TINY)
    return uA.to(DEVICE), ue.to(DEVICE)


def cond_of(A, mask_A):
    N = A.shape[0]
    S = torch.eye(N, dtype=torch.float64) - (mask_A.detach().double().cpu() * A.detach().double().cpu()).transpose(-1, -2)
    return torch.linalg.cond(S).max().item()


def assert_close(actual, expected, cond=1.0, name="", scale=None):
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=1e-4,
                               atol=5e-6 * max(cond, 1.0) * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def adjoint_term_scale(A, mask_A, e_star, up_e):
    """max|lambda| * max|e*|, lambda = S^-T up_e (float64): the size of the terms
    -mask_A * lambda e*^T whose sum over examples, samples and columns is grad_A."""
    N = A.shape[0]
    S = torch.eye(N, dtype=torch.float64) - (mask_A.detach().double().cpu() * A.detach().double().cpu()).transpose(-1, -2)
    adjoint = torch.linalg.solve(S.transpose(-1, -2), up_e.detach().double().cpu())
    return adjoint.abs().max().item() * e_star.detach().abs().max().item()


def compare_with_eager(out, ref, inputs, up, cond, tau):
    """e*, masks and the gradients of z, A, logits_A, logits_e (upstream `up`; None = no gradient
    on that output). grad_A sums terms mask * lambda e*^T that can cancel to nearly zero (a draw
    with k_e = 1 left grad_A at 4e-8 with terms of order 1), so its error is measured against the
    larger of max|grad_A| and the terms' size (adjoint_term_scale). The logits' gradient
    soft * (g - <soft, g>) / tau cancels too, so its error is measured against max|g| / tau, g the
    total gradient arriving on the mask."""
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    assert_close(out[0], ref[0], cond, "e_star")
    got = grads(out, inputs, up)
    want = grads(ref, list(inputs) + [ref[1], ref[2]], up)
    assert_close(got[0], want[0], cond, "z")
    terms = adjoint_term_scale(inputs[1], ref[1], ref[0], up[0])
    assert_close(got[1], want[1], cond, "A", scale=max(want[1].abs().max().item(), terms))
    for name, a, b, g in zip(["logits_A", "logits_e"], got[2:], want[2:4], want[4:]):
        assert_close(a, b, cond, name, scale=g.abs().max().item() / tau)
    assert torch.all(torch.diagonal(got[2], dim1=-2, dim2=-1) == 0)


def grads(outputs, inputs, upstream):
    pairs = [(o, g) for o, g in zip(outputs, upstream) if g is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def check_counts(mask_A, mask_e, k_A, k_e):
    N = mask_A.shape[-1]
    assert torch.all((mask_A == 0) | (mask_A == 1)) and torch.all((mask_e == 0) | (mask_e == 1))
    assert torch.all(mask_A.sum((-1, -2)) == k_A)
    assert torch.all(mask_e.sum(-1) == k_e)
    assert torch.all(torch.diagonal(mask_A, dim1=-2, dim2=-1) == 0)
    assert mask_A.shape[-2] == N


if triton is not None:
    @triton.jit
    def _philox_uniforms(out_ptr, n, seed, BLOCK: tl.constexpr):
        """tl.rand at global offsets 0..n-1: the stream the fused kernel uses for a seed."""
        off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + off, tl.rand(seed, off), mask=off < n)


def kernel_uniforms(B, S, N, seed):
    n_a, n_e = B * S * N * N, B * S * N
    u = torch.full((n_a + n_e,), float("nan"), device=DEVICE)
    _philox_uniforms[(triton.cdiv(n_a + n_e, 256),)](u, n_a + n_e, seed, BLOCK=256)
    u = u.clamp(min=TINY)
    return u[:n_a].view(B, S, N, N), u[n_a:].view(B, S, N)


# ------------------------------------------------------------------------------------------------
# agreement with the eager reference
# ------------------------------------------------------------------------------------------------

@needs_kernel
@settings(**SETTINGS)
@given(B=st.integers(1, 3), S=st.integers(1, 3), N=N_STRATEGY, d=D_STRATEGY,
       tau=st.sampled_from([0.3, 1.0, 2.5]), scale=st.sampled_from(["small", "large"]),
       mask_grads=st.booleans(), blocks=BLOCKS_STRATEGY, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_matches_eager(B, S, N, d, tau, scale, mask_grads, blocks, seed, data):
    k_A = data.draw(st.integers(1, N * (N - 1)), label="k_A")
    k_e = data.draw(st.integers(1, N), label="k_e")
    z, A, la, le = make_inputs(B, N, d, seed, scale)
    uA, ue = make_uniforms(B, S, N, seed)
    if blocks is None:
        out = fused(z, A, la, le, S, k_A, k_e, tau, uA, ue)
    else:           # the seed is unused: the uniforms fix the noise
        out = mod.PersonalizedSCMFunction.apply(z, A, la, le, S, k_A, k_e, tau, uA, ue, 0, blocks)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, tau, uA, ue)
    cond = cond_of(A, ref[1])
    assume(cond < 1e3)      # a near-singular draw says nothing about the kernel
    check_counts(out[1], out[2], k_A, k_e)
    g = torch.Generator().manual_seed(seed + 2)
    up = [torch.randn(r.shape, generator=g).to(DEVICE) for r in ref]
    if not mask_grads:
        up[1] = up[2] = None
    compare_with_eager(out, ref, [z, A, la, le], up, cond, tau)


@needs_kernel
@pytest.mark.parametrize("B,S,N,d", [(2, 16, 8, 8), (1, 2, 16, 64), (1, 1, 32, 64)])
def test_largest_sizes_match_eager(B, S, N, d):
    z, A, la, le = make_inputs(B, N, d, seed=7)
    uA, ue = make_uniforms(B, S, N, 7)
    k_A, k_e = N * (N - 1) // 2 + 1, N - 1
    out = fused(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    compare_with_eager(out, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], 3.0, 1.0)


class CountLaunches:
    """Counts the kernel launches (every launch goes through mod._launch), per kernel."""

    def __init__(self, monkeypatch):
        self.counts = {}
        launch = mod._launch

        def counting(kernel, grid, *args, **meta):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return launch(kernel, grid, *args, **meta)
        monkeypatch.setattr(mod, "_launch", counting)


@needs_kernel
def test_many_columns_run_in_one_launch_each_way(monkeypatch):
    """d = 70 > 64 columns, not a multiple of the 32-column chunk (32 + 32 + 6): the model passes
    its C candidates as C*d columns. One forward and one backward launch loop over the chunks,
    sharing one draw of the masks and one factorization per row."""
    launches = CountLaunches(monkeypatch)
    B, S, N, d = 2, 2, 4, 70
    assert d > 64 and d % mod.MAX_BLOCK_C != 0
    z, A, la, le = make_inputs(B, N, d, seed=9, scale="large")
    uA, ue = make_uniforms(B, S, N, 9)
    out = fused(z, A, la, le, S, 5, 3, 0.8, uA, ue)
    assert launches.counts == {"_forward_kernel": 1}
    ref = planrec.personalized_scm(z, A, la, le, S, 5, 3, 0.8, uA, ue)
    compare_with_eager(out, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], cond_of(A, ref[1]), 0.8)
    assert launches.counts == {"_forward_kernel": 1, "_backward_kernel": 1}
    # With a seed the masks do not depend on the number of columns either.
    seeded = fused(z, A, la, le, S, 5, 3, 0.8, seed=4)
    narrow = fused(z[..., :3], A, la, le, S, 5, 3, 0.8, seed=4)
    assert torch.equal(seeded[1], narrow[1]) and torch.equal(seeded[2], narrow[2])
    torch.testing.assert_close(seeded[0][..., :3], narrow[0])     # same solves, other chunk width


@needs_kernel
def test_chunk_loop_with_forced_small_chunks_matches_eager(monkeypatch):
    """Eleven columns in chunks of 4 (4 + 4 + 3), several examples per backward program, a partial
    last block, N_m = 3 padded to 4 sample slots: still one launch each way."""
    launches = CountLaunches(monkeypatch)
    B, S, N, d = 3, 3, 5, 11
    z, A, la, le = make_inputs(B, N, d, seed=21, scale="large")
    uA, ue = make_uniforms(B, S, N, 21)
    out = mod.PersonalizedSCMFunction.apply(z, A, la, le, S, 8, 3, 1.3, uA, ue, 0,
                                            mod.Blocks(rows=4, examples=2, cols=4))
    ref = planrec.personalized_scm(z, A, la, le, S, 8, 3, 1.3, uA, ue)
    compare_with_eager(out, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], cond_of(A, ref[1]), 1.3)
    assert launches.counts == {"_forward_kernel": 1, "_backward_kernel": 1}


@pytest.mark.skipif(triton is None, reason="no Triton")
def test_backward_grid_fills_a_gpu_at_the_benchmark_shape():
    """B = 4096, N_m = 8, N = d = 8: at least 4 programs per SM of a 132-SM H100 (the old
    backward had 128 programs looping over the samples), and one per example at most."""
    n_programs = mod.backward_grid(4096, 8, 8, 8)
    assert 4 * 132 <= n_programs <= 4096
    # the model's evaluation path, C = 101 candidates as 808 columns, uses the same grid
    assert mod.backward_grid(4096, 8, 8, 808) >= 4 * 132


@needs_kernel
def test_seeded_noise_is_the_documented_philox_stream():
    """With a seed, forward AND backward (which regenerates the noise) equal eager fed with
    tl.rand(seed, global offset) uniforms: A mask at b*S*N*N + s*N*N + i*N + j, factor mask after."""
    B, S, N, d, k_A, k_e, seed = 3, 2, 5, 3, 9, 3, 2024
    z, A, la, le = make_inputs(B, N, d, seed=11)
    out = fused(z, A, la, le, S, k_A, k_e, 0.7, seed=seed)
    uA, ue = kernel_uniforms(B, S, N, seed)
    published = mod.philox_uniforms(B, S, N, seed, DEVICE)       # what kernels.bench checks with
    assert torch.equal(published[0], uA) and torch.equal(published[1], ue)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 0.7, uA, ue)
    compare_with_eager(out, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], 3.0, 0.7)


@needs_kernel
def test_bfloat16_inputs():
    B, S, N, d = 2, 2, 6, 4
    z, A, la, le = make_inputs(B, N, d, seed=3, dtype=torch.bfloat16)
    uA, ue = make_uniforms(B, S, N, 3)
    out = fused(z, A, la, le, S, 12, 4, 1.0, uA, ue)
    assert [o.dtype for o in out] == [torch.bfloat16] * 3
    ref = planrec.personalized_scm(*[t.float() for t in (z, A, la, le)], S, 12, 4, 1.0, uA, ue)
    assert torch.equal(out[1].float(), ref[1]) and torch.equal(out[2].float(), ref[2])
    torch.testing.assert_close(out[0].float(), ref[0], rtol=1e-2, atol=1e-2)   # bf16 output rounding
    out[0].float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in (z, A, la, le))


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

@needs_kernel
def test_seed_determinism_launch_layout_and_exact_k():
    B, S, N, d, k_A, k_e = 5, 3, 6, 3, 11, 4
    z, A, la, le = make_inputs(B, N, d, seed=5)
    args = (z, A, la, le, S, k_A, k_e, 0.5)
    a = fused(*args, seed=99)
    b = fused(*args, seed=99)
    c = fused(*args, seed=100)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    check_counts(a[1], a[2], k_A, k_e)
    check_counts(c[1], c[2], k_A, k_e)
    # The noise depends on (seed, entry) only: other block sizes and warps give the same masks,
    # bit for bit. Values may differ in the last bits natively (another block size is another
    # compiled program: fused multiply-adds and reduction trees change), so they are compared
    # to float32 rounding; the interpreter gives identical bits.
    up = [torch.randn_like(t) for t in a]
    g_ref = grads(a, [z, A, la, le], up)
    for blocks in (mod.Blocks(rows=1, examples=1, warps=1, backward_warps=2),
                   mod.Blocks(rows=4, examples=4, warps=8, backward_warps=1)):
        o = mod.PersonalizedSCMFunction.apply(*args, None, None, 99, blocks)
        assert torch.equal(a[1], o[1]) and torch.equal(a[2], o[2])
        torch.testing.assert_close(o[0], a[0], rtol=1e-5, atol=1e-6)
        for x, y in zip(g_ref, grads(o, [z, A, la, le], up)):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_torch_seed_controls_default_noise():
    z, A, la, le = make_inputs(2, 4, 2, seed=1)
    torch.manual_seed(0)
    a = fused(z, A, la, le, 4, 5, 2)
    torch.manual_seed(0)
    b = fused(z, A, la, le, 4, 5, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _chi2_quantile_999(df):
    """Wilson-Hilferty approximation of the chi-square 0.999 quantile."""
    return df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


@needs_kernel
def test_gumbel_top1_frequency_matches_softmax():
    """k = 1: the chosen entry is a draw from softmax(logits) (the Gumbel-max trick)."""
    B, S, N = 256, 4, 4
    g = torch.Generator().manual_seed(0)
    la1 = 0.7 * torch.randn(N, N, generator=g)
    le1 = torch.tensor([0.0, 0.5, 1.0, -0.5])
    la = la1.expand(B, N, N).contiguous().to(DEVICE)
    le = le1.expand(B, N).contiguous().to(DEVICE)
    z = torch.randn(B, N, 1).to(DEVICE)
    A = torch.zeros(N, N).to(DEVICE)
    _, mask_A, mask_e = fused(z, A, la, le, S, 1, 1, 1.0, seed=12345)
    off = ~torch.eye(N, dtype=torch.bool)
    for counts, logits in [(mask_A.cpu().sum((0, 1))[off], la1[off]), (mask_e.cpu().sum((0, 1)), le1)]:
        expected = torch.softmax(logits, 0) * B * S
        assert counts.sum() == B * S and expected.min() > 5
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < _chi2_quantile_999(len(counts) - 1), (chi2, counts, expected)


@needs_kernel
def test_ties_go_to_the_lower_flat_index():
    B, S, N, k_A, k_e = 2, 2, 4, 5, 2
    z, A, _, _ = make_inputs(B, N, 2, seed=2)
    la = torch.zeros(B, N, N, device=DEVICE)
    le = torch.zeros(B, N, device=DEVICE)
    uA = torch.full((B, S, N, N), 0.5, device=DEVICE)
    ue = torch.full((B, S, N), 0.5, device=DEVICE)
    _, mask_A, mask_e = fused(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    offdiag = [(i, j) for i in range(N) for j in range(N) if i != j][:k_A]
    want = torch.zeros(N, N)
    for i, j in offdiag:
        want[i, j] = 1
    assert torch.equal(mask_A.cpu(), want.expand(B, S, N, N))
    assert torch.equal(mask_e.cpu(), torch.tensor([1.0, 1, 0, 0]).expand(B, S, N))
    # a tie only at the K-th place: the larger entries first, then the lower index
    le2 = torch.tensor([[0.0, 1.0, 0.0, 0.0]], device=DEVICE)
    _, _, m = fused(z[:1], A, la[:1], le2, 1, k_A, 2, 1.0, uA[:1, :1], ue[:1, :1])
    assert m.cpu().tolist() == [[[1.0, 1.0, 0.0, 0.0]]]


@needs_kernel
def test_never_picks_the_diagonal_even_with_infinite_logits():
    N = 3
    la = torch.full((1, N, N), float("-inf"), device=DEVICE)
    la[0, 0, 1] = 0.0
    z = torch.randn(1, N, 2, device=DEVICE)
    _, mask_A, _ = fused(z, torch.zeros(N, N, device=DEVICE), la, torch.zeros(1, N, device=DEVICE),
                         2, 3, 1, seed=1)
    check_counts(mask_A, torch.ones(1, 2, N), 3, N)
    assert torch.all(mask_A[..., 0, 1] == 1)


# ------------------------------------------------------------------------------------------------
# the solve
# ------------------------------------------------------------------------------------------------

def _no_pivot_solve(S, r):
    S, r = S.clone(), r.clone()
    n = S.shape[0]
    for k in range(n):
        f = S[k + 1:, k] / S[k, k]
        S[k + 1:] -= f[:, None] * S[k]
        r[k + 1:] -= f[:, None] * r[k]
    x = torch.zeros_like(r)
    for k in reversed(range(n)):
        x[k] = (r[k] - S[k, k + 1:] @ x[k + 1:]) / S[k, k]
    return x


@needs_kernel
def test_solve_with_pivoting_is_accurate_against_float64():
    """S = I + 1000 P + noise (P a derangement): cond(S) ~ 1, but eliminating on the unit diagonal
    first multiplies errors by ~1e6. All masks are full (k = all), so S = I - A^T exactly."""
    B, S_, N, d = 2, 2, 6, 4
    g = torch.Generator().manual_seed(0)
    P = torch.roll(torch.eye(N), 1, dims=1)
    system = torch.eye(N) + 1000 * P + 0.3 * torch.randn(N, N, generator=g) * (1 - torch.eye(N))
    A = (torch.eye(N) - system).T.contiguous()
    z = torch.randn(B, N, d, generator=g)
    la, le = torch.randn(B, N, N, generator=g), torch.randn(B, N, generator=g)
    x64 = torch.linalg.solve(system.double(), z.double())                  # [B, N, d]
    naive = torch.stack([_no_pivot_solve(system, z[b]) for b in range(B)])
    assert ((naive.double() - x64).norm() / x64.norm()).item() > 1e-3    # the case needs pivoting
    zt, At = z.to(DEVICE).requires_grad_(), A.to(DEVICE).requires_grad_()
    e_star, mask_A, mask_e = fused(zt, At, la.to(DEVICE), le.to(DEVICE), S_, N * (N - 1), N, seed=3)
    assert torch.all(mask_e == 1) and torch.all(mask_A.sum((-1, -2)) == N * (N - 1))
    err = (e_star.detach().cpu().double() - x64[:, None]).norm() / x64.norm()
    assert err.item() < 1e-5
    # backward: grad_z = sum_s S^-T g, against float64
    up = torch.randn(B, S_, N, d, generator=g)
    (gz,) = torch.autograd.grad(e_star, zt, up.to(DEVICE))
    want = torch.linalg.solve(system.double().T, up.double()).sum(1)
    assert ((gz.cpu().double() - want).norm() / want.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------------------
# buffers, limits, fallback
# ------------------------------------------------------------------------------------------------

@needs_kernel
def test_outputs_are_poisoned_then_fully_written():
    assert torch.isnan(mod._poisoned((3, 2), torch.float32, DEVICE)).all()
    B, S, N, d = 3, 3, 5, 7          # 9 rows: the last forward block of 4 rows is partial, the
    z, A, la, le = make_inputs(B, N, d, seed=8)    # last backward block of 2 examples too, 7 = 4 + 3 columns
    blocks = mod.Blocks(rows=4, examples=2, cols=4)
    fwd = mod._forward(z.detach(), A.detach(), la.detach(), le.detach(), S, 7, 2, None, None, 17, blocks)
    assert all(torch.isfinite(t).all() for t in fwd)
    up = [torch.randn_like(t) for t in fwd]
    bwd = mod._backward(z.detach(), A.detach(), la.detach(), le.detach(), None, None, 17, 1.0,
                        *fwd, *up, need_grad_A=True, blocks=blocks)
    assert all(torch.isfinite(t).all() for t in bwd)


BAD_CALLS = [
    (dict(N=33), "N .*2..32"),
    (dict(N=1), "N .*2..32"),
    (dict(d=0), "d .*>= 1"),
    (dict(S=17), "n_samples .*1..16"),
    (dict(S=0), "n_samples .*1..16"),
    (dict(dtype=torch.float64), "float32 or bfloat16"),
    (dict(dtype=torch.float16), "float32 or bfloat16"),
    (dict(k_A=0), "k_A must be in"),
    (dict(k_A=13), "k_A must be in"),
    (dict(k_e=5), "k_e must be in"),
    (dict(tau=0.0), "tau"),
    (dict(uA_shape=(2, 2, 4, 3)), "uniform_A must have shape"),
    (dict(seed=-1), "seed"),
]


@needs_kernel
@pytest.mark.parametrize("change,message", BAD_CALLS)
def test_unsupported_sizes_raise_value_error(change, message):
    p = dict(B=2, N=4, d=3, S=2, k_A=3, k_e=2, tau=1.0, dtype=torch.float32, uA_shape=None, seed=None)
    p.update(change)
    B, N, d = p["B"], p["N"], p["d"]
    z = torch.randn(B, N, d, dtype=p["dtype"], device=DEVICE)
    A = torch.randn(N, N, dtype=p["dtype"], device=DEVICE)
    la = torch.randn(B, N, N, dtype=p["dtype"], device=DEVICE)
    le = torch.randn(B, N, dtype=p["dtype"], device=DEVICE)
    uA = torch.rand(p["uA_shape"], device=DEVICE) if p["uA_shape"] else None
    with pytest.raises(ValueError, match=message):
        fused(z, A, la, le, p["S"], p["k_A"], p["k_e"], p["tau"], uA, None, p["seed"])


def test_cpu_without_interpreter_falls_back_to_eager(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(mod, "_forward", None)          # the kernel path must not be taken
    B, S, N, d = 2, 3, 5, 3
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(B, N, d, generator=g), 0.2 * torch.randn(N, N, generator=g),
              torch.randn(B, N, N, generator=g), torch.randn(B, N, generator=g)]
    inputs = [t.requires_grad_() for t in inputs]
    uA = torch.rand(B, S, N, N, generator=g)
    ue = torch.rand(B, S, N, generator=g)
    out = fused(*inputs, S, 7, 2, 0.8, uA, ue)
    ref = planrec.personalized_scm(*inputs, S, 7, 2, 0.8, uA, ue)
    up = [torch.randn_like(r) for r in ref]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a, b) for a, b in zip(grads(out, inputs, up), grads(ref, inputs, up)))
    torch.manual_seed(1)
    a = fused(*inputs, S, 7, 2, 0.8)
    torch.manual_seed(1)
    b = planrec.personalized_scm(*inputs, S, 7, 2, 0.8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c, d_ = fused(*inputs, S, 7, 2, 0.8, seed=5), fused(*inputs, S, 7, 2, 0.8, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(c, d_))
    check_counts(c[1].detach(), c[2].detach(), 7, 2)


# ------------------------------------------------------------------------------------------------
# in the model
# ------------------------------------------------------------------------------------------------

@needs_kernel
def test_model_agrees_with_eager_given_the_same_noise():
    cfg = planrec.Config(n_users=10, n_items=20, history_len=5, n_mask_samples=3)
    torch.manual_seed(0)
    model = planrec.PlanRec(cfg).to(DEVICE).train()
    with torch.no_grad():
        model.dependency_matrix.normal_(0, 0.2)
    user = torch.tensor([1, 2], device=DEVICE)
    history = torch.randint(0, 21, (2, 5), device=DEVICE)
    items = torch.randint(1, 21, (2, 3), device=DEVICE)
    labels = torch.tensor([[1.0, 0, 0], [1, 0, 0]], device=DEVICE)

    def with_noise(fn):
        def scm(z, A, la, le, S, k_A, k_e, tau):
            g = torch.Generator().manual_seed(42)
            B, N, _ = z.shape
            uA = torch.rand(B, S, N, N, generator=g).clamp_(min=TINY).to(z.device)
            ue = torch.rand(B, S, N, generator=g).clamp_(min=TINY).to(z.device)
            return fn(z, A, la, le, S, k_A, k_e, tau, uA, ue)
        return scm

    results = []
    for fn in (planrec.personalized_scm, fused):
        model.scm_fn = with_noise(fn)
        model.zero_grad()
        torch.manual_seed(1)            # the same reparameterization noise
        loss, _ = model.loss(model(user, history, items), labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# the benchmark's correctness check (kernels/bench.py), end to end with a stand-in timer
# ------------------------------------------------------------------------------------------------

@needs_kernel
def test_bench_checks_every_implementation_before_timing_and_rejects_a_wrong_one():
    bench = importlib.import_module("kernels.bench")

    def transposed_wrong(z, A, la, le, S, k_A, k_e, tau=1.0, uA=None, ue=None):
        """eager with I - M * A instead of I - (M * A)^T: a plausible bug."""
        mask_A, mask_e = planrec.sample_masks(la, le, S, k_A, k_e, tau, uA, ue)
        system = torch.eye(z.shape[1], device=z.device) - mask_A * A
        return torch.linalg.solve(system, mask_e[..., None] * z[:, None]), mask_A, mask_e

    timed, written = [], []

    def time_ms(run, grad_to_none):
        """Stands in for triton.testing.do_bench: resets the inputs' gradients before each run."""
        assert len(grad_to_none) == 3 and all(t.is_leaf and t.requires_grad for t in grad_to_none)
        for _ in range(2):
            for t in grad_to_none:
                t.grad = None
            run()
        timed.append(run)
        return 1.0

    impls = {"fused": fused, "eager_solve": planrec.personalized_scm, "eager_solve_ex": bench.eager_solve_ex,
             "fused_philox": fused, "eager_rand": planrec.personalized_scm}
    rows = bench.measure_shape(3, 2, 5, 3, impls, ["fwd", "fwdbwd"], DEVICE, time_ms, float("nan"), "test",
                               written.append)
    assert rows == written and len(rows) == 2 * len(impls)
    assert all(r["check"] == "ok" and r["median_ms"] == 1.0 for r in rows), [(r["impl"], r["note"]) for r in rows]
    assert len(timed) == len(rows)
    rows = bench.measure_shape(3, 2, 5, 3, {"eager_solve": planrec.personalized_scm, "eager_solve_ex": transposed_wrong},
                               ["fwd"], DEVICE, time_ms, float("nan"), "test", lambda r: None)
    wrong = [r for r in rows if r["impl"] == "eager_solve_ex"]
    assert wrong[0]["check"] == "WRONG" and "e_star" in wrong[0]["note"] and math.isnan(wrong[0]["median_ms"])


@needs_kernel
def test_bench_sweep_checks_and_times_every_launch_variant():
    bench = importlib.import_module("kernels.bench")
    written = []

    def time_ms(run, grad_to_none):
        run()
        return 1.0 + len(written) % 3           # stand-in timer: some variants "faster" than others
    grid = dict(rows=(1, 4), examples=(1, 2), warps=(1, 4))
    rows, best = bench.sweep_blocks([(3, 2, 5, 3)], written.append, device=DEVICE, time_ms=time_ms,
                                    copy_bw=float("nan"), grid=grid)
    assert rows == written and len(rows) == 2 * (2 + 4)      # eager, default fused, 4 variants per mode
    assert all(r["check"] == "ok" for r in rows), [(r["impl"], r["note"]) for r in rows]
    assert {r["impl"] for r in rows if r["mode"] == "fwd"} >= {"fused rows=4 warps=1", "fused rows=1 warps=4"}
    assert {r["impl"] for r in rows if r["mode"] == "fwdbwd"} >= {"fused examples=2 bwarps=4"}
    assert len(best) == 2 and best[0].startswith("sweep best fwd") and best[1].startswith("sweep best fwdbwd")
