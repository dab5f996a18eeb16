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
own size and the terms' (compare_with_eager). The worst seen over 100 random draws was 1.5e-7 * cond * max|ref|
with the LU solve, 7.6e-8 over 79 draws with the Gauss-Jordan solve of issue 21 (e*, grad_z,
grad_A; "large" A), a 30x margin or more. The logits' gradients soft * (g - <soft, g>) / tau
cancel, so they are measured against max|g| / tau (g the total gradient arriving on the mask;
worst seen 1.1e-7). A real bug (a wrong sign, a missing term, another sample's noise) is O(1)
relative. The masks (exactly 0/1 on both sides) are compared exactly: with continuous noise there
is no tie at the K-th place, where torch.topk's choice is unspecified; the kernel's tie rule
(the lower index) is tested on its own (test_topk_picks_the_k_largest_with_ties_to_the_lower_index).

The registered op (torch.library) is tested for its fake implementation, by opcheck, and under
torch.compile(fullgraph=True): the aot_eager backend in the interpreter (inductor's CPU codegen
would add ~30 s), inductor natively, plus CUDA-graph replays natively.
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
                                  [None, mod.Blocks(rows=2, examples=1, cols=2), mod.Blocks(rows=4, examples=2, cols=4),
                                   mod.Blocks(rows=4, examples=1, cols=4, gather=False)])
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
    def _philox_stream(out_ptr, n, seed, BLOCK: tl.constexpr):
        """out[4 c + lane] = tl.rand4x(seed, c)[lane]: the Philox stream the fused kernel draws from."""
        c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(seed, c)
        tl.store(out_ptr + 4 * c, u0, mask=c < n)
        tl.store(out_ptr + 4 * c + 1, u1, mask=c < n)
        tl.store(out_ptr + 4 * c + 2, u2, mask=c < n)
        tl.store(out_ptr + 4 * c + 3, u3, mask=c < n)


def kernel_uniforms(B, S, N, seed):
    """The documented stream, rebuilt here: row m = b*S + s owns positions m*P .. m*P + P - 1 of
    the rand4x stream (P = BLOCK_N^2, BLOCK_N = next power of two >= N); entry (i, j) of the A
    mask reads position j*BLOCK_N + i, factor i of the e mask position i*BLOCK_N + i."""
    bn = triton.next_power_of_2(N)
    P = bn * bn
    n = B * S * P // 4
    stream = torch.full((4 * n,), float("nan"), device=DEVICE)
    _philox_stream[(triton.cdiv(n, 64),)](stream, n, seed, BLOCK=64)
    m = torch.arange(B * S).view(B, S, 1, 1)
    i = torch.arange(N).view(1, 1, N, 1)
    j = torch.arange(N).view(1, 1, 1, N)
    uA = stream.cpu()[m * P + j * bn + i]
    ue = stream.cpu()[m[..., 0] * P + i[..., 0] * bn + i[..., 0]]
    return uA.clamp(min=TINY).to(DEVICE), ue.clamp(min=TINY).to(DEVICE)


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


# The top-K device functions on given keys: every tie pattern, the value and key bisection, rows
# that stop early next to rows that end on a tie in the same program, rows without candidates.
TOPK_POOL = [float("-inf"), -1e30, planrec.NEVER_LOGIT, -2.5, 0.0, 1e-40, 1.0, math.nextafter(1.0, 2.0), 2.5,
             1e30, float("inf")]
if triton is not None:
    _topk_bisect = mod._topk_bisect
    _topk_rank = mod._topk_rank

    @triton.jit
    def _topk_probe(values_ptr, candidate_ptr, index_ptr, out_ptr, K, R: tl.constexpr, E: tl.constexpr,
                    INDEX_BITS: tl.constexpr, FLOAT_PASSES: tl.constexpr, RANK: tl.constexpr):
        offs = tl.arange(0, R)[:, None] * E + tl.arange(0, E)[None, :]
        values = tl.load(values_ptr + offs)
        candidate = tl.load(candidate_ptr + offs) != 0
        if RANK:
            chosen = _topk_rank(values, candidate, K, E)
        else:
            chosen = _topk_bisect(values, candidate, tl.load(index_ptr + offs), K, INDEX_BITS, FLOAT_PASSES)
        tl.store(out_ptr + offs, chosen.to(tl.int32))


def reference_topk(values, candidate, index, K):
    """The K candidates with the largest value, ties to the lower index (plain Python)."""
    chosen = torch.zeros(values.shape, dtype=torch.int32)
    for r in range(values.shape[0]):
        order = sorted((f for f in range(values.shape[1]) if candidate[r, f]),
                       key=lambda f: (-values[r, f].item(), index[r, f].item()))
        chosen[r, order[:K]] = 1
    return chosen


@needs_kernel
@settings(**SETTINGS)
@given(E=st.sampled_from([16, 64] if NATIVE else [4, 16, 64]), float_passes=st.sampled_from([0, 3, 24]),
       rank=st.booleans(), data=st.data())
def test_topk_picks_the_k_largest_with_ties_to_the_lower_index(E, float_passes, rank, data):
    """mask_A's early-stopping bisection (values, then keys after FLOAT_PASSES passes; the index
    bisection on a tie at the K-th place) and mask_e's pairwise rank, against a sort."""
    R = 4
    if rank and E > 32:
        E = 16           # the rank tile is [R, E, E]; mask_e has at most 32 entries
    values, candidate = torch.empty(R, E), torch.zeros(R, E, dtype=torch.int32)
    dead = data.draw(st.integers(-1, R - 1), label="row without candidates (-1: none)")
    n_min = E
    for r in range(R):
        kind = data.draw(st.sampled_from(["pool", "random", "mixed", "all equal"]), label=f"row {r}")
        if kind == "pool":
            row = data.draw(st.lists(st.sampled_from(TOPK_POOL), min_size=E, max_size=E))
        elif kind == "random":
            row = torch.randn(E, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))).tolist()
        elif kind == "mixed":
            row = data.draw(st.lists(st.sampled_from(TOPK_POOL) | st.floats(-4, 4, width=32), min_size=E, max_size=E))
        else:
            row = [data.draw(st.sampled_from(TOPK_POOL))] * E
        values[r] = torch.tensor(row)
        if r != dead:
            live = data.draw(st.lists(st.booleans(), min_size=E, max_size=E))
            live[data.draw(st.integers(0, E - 1))] = True
            candidate[r] = torch.tensor(live, dtype=torch.int32)
            n_min = min(n_min, int(candidate[r].sum()))
    K = data.draw(st.integers(1, n_min), label="K")
    index = torch.stack([torch.arange(E) if rank else
                         torch.randperm(E, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
                         for _ in range(R)]).to(torch.int32)
    out = torch.full((R, E), -1, dtype=torch.int32, device=DEVICE)
    _topk_probe[(1,)](values.to(DEVICE), candidate.to(DEVICE), index.to(DEVICE), out, K, R=R, E=E,
                      INDEX_BITS=E.bit_length() - 1, FLOAT_PASSES=float_passes, RANK=rank)
    assert torch.equal(out.cpu(), reference_topk(values, candidate, index, K)), (values, candidate, index, K)


@needs_kernel
def test_ties_and_tie_free_rows_share_a_program():
    """One forward program holds rows whose K-th value is unique (the bisection stops early) and
    rows with ties at the K-th place (integer logits, constant noise): the first agree with eager,
    the second take the lower flat index."""
    B, S, N, d, k_A, k_e = 2, 2, 5, 2, 7, 2
    z, A, la, le = make_inputs(B, N, d, seed=13)
    uA, ue = make_uniforms(B, S, N, 13)
    g = torch.Generator().manual_seed(3)
    la_tied = torch.randint(0, 3, (N, N), generator=g).float()
    le_tied = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    la, le = la.detach().clone(), le.detach().clone()
    la[1], le[1] = la_tied.to(DEVICE), le_tied.to(DEVICE)
    uA[1], ue[1] = 0.5, 0.5
    out = fused(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    assert torch.equal(out[1][0], ref[1][0]) and torch.equal(out[2][0], ref[2][0])
    off = ~torch.eye(N, dtype=torch.bool)
    flat = torch.arange(N * N).view(N, N)
    want_A = reference_topk(la_tied[off][None], torch.ones(1, N * (N - 1), dtype=torch.int32), flat[off][None], k_A)
    want_e = reference_topk(le_tied[None], torch.ones(1, N, dtype=torch.int32), torch.arange(N)[None], k_e)
    for s in range(S):
        assert torch.equal(out[1][1, s].cpu()[off].int(), want_A[0])
        assert torch.equal(out[2][1, s].cpu().int(), want_e[0])


@needs_kernel
def test_seed_tensor_advances_on_the_device_and_gives_fresh_masks():
    """A one-element int64 seed tensor: read by the kernels, advanced by one on the device per
    call (fresh masks each call), the same masks for an equal seed tensor (and for that int), the
    backward regenerating the noise of the seed the forward used, not of the advanced one."""
    B, S, N, d, k_A, k_e = 3, 2, 5, 3, 7, 3
    z, A, la, le = make_inputs(B, N, d, seed=17)
    args = (z, A, la, le, S, k_A, k_e, 0.8)
    seed = torch.tensor([41], device=DEVICE)
    a = fused(*args, seed=seed)
    assert seed.device.type == DEVICE and seed.tolist() == [42]
    b = fused(*args, seed=seed)
    assert seed.tolist() == [43]
    assert not torch.equal(a[1], b[1]) and not torch.equal(a[2], b[2])
    for same in (fused(*args, seed=torch.tensor([41], device=DEVICE)), fused(*args, seed=41)):
        assert all(torch.equal(x, y) for x, y in zip(a, same))
    uA, ue = kernel_uniforms(B, S, N, 41)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 0.8, uA, ue)
    compare_with_eager(a, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], 3.0, 0.8)
    # noise given: the seed is neither read nor advanced
    fused(*args, uA, ue, seed=seed)
    assert seed.tolist() == [43]


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
    (dict(seed=1.5), "seed"),
    (dict(seed_tensor=torch.tensor([1.0])), "seed tensor must be one int64"),
    (dict(seed_tensor=torch.tensor([1, 2])), "seed tensor must be one int64"),
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
    seed = p["seed_tensor"].to(DEVICE) if "seed_tensor" in p else p["seed"]
    with pytest.raises(ValueError, match=message):
        fused(z, A, la, le, p["S"], p["k_A"], p["k_e"], p["tau"], uA, None, seed)


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
    seed = torch.tensor([5])        # a seed tensor: the int's masks, and advanced as on the kernel path
    e = fused(*inputs, S, 7, 2, 0.8, seed=seed)
    assert seed.tolist() == [6] and all(torch.equal(x, y) for x, y in zip(c, e))


# ------------------------------------------------------------------------------------------------
# launch variants: the plain path, the masked-sum reads, the benchmark's ablations
# ------------------------------------------------------------------------------------------------

@needs_kernel
def test_plain_autograd_function_equals_the_registered_op(monkeypatch):
    """Eager calls (and torch without custom_op) run PersonalizedSCMFunction, torch.compile the
    registered op: the same kernels, so the same bits, forward and backward."""
    B, S, N, d, k_A, k_e = 2, 2, 5, 3, 8, 3
    z, A, la, le = make_inputs(B, N, d, seed=31, scale="large")
    uA, ue = make_uniforms(B, S, N, 31)
    up = [torch.randn(s, generator=torch.Generator().manual_seed(1)).to(DEVICE)
          for s in [(B, S, N, d), (B, S, N, N), (B, S, N)]]
    results = []
    for registered in ("always", "never"):
        monkeypatch.setattr(mod, "REGISTERED_OP", registered)
        out = fused(z, A, la, le, S, k_A, k_e, 0.9, uA, ue)
        results.append(list(out) + list(grads(out, [z, A, la, le], up)))
    assert all(torch.equal(x, y) for x, y in zip(*results))


@needs_kernel
@pytest.mark.skipif(triton is None or not mod.HAS_GATHER, reason="this Triton has no tl.gather")
def test_gather_and_masked_sum_reads_agree():
    """Blocks(gather=False) reads rows and columns by masked sums (what a Triton without
    tl.gather runs): the same masks, the same values to float32 rounding, both equal to eager."""
    B, S, N, d, k_A, k_e = 3, 2, 6, 5, 15, 4
    z, A, la, le = make_inputs(B, N, d, seed=37, scale="large")
    uA, ue = make_uniforms(B, S, N, 37)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 1.2, uA, ue)
    up = [torch.randn_like(r) for r in ref]
    outs = []
    for gather in (True, False):
        out = mod.PersonalizedSCMFunction.apply(z, A, la, le, S, k_A, k_e, 1.2, None, None, 3,
                                                mod.Blocks(rows=4, examples=1, gather=gather))
        outs.append(list(out) + list(grads(out, [z, A, la, le], up)))
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    for x, y in zip(outs[0], outs[1]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    out = mod.PersonalizedSCMFunction.apply(z, A, la, le, S, k_A, k_e, 1.2, uA, ue, None, mod.Blocks(gather=False))
    compare_with_eager(out, ref, [z, A, la, le], up, cond_of(A, ref[1]), 1.2)


@needs_kernel
def test_benchmark_ablations_compute_what_they_say():
    """kernels.bench times Blocks(ablation=...) variants to say what bounds the kernel; they are
    wrong on purpose, but exactly so: FIXED_MASK takes the first k candidates in index order,
    NO_SOLVE returns mask_e * z."""
    B, S, N, d, k_A, k_e = 2, 3, 5, 3, 9, 2
    z, A, la, le = [t.detach() for t in make_inputs(B, N, d, seed=41, scale="large")]
    flat = torch.arange(N * N).view(N, N)
    off = flat // N != flat % N
    want_A = (off & (torch.cumsum(off.flatten().int(), 0).view(N, N) <= k_A)).float().to(DEVICE)
    want_e = (torch.arange(N) < k_e).float().to(DEVICE)
    fixed, no_solve, both = [mod._forward(z, A, la, le, S, k_A, k_e, None, None, 5, mod.Blocks(ablation=a))
                             for a in (mod.ABLATE_FIXED_MASK, mod.ABLATE_NO_SOLVE,
                                       mod.ABLATE_FIXED_MASK | mod.ABLATE_NO_SOLVE)]
    assert torch.equal(fixed[1], want_A.expand(B, S, N, N)) and torch.equal(fixed[2], want_e.expand(B, S, N))
    system = torch.eye(N, device=DEVICE) - (want_A * A).T
    torch.testing.assert_close(fixed[0], torch.linalg.solve(system, want_e[:, None] * z[:, None]).expand(B, S, N, d),
                               rtol=1e-4, atol=1e-5)
    real = mod._forward(z, A, la, le, S, k_A, k_e, None, None, 5)
    assert torch.equal(no_solve[1], real[1]) and torch.equal(no_solve[2], real[2])
    torch.testing.assert_close(no_solve[0], no_solve[2][..., None] * z[:, None])
    assert torch.equal(both[1], fixed[1]) and torch.equal(both[0], want_e[:, None] * z[:, None].expand(B, S, N, d))


# ------------------------------------------------------------------------------------------------
# inside a compiled graph: the registered ops
# ------------------------------------------------------------------------------------------------

needs_op = pytest.mark.skipif(triton is None or mod.scm_forward_op is None
                              or (not INTERPRET and not torch.cuda.is_available()),
                              reason="no Triton, no torch.library.custom_op, or neither CUDA nor the interpreter")


@needs_op
def test_registered_ops_fake_implementations_give_shapes_and_dtypes():
    """What torch.compile traces with: no kernel runs, only shapes and dtypes (the forward's
    outputs in the inputs' dtypes, the backward's in float32, grad_A empty when not needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    B, S, N, d = 3, 4, 5, 7
    blocks = mod._blocks_to_list(None)
    with FakeTensorMode():
        for dtype in (torch.float32, torch.bfloat16):
            z, A = torch.empty(B, N, d, dtype=dtype, device=DEVICE), torch.empty(N, N, dtype=dtype, device=DEVICE)
            la, le = torch.empty(B, N, N, dtype=dtype, device=DEVICE), torch.empty(B, N, dtype=dtype, device=DEVICE)
            seed = torch.empty(1, dtype=torch.int64, device=DEVICE)
            e_star, mask_A, mask_e = torch.ops.planrec.personalized_scm_fwd(z, A, la, le, None, None, seed, S, 6, 2,
                                                                            1.0, blocks)
            assert [tuple(t.shape) for t in (e_star, mask_A, mask_e)] == [(B, S, N, d), (B, S, N, N), (B, S, N)]
            assert [t.dtype for t in (e_star, mask_A, mask_e)] == [dtype] * 3
            for need_grad_A in (True, False):
                out = torch.ops.planrec.personalized_scm_bwd(z, A, la, le, None, None, seed, e_star, mask_A, mask_e,
                                                             e_star, None, None, 1.0, need_grad_A, blocks)
                assert [tuple(t.shape) for t in out] == [(B, N, d), (N, N) if need_grad_A else (0,), (B, N, N), (B, N)]
                assert all(t.dtype == torch.float32 for t in out)


@needs_op
def test_registered_op_passes_torch_library_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch, as torch checks them."""
    z, A, la, le = make_inputs(2, 4, 3, seed=43)
    torch.library.opcheck(mod.scm_forward_op, (z, A, la, le, None, None, torch.tensor([5], device=DEVICE),
                                               2, 5, 2, 0.7, mod._blocks_to_list(None)))


@needs_op
def test_compiles_into_one_graph_and_keeps_the_noise_live():
    """torch.compile(fullgraph=True) traces the public function without a graph break (the
    interpreter runs it with the aot_eager backend: Dynamo, the fake ops and AOT autograd, not
    inductor's codegen; natively with inductor). Forward and backward equal eager fed with the
    kernel's Philox uniforms; the seed tensor is advanced inside the graph, and a second call
    draws fresh masks, from it and from the seed the graph draws itself (seed=None)."""
    B, S, N, d, k_A, k_e = 2, 3, 4, 3, 5, 2
    z, A, la, le = make_inputs(B, N, d, seed=47, scale="large")

    def step(z, A, la, le, seed):
        return fused(z, A, la, le, S, k_A, k_e, 0.6, seed=seed), fused(z, A, la, le, S, k_A, k_e, 0.6)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")
    seed = torch.tensor([7], device=DEVICE)
    seeded, drawn = compiled(z, A, la, le, seed)
    assert seed.tolist() == [8]
    uA, ue = kernel_uniforms(B, S, N, 7)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 0.6, uA, ue)
    compare_with_eager(seeded, ref, [z, A, la, le], [torch.randn_like(r) for r in ref], cond_of(A, ref[1]), 0.6)
    check_counts(drawn[1].detach(), drawn[2].detach(), k_A, k_e)
    seeded2, drawn2 = compiled(z, A, la, le, seed)
    assert seed.tolist() == [9]
    assert not torch.equal(seeded[1], seeded2[1]) and not torch.equal(drawn[1], drawn2[1])


@needs_op
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_draw_fresh_masks():
    """mode="reduce-overhead": the op is captured in a CUDA graph; each replay reads the seed the
    graph draws on the device, so the masks change from replay to replay (an int seed read on
    the host would be frozen into the graph)."""
    B, S, N, d, k_A, k_e = 64, 4, 8, 8, 28, 6
    z, A, la, le = [t.detach() for t in make_inputs(B, N, d, seed=53)]
    uA, ue = make_uniforms(B, S, N, 53)
    compiled = torch.compile(lambda z, A, la, le, uA, ue: (fused(z, A, la, le, S, k_A, k_e), fused(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)),
                             mode="reduce-overhead", fullgraph=True)
    ref = planrec.personalized_scm(z, A, la, le, S, k_A, k_e, 1.0, uA, ue)
    masks = []
    with torch.no_grad():
        for _ in range(4):
            torch.compiler.cudagraph_mark_step_begin()
            drawn, given = compiled(z, A, la, le, uA, ue)
            check_counts(drawn[1], drawn[2], k_A, k_e)
            masks.append(drawn[1].clone())
            assert torch.equal(given[1], ref[1]) and torch.equal(given[2], ref[2])
            assert_close(given[0], ref[0], 3.0, "e_star")
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i))


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
    # the ablation rows: timed, checked for their mask counts only, summarized by report_ablations
    variants = {"fused": fused, "fused_philox": fused,
                **{name: bench.fused_variant(mod.Blocks(**fields)) for name, fields in bench.ABLATIONS.items()}}
    rows = bench.measure_shape(3, 2, 5, 3, variants, ["fwd"], DEVICE, time_ms, float("nan"), "test", lambda r: None)
    assert {r["impl"]: r["check"] for r in rows} == {"fused": "ok", "fused_philox": "ok", "fused_philox_nogather": "ok",
                                                    "ablate_fixed_mask": "ablation", "ablate_no_solve": "ablation",
                                                    "ablate_fixed_mask_no_solve": "ablation"}
    (line,) = bench.report_ablations(rows)
    assert line.startswith("ablation fwd B=3 N_m=2 N=5 d=3") and "top-K" in line and "solve" in line


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
