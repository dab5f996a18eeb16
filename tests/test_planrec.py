"""Tests for planrec.py (issue 3, "Tests"): the public functions dag_penalty, gumbel_topk,
personalized_scm and balance, and the PlanRec model with its ablation switches.

Gradients are checked in float64. Property tests use hypothesis with a few dozen examples each;
the whole file runs in well under a minute on two cores (about 15 s on an idle one).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import planrec
from planrec import Config, PlanRec, balance, dag_penalty, gumbel_topk, personalized_scm

PROPERTY = settings(max_examples=30, deadline=None)
FEW = settings(max_examples=15, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread(few_threads):
    """Every tensor here is tiny: one thread (conftest.py: PLANREC_TEST_THREADS overrides it)."""


seeds = st.integers(0, 2**31 - 1)


def rng(seed):
    return torch.Generator().manual_seed(seed)


def uniform_like(shape, seed, dtype=torch.float64):
    """Uniforms strictly inside (0, 1), as the public functions require."""
    u = torch.rand(shape, generator=rng(seed), dtype=dtype)
    eps = torch.finfo(dtype).eps
    return u.clamp(eps, 1 - eps)


def gumbel(uniform):
    return -torch.log(-torch.log(uniform))


def hand_topk(perturbed, k):
    """0/1 indicator of the k largest entries of the last dimension, computed independently."""
    order = np.argsort(-perturbed.detach().numpy(), axis=-1, kind="stable")[..., :k]
    hard = np.zeros(perturbed.shape)
    np.put_along_axis(hard, order, 1.0, axis=-1)
    return torch.from_numpy(hard)


# ================================================================================================
# DAG penalty, Eq. (10)
# ================================================================================================

@st.composite
def dags(draw, max_n=8):
    """A random DAG: a strictly upper-triangular matrix in a random topological order."""
    n = draw(st.integers(1, max_n))
    order = draw(st.permutations(range(n)))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 100.0]))
    upper = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=n * n, max_size=n * n))
    U = torch.tensor(upper, dtype=torch.float64).reshape(n, n).triu(1) * scale
    P = torch.eye(n, dtype=torch.float64)[list(order)]
    return P @ U @ P.T


@PROPERTY
@given(A=dags(), alpha=st.sampled_from([None, 0.01, 0.5, 2.0]))
def test_dag_penalty_is_zero_for_every_dag(A, alpha):
    # I + alpha A*A is unit triangular in the topological order, so every power has trace n.
    assert dag_penalty(A, alpha).item() == 0.0
    # the same in float32 for moderate scales (no overflow)
    if A.abs().max() <= 10:
        assert dag_penalty(A.float(), alpha).item() == 0.0


@st.composite
def cyclic(draw, max_n=6):
    """A matrix with at least one directed cycle (length 1..n) of non-negligible weights."""
    n = draw(st.integers(1, max_n))
    length = draw(st.integers(1, n))
    nodes = draw(st.permutations(range(n)))[:length]
    others = draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=n * n, max_size=n * n))
    A = torch.tensor(others, dtype=torch.float64).reshape(n, n)
    weights = draw(st.lists(st.floats(0.5, 3), min_size=length, max_size=length))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=length, max_size=length))
    for t in range(length):
        A[nodes[t], nodes[(t + 1) % length]] = signs[t] * weights[t]
    return A


@PROPERTY
@given(A=cyclic())
def test_dag_penalty_is_positive_whenever_there_is_a_cycle(A):
    assert dag_penalty(A).item() > 0


def test_dag_penalty_is_positive_for_a_single_weak_cycle():
    A = torch.zeros(5, 5, dtype=torch.float64)
    A[1, 3] = A[3, 1] = 0.1          # one weak 2-cycle; the strong edge 0 -> 2 is acyclic
    A[0, 2] = 5.0
    # B = alpha A*A; tr((I + B)^5) - 5 = sum_k C(5, k) tr(B^k); only closed walks 1 -> 3 -> 1 count:
    # tr(B^2) = 2 (alpha b)^2, tr(B^4) = 2 (alpha b)^4 with b = 0.1^2, odd powers have zero trace
    a, b = 1 / 5, 0.01
    expected = math.comb(5, 2) * 2 * (a * b) ** 2 + math.comb(5, 4) * 2 * (a * b) ** 4
    assert dag_penalty(A).item() == pytest.approx(expected, rel=1e-12)


def reference_dag_penalty(A, alpha):
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0]
    M = np.eye(n) + alpha * A * A
    P = np.eye(n)
    for _ in range(n):
        P = P @ M
    by_product = np.trace(P) - n
    B = alpha * A * A                    # binomial expansion: sum_{k>=1} C(n,k) tr(B^k)
    by_series = sum(math.comb(n, k) * np.trace(np.linalg.matrix_power(B, k)) for k in range(1, n + 1))
    return by_product, by_series


@PROPERTY
@given(n=st.integers(1, 6), seed=seeds, scale=st.sampled_from([0.1, 1.0, 3.0]),
       alpha=st.sampled_from([None, 0.05, 1.0]))
def test_dag_penalty_equals_explicit_power_series(n, seed, scale, alpha):
    A = torch.randn(n, n, generator=rng(seed), dtype=torch.float64) * scale
    by_product, by_series = reference_dag_penalty(A, 1 / n if alpha is None else alpha)
    got = dag_penalty(A, alpha).item()
    assert got == pytest.approx(by_product, rel=1e-10, abs=1e-12)
    assert got == pytest.approx(by_series, rel=1e-10, abs=1e-12)


def test_dag_penalty_closed_form_two_by_two():
    a, b = 1.7, -0.4
    A = torch.tensor([[0.0, a], [b, 0.0]], dtype=torch.float64)
    # alpha = 1/2: tr([[1, a^2/2], [b^2/2, 1]]^2) - 2 = 2 * (a^2 b^2 / 4)
    assert dag_penalty(A).item() == pytest.approx(a**2 * b**2 / 2, rel=1e-14)


@FEW
@given(n=st.integers(1, 6), seed=seeds, alpha=st.sampled_from([None, 0.3]))
def test_dag_penalty_gradient_matches_finite_differences(n, seed, alpha):
    A = (torch.randn(n, n, generator=rng(seed), dtype=torch.float64) * 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: dag_penalty(X, alpha), (A,))
    # and the closed form: d tr(M^n) / dA = 2 alpha A * n (M^(n-1))^T
    a = 1 / n if alpha is None else alpha
    (grad,) = torch.autograd.grad(dag_penalty(A, alpha), A)
    M = torch.eye(n, dtype=torch.float64) + a * A.detach() ** 2
    expected = 2 * a * A.detach() * n * torch.linalg.matrix_power(M, n - 1).T
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# ================================================================================================
# gumbel_topk, Eq. (12) with straight-through top-K
# ================================================================================================

@st.composite
def gumbel_cases(draw):
    n = draw(st.integers(2, 12))
    k = draw(st.integers(1, n))
    rows = draw(st.integers(1, 4))
    tau = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(seeds)
    logits = torch.randn(rows, n, generator=rng(seed), dtype=torch.float64) * scale
    uniform = uniform_like((rows, n), seed + 1)
    return logits, uniform, k, tau


@PROPERTY
@given(case=gumbel_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_gumbel_topk_forward_selects_top_k_of_perturbed_logits(case, dtype):
    logits, uniform, k, tau = case
    mask = gumbel_topk(logits.to(dtype).requires_grad_(), k, tau, uniform.to(dtype))
    assert mask.shape == logits.shape and mask.dtype == dtype
    chosen = mask > 0.5
    assert (chosen.sum(-1) == k).all()
    # every entry is 0 or 1 (exactness: see the next test)
    assert torch.allclose(mask.double(), chosen.double(), rtol=0, atol=4 * torch.finfo(dtype).eps)
    expected = hand_topk(logits.to(dtype) + gumbel(uniform.to(dtype)), k).bool()
    assert torch.equal(chosen, expected)


@PROPERTY
@given(case=gumbel_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_gumbel_topk_forward_is_exactly_binary_with_k_ones_while_training(case, dtype):
    logits, uniform, k, tau = case
    logits = logits.to(dtype).requires_grad_()         # the training path (straight-through)
    mask = gumbel_topk(logits, k, tau, uniform.to(dtype))
    assert ((mask == 0) | (mask == 1)).all()
    assert (mask.sum(-1) == k).all()
    # exactly the same forward at another temperature
    assert torch.equal(mask, gumbel_topk(logits, k, tau * 7.3, uniform.to(dtype)))


@PROPERTY
@given(case=gumbel_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_gumbel_topk_forward_is_exactly_binary_without_gradient(case, dtype):
    logits, uniform, k, tau = case
    for grad_mode in (torch.no_grad(), torch.enable_grad()):   # logits that need no gradient
        with grad_mode:
            mask = gumbel_topk(logits.to(dtype), k, tau, uniform.to(dtype))
        assert ((mask == 0) | (mask == 1)).all()
        assert (mask.sum(-1) == k).all()
        assert torch.equal(mask, hand_topk(logits.to(dtype) + gumbel(uniform.to(dtype)), k).to(dtype))


@PROPERTY
@given(case=gumbel_cases(), tau2=st.sampled_from([0.01, 0.2, 1.0, 10.0, 100.0]))
def test_gumbel_topk_hard_mask_does_not_depend_on_tau(case, tau2):
    logits, uniform, k, tau = case
    a = gumbel_topk(logits, k, tau, uniform)
    b = gumbel_topk(logits, k, tau2, uniform)
    assert torch.equal(a > 0.5, b > 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@PROPERTY
@given(case=gumbel_cases(), seed=seeds)
def test_gumbel_topk_straight_through_gradient_is_softmax_jacobian_product(case, seed):
    logits, uniform, k, tau = case
    logits = logits.clone().requires_grad_()
    g = torch.randn(logits.shape, generator=rng(seed), dtype=torch.float64)
    (grad,) = torch.autograd.grad((gumbel_topk(logits, k, tau, uniform) * g).sum(), logits)
    # by hand: soft = softmax((logits + G) / tau); J^T g = soft * (g - <soft, g>) / tau
    x = (logits.detach() + gumbel(uniform)) / tau
    soft = torch.exp(x - x.max(-1, keepdim=True).values)
    soft = soft / soft.sum(-1, keepdim=True)
    expected = soft * (g - (soft * g).sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_gumbel_topk_never_chooses_minus_inf_and_gives_it_zero_gradient():
    logits = torch.randn(50, 6, generator=rng(0), dtype=torch.float64)
    logits[:, [1, 4]] = float("-inf")
    logits.requires_grad_()
    mask = gumbel_topk(logits, 4, 0.5, uniform_like((50, 6), 1))
    assert (mask[:, [1, 4]] == 0).all()
    assert ((mask > 0.5).sum(-1) == 4).all()
    (grad,) = torch.autograd.grad((mask * torch.randn(50, 6, dtype=torch.float64)).sum(), logits)
    assert torch.isfinite(grad).all()
    assert (grad[:, [1, 4]] == 0).all()


def test_gumbel_topk_own_noise_samples_the_softmax_distribution():
    # Gumbel-max trick: with k = 1, the chosen index is distributed as softmax(logits).
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = probs.log().expand(40000, 4)
    mask = gumbel_topk(logits, 1)
    assert ((mask > 0.5).sum(-1) == 1).all()
    frequency = (mask > 0.5).double().mean(0)
    torch.testing.assert_close(frequency, probs, rtol=0, atol=0.012)
    # and the tau of the soft relaxation does not change which entry is sampled
    torch.manual_seed(0)
    assert torch.equal(gumbel_topk(logits, 1, tau=0.05) > 0.5, mask > 0.5)


# ================================================================================================
# personalized_scm, Eq. (11)-(13)
# ================================================================================================

@st.composite
def scm_cases(draw, max_n=6, max_batch=3, max_samples=4):
    B = draw(st.integers(1, max_batch))
    S = draw(st.integers(1, max_samples))
    N = draw(st.integers(2, max_n))
    d = draw(st.integers(1, 3))
    k_A = draw(st.integers(1, N * (N - 1)))
    k_e = draw(st.integers(1, N))
    tau = draw(st.sampled_from([0.3, 1.0, 2.0]))
    seed = draw(seeds)
    g = rng(seed)
    z = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    # |A| < 0.8 / (N - 1): every masked system is strictly diagonally dominant, hence invertible
    A = (torch.rand(N, N, generator=g, dtype=torch.float64) * 2 - 1) * 0.8 / (N - 1)
    logits_A = torch.randn(B, N, N, generator=g, dtype=torch.float64)
    logits_e = torch.randn(B, N, generator=g, dtype=torch.float64)
    uniform_A = uniform_like((B, S, N, N), seed + 1)
    uniform_e = uniform_like((B, S, N), seed + 2)
    return dict(z=z, A=A, logits_A=logits_A, logits_e=logits_e, n_samples=S, k_A=k_A, k_e=k_e,
                tau=tau, uniform_A=uniform_A, uniform_e=uniform_e)


def call_scm(case, **override):
    c = dict(case, **override)
    return personalized_scm(c["z"], c["A"], c["logits_A"], c["logits_e"], c["n_samples"], c["k_A"],
                            c["k_e"], c["tau"], c["uniform_A"], c["uniform_e"])


def hand_masks(case):
    """Masks and their Gumbel-softmax relaxations, built from the uniforms independently of planrec."""
    B, N, _ = case["z"].shape
    S, tau = case["n_samples"], case["tau"]
    eye = torch.eye(N, dtype=torch.bool)
    logits_A = case["logits_A"].detach().masked_fill(eye, float("-inf"))[:, None].expand(B, S, N, N)
    pert_A = (logits_A + gumbel(case["uniform_A"])).reshape(B, S, N * N)
    pert_e = case["logits_e"].detach()[:, None] + gumbel(case["uniform_e"])
    hard_A = hand_topk(pert_A, case["k_A"]).reshape(B, S, N, N)
    hard_e = hand_topk(pert_e, case["k_e"])
    soft_A = torch.softmax(pert_A / tau, -1).reshape(B, S, N, N)
    soft_e = torch.softmax(pert_e / tau, -1)
    return hard_A, hard_e, soft_A, soft_e


def reference_e_star(z, A, mask_A, mask_e):
    """float64 numpy: solve (I - (M_A * A)^T) e = M_e * z, building the system explicitly."""
    z, A = z.detach().double().numpy(), A.detach().double().numpy()
    mask_A, mask_e = mask_A.detach().double().numpy(), mask_e.detach().double().numpy()
    B, S, N, _ = mask_A.shape
    out = np.zeros((B, S, N, z.shape[-1]))
    for b in range(B):
        for s in range(S):
            system = np.eye(N) - (mask_A[b, s] * A).T
            out[b, s] = np.linalg.solve(system, mask_e[b, s][:, None] * z[b])
    return torch.from_numpy(out)


@PROPERTY
@given(case=scm_cases())
def test_personalized_scm_shapes_and_masks(case):
    e_star, mask_A, mask_e = call_scm(case)
    B, N, d = case["z"].shape
    S = case["n_samples"]
    assert e_star.shape == (B, S, N, d)
    assert mask_A.shape == (B, S, N, N)
    assert mask_e.shape == (B, S, N)
    assert (torch.diagonal(mask_A, dim1=-2, dim2=-1) == 0).all()         # never the diagonal
    assert ((mask_A > 0.5).sum((-1, -2)) == case["k_A"]).all()
    assert ((mask_e > 0.5).sum(-1) == case["k_e"]).all()
    assert torch.allclose(mask_A, (mask_A > 0.5).double(), rtol=0, atol=1e-15)
    assert torch.allclose(mask_e, (mask_e > 0.5).double(), rtol=0, atol=1e-15)
    hard_A, hard_e, _, _ = hand_masks(case)
    assert torch.equal((mask_A > 0.5).double(), hard_A)                  # the top-K of logits + G
    assert torch.equal((mask_e > 0.5).double(), hard_e)


@PROPERTY
@given(case=scm_cases())
def test_personalized_scm_masks_are_exactly_binary_while_training(case):
    _, mask_A, mask_e = call_scm(case, logits_A=case["logits_A"].clone().requires_grad_(),
                                 logits_e=case["logits_e"].clone().requires_grad_())
    assert ((mask_A == 0) | (mask_A == 1)).all() and ((mask_e == 0) | (mask_e == 1)).all()
    assert (mask_A.sum((-1, -2)) == case["k_A"]).all() and (mask_e.sum(-1) == case["k_e"]).all()


@PROPERTY
@given(case=scm_cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_personalized_scm_solve_matches_float64_reference(case, dtype):
    cast = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in case.items()}
    e_star, mask_A, mask_e = call_scm(cast)
    hard_A, hard_e, _, _ = hand_masks(case)
    expected = reference_e_star(case["z"], case["A"], hard_A, hard_e)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(e_star.double(), expected, rtol=tol, atol=tol)
    # and the defining equation, with the returned masks
    system = torch.eye(e_star.shape[-2], dtype=dtype) - (mask_A * cast["A"]).transpose(-1, -2)
    torch.testing.assert_close(system @ e_star, mask_e[..., None] * cast["z"][:, None], rtol=tol, atol=tol)


@FEW
@given(case=scm_cases(max_n=4, max_batch=2, max_samples=3))
def test_personalized_scm_gradcheck_continuous_parts(case):
    """z and A with the masks fixed by fixed uniforms: e* is a smooth function of both."""
    z = case["z"].clone().requires_grad_()
    A = case["A"].clone().requires_grad_()
    f = lambda z_, A_: call_scm(case, z=z_, A=A_)[0]
    assert torch.autograd.gradcheck(f, (z, A))


@FEW
@given(case=scm_cases(max_n=4, max_batch=2, max_samples=3), seed=seeds)
def test_personalized_scm_straight_through_gradient_for_logits(case, seed):
    """The forward is piecewise constant in the logits, so finite differences see zero there. The
    straight-through gradient is defined as: evaluate the downstream function F(M_A, M_e) at the hard
    masks, take its (smooth, gradcheck-able) gradient in the masks, and pull it back through the
    Jacobian of the Gumbel softmax. We build that reference by hand and compare."""
    B, N, d = case["z"].shape
    S = case["n_samples"]
    W = torch.randn(B, S, N, d, generator=rng(seed), dtype=torch.float64)
    z = case["z"].clone().requires_grad_()
    A = case["A"].clone().requires_grad_()
    logits_A = case["logits_A"].clone().requires_grad_()
    logits_e = case["logits_e"].clone().requires_grad_()
    e_star, _, _ = call_scm(case, z=z, A=A, logits_A=logits_A, logits_e=logits_e)
    got = torch.autograd.grad((W * e_star).sum(), (z, A, logits_A, logits_e))

    hard_A, hard_e, soft_A, soft_e = hand_masks(case)

    def F(M_A, M_e, z_, A_):
        system = torch.eye(N, dtype=torch.float64) - (M_A * A_).transpose(-1, -2)
        return (W * torch.linalg.solve(system, M_e[..., None] * z_[:, None])).sum()

    M_A = hard_A.clone().requires_grad_()
    M_e = hard_e.clone().requires_grad_()
    zr, Ar = case["z"].clone().requires_grad_(), case["A"].clone().requires_grad_()
    assert torch.autograd.gradcheck(F, (M_A, M_e, zr, Ar))     # F is smooth in the masks
    g_A, g_e, g_z, g_Amat = torch.autograd.grad(F(M_A, M_e, zr, Ar), (M_A, M_e, zr, Ar))
    tau = case["tau"]
    flat_soft, flat_g = soft_A.reshape(B, S, -1), g_A.reshape(B, S, -1)
    jvp_A = flat_soft * (flat_g - (flat_soft * flat_g).sum(-1, keepdim=True)) / tau
    jvp_e = soft_e * (g_e - (soft_e * g_e).sum(-1, keepdim=True)) / tau
    expected = (g_z, g_Amat, jvp_A.reshape(B, S, N, N).sum(1), jvp_e.sum(1))   # logits shared by samples
    for name, a, b in zip(("z", "A", "logits_A", "logits_e"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"gradient w.r.t. {name}")
    assert (torch.diagonal(got[2], dim1=-2, dim2=-1) == 0).all()   # the diagonal logits are ignored


def test_personalized_scm_masked_out_factor_gets_no_gradient_through_e_star():
    B, S, N, d, k_e, j = 3, 5, 6, 4, 3, 2
    g = rng(7)
    z = torch.randn(B, N, d, generator=g, dtype=torch.float64, requires_grad=True)
    A = (torch.randn(N, N, generator=g, dtype=torch.float64) * 0.15).requires_grad_()
    logits_A = torch.randn(B, N, N, generator=g, dtype=torch.float64)
    logits_e = torch.randn(B, N, generator=g, dtype=torch.float64)
    logits_e[:, j] = -1e9                               # factor j is never kept
    logits_A[:, 0, 4] = -1e9                            # and edge 0 -> 4 never used
    logits_A.requires_grad_()
    logits_e.requires_grad_()
    e_star, mask_A, mask_e = personalized_scm(z, A, logits_A, logits_e, S, 10, k_e, 1.0,
                                              uniform_like((B, S, N, N), 8), uniform_like((B, S, N), 9))
    assert (mask_e[..., j] == 0).all() and (mask_A[..., 0, 4] == 0).all()
    gz, gA, gla, gle = torch.autograd.grad(e_star.sum(), (z, A, logits_A, logits_e))
    assert (gz[:, j] == 0).all()
    assert (gle[:, j] == 0).all()
    assert gA[0, 4] == 0
    # ... while kept factors do receive gradient (the check above is not vacuous)
    kept = [i for i in range(N) if i != j]
    assert (gz[:, kept].abs().sum((-1, -2)) > 0).all()
    assert gA.abs().sum() > 0


def test_personalized_scm_samples_draw_independent_noise():
    torch.manual_seed(0)
    B, S, N, d = 2, 8, 8, 2
    z = torch.randn(B, N, d)
    e_star, mask_A, mask_e = personalized_scm(z, torch.zeros(N, N), torch.zeros(B, N, N),
                                              torch.zeros(B, N), S, 10, 4)
    for b in range(B):   # uniform logits: 8 identical draws of a 4-of-8 mask would be a 70^-7 event
        assert len({tuple(m.tolist()) for m in (mask_e[b] > 0.5)}) > 1
        assert len({tuple(m.flatten().tolist()) for m in (mask_A[b] > 0.5)}) > 1


@pytest.mark.parametrize("k_A,k_e", [(0, 2), (13, 2), (3, 0), (3, 5), (-1, 2)])
def test_personalized_scm_rejects_invalid_k(k_A, k_e):
    N = 4
    with pytest.raises(ValueError):
        personalized_scm(torch.randn(1, N, 2), torch.zeros(N, N), torch.zeros(1, N, N), torch.zeros(1, N),
                         2, k_A, k_e)


# ================================================================================================
# balance, Eq. (16)-(17)
# ================================================================================================

probability = st.floats(0, 1, allow_nan=False)
betas = st.sampled_from([0.002, 0.05, 1.0])


@PROPERTY
@given(y_shared=probability, samples=st.lists(probability, min_size=1, max_size=10), beta=betas)
def test_balance_lies_between_shared_and_sample_mean(y_shared, samples, beta):
    ys = torch.tensor(y_shared, dtype=torch.float64)
    s = torch.tensor(samples, dtype=torch.float64)
    y, uncertainty = balance(ys, s, beta)
    mean = s.mean()
    lo, hi = min(ys, mean), max(ys, mean)
    assert lo - 1e-12 <= y <= hi + 1e-12
    assert 0.5 <= uncertainty < 1 or uncertainty == 1.0
    # Eq. (16)-(17) with the population variance
    var = float(np.var(samples))
    u = 1 / (1 + math.exp(-var / beta))
    assert uncertainty.item() == pytest.approx(u, rel=1e-12)
    assert y.item() == pytest.approx(y_shared * u + float(np.mean(samples)) * (1 - u), rel=1e-12, abs=1e-14)


def test_balance_uses_population_variance():
    y, u = balance(torch.tensor(0.0, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0)
    assert u.item() == pytest.approx(1 / (1 + math.exp(-0.25)), rel=1e-14)   # unbiased would be 0.5
    assert y.item() == pytest.approx(0.5 * (1 - u.item()), rel=1e-14)


@PROPERTY
@given(y_shared=probability, sample=probability, beta=betas,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_balance_one_sample_weighs_exactly_half_half(y_shared, sample, beta, dtype):
    ys = torch.tensor([y_shared], dtype=dtype)
    y, uncertainty = balance(ys, torch.tensor([[sample]], dtype=dtype), beta)
    assert uncertainty.item() == 0.5
    assert torch.equal(y, ys * 0.5 + torch.tensor([sample], dtype=dtype) * 0.5)


@PROPERTY
@given(y_shared=probability, mean=probability, beta=betas, half=st.integers(1, 4),
       spreads=st.lists(st.floats(0, 0.5), min_size=2, max_size=8))
def test_balance_moves_monotonically_toward_shared_as_variance_grows(y_shared, mean, beta, half, spreads):
    pattern = torch.tensor([1.0, -1.0] * half, dtype=torch.float64)      # zero-mean, so the mean is fixed
    spreads = sorted(spreads)
    ys = torch.tensor(y_shared, dtype=torch.float64)
    results = [balance(ys, mean + t * pattern, beta) for t in spreads]
    distance = [abs(y.item() - y_shared) for y, _ in results]
    weight = [u.item() for _, u in results]
    for a, b in zip(distance, distance[1:]):
        assert b <= a + 1e-12
    for a, b in zip(weight, weight[1:]):
        assert b >= a
    # zero spread: exactly half/half; huge spread: all weight on the shared prediction
    y0, u0 = balance(ys, torch.full((2 * half,), mean, dtype=torch.float64), beta)
    assert u0.item() == 0.5
    y_far, u_far = balance(ys, mean + 1e3 * pattern, beta)
    assert u_far.item() == 1.0 and y_far.item() == pytest.approx(y_shared, abs=1e-12)


@PROPERTY
@given(samples=st.lists(probability, min_size=1, max_size=10), y_shared=probability, beta=betas,
       data=st.data())
def test_balance_is_invariant_to_sample_order(samples, y_shared, beta, data):
    order = data.draw(st.permutations(range(len(samples))))
    ys = torch.tensor(y_shared, dtype=torch.float64)
    s = torch.tensor(samples, dtype=torch.float64)
    y1, u1 = balance(ys, s, beta)
    y2, u2 = balance(ys, s[list(order)], beta)
    assert y1.item() == pytest.approx(y2.item(), rel=1e-12, abs=1e-15)
    assert u1.item() == pytest.approx(u2.item(), rel=1e-12, abs=1e-15)


def test_balance_batches_over_leading_dimensions():
    g = rng(3)
    ys = torch.rand(4, 5, generator=g)
    s = torch.rand(4, 5, 7, generator=g)
    y, u = balance(ys, s, 0.01)
    assert y.shape == (4, 5) and u.shape == (4, 5)
    y_one, u_one = balance(ys[2, 3], s[2, 3], 0.01)
    torch.testing.assert_close(y[2, 3], y_one)
    torch.testing.assert_close(u[2, 3], u_one)


# ================================================================================================
# The model: shapes, the SCM solve, ablation switches, gradients, training
# ================================================================================================

def tiny_config(**kw):
    return Config(**{"n_users": 7, "n_items": 11, "history_len": 5, **kw})


def tiny_batch(B=3, C=4, seed=0):
    g = rng(seed)
    user = torch.randint(0, 7, (B,), generator=g)
    history = torch.randint(1, 12, (B, 5), generator=g)
    history[0, :2] = 0          # left padding; every history keeps at least one real item
    history[1, :4] = 0
    items = torch.randint(1, 12, (B, C), generator=g)
    labels = torch.zeros(B, C)
    labels[:, 0] = 1
    return user, history, items, labels


def tiny_model(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = PlanRec(tiny_config(**kw)).to(dtype)
    if hasattr(model, "dependency_matrix"):        # A starts at zero; give it something to carry
        with torch.no_grad():
            model.dependency_matrix.copy_(torch.randn(model.dependency_matrix.shape, generator=rng(seed)) * 0.2)
    return model


class RecordingSCM:
    """An scm_fn that calls the eager personalized_scm and keeps what went in and came out."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, A, logits_A, logits_e, n_samples, k_A, k_e, tau=1.0, uniform_A=None, uniform_e=None):
        result = personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e)
        self.calls.append(dict(z=z, A=A, logits_A=logits_A, logits_e=logits_e, n_samples=n_samples,
                               k_A=k_A, k_e=k_e, tau=tau, result=result))
        return result


@pytest.mark.parametrize("name", list(planrec.PRESETS))
def test_ablation_runs_forward_and_backward_with_finite_loss(name):
    kw = planrec.PRESETS[name]
    model = tiny_model(**kw)
    cfg = model.cfg
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    loss, terms = model.loss(out, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in terms.values())
    # the terms present are exactly the parts switched on
    has_structure = cfg.structure != "none"
    expected = {"recommend", "reconstruct", "kl", "total"}
    if has_structure and cfg.dependency_reg:
        expected.add("struct")
    if has_structure and cfg.dag_reg:
        expected.add("dag")
    assert set(terms) == expected
    # Eq. (18): the total is the weighted sum of the returned terms
    weights = dict(recommend=cfg.w_recommend, reconstruct=cfg.w_reconstruct, kl=cfg.w_kl,
                   struct=cfg.w_struct, dag=cfg.w_dag)
    total = sum(weights[k] * v for k, v in terms.items() if k != "total")
    torch.testing.assert_close(terms["total"], total)
    torch.testing.assert_close(loss, terms["total"])
    loss.backward()
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), pname
    # the parts that must learn do get gradient
    must_learn = ["encoder.to_factors.weight", "predict_shared.0.weight", "decoder.0.weight", "item_emb.weight"]
    if has_structure:
        must_learn += ["dependency_matrix"]
    if cfg.structure == "personalized":
        must_learn += ["predict_personal.0.weight", "mask_mlp.0.weight", "user_emb.weight"]
    params = dict(model.named_parameters())
    for pname in must_learn:
        assert params[pname].grad is not None and params[pname].grad.abs().sum() > 0, pname


@pytest.mark.parametrize("structure", ["none", "shared", "personalized"])
def test_switching_structure_off_removes_its_computation(structure, monkeypatch):
    counts = {"scm": 0, "dag": 0}
    real_scm, real_dag = planrec.scm, planrec.dag_penalty

    def counting_scm(*a, **k):
        counts["scm"] += 1
        return real_scm(*a, **k)

    def counting_dag(*a, **k):
        counts["dag"] += 1
        return real_dag(*a, **k)

    monkeypatch.setattr(planrec, "scm", counting_scm)
    monkeypatch.setattr(planrec, "dag_penalty", counting_dag)
    torch.manual_seed(0)
    recorder = RecordingSCM()
    model = PlanRec(tiny_config(structure=structure), scm_fn=recorder)
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    _, terms = model.loss(out, labels)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    if structure == "none":
        assert not hasattr(model, "dependency_matrix") and "dependency_matrix" not in names
        assert counts["scm"] == 0 and counts["dag"] == 0
        assert not {"e", "e_hat", "uncertainty"} & set(out)
        assert not {"struct", "dag"} & set(terms)
    else:
        assert "dependency_matrix" in names
        assert counts["scm"] >= 1 and counts["dag"] == 1
        assert {"e", "e_hat"} <= set(out) and {"struct", "dag"} <= set(terms)
    if structure == "personalized":
        assert {"predict_personal", "mask_mlp"} <= names
        assert len(recorder.calls) == 1 and "uncertainty" in out
    else:
        assert not {"predict_personal", "mask_mlp"} & names
        assert recorder.calls == [] and "uncertainty" not in out


def test_switching_regularizers_off_removes_their_computation(monkeypatch):
    calls = []
    real_dag = planrec.dag_penalty
    monkeypatch.setattr(planrec, "dag_penalty", lambda *a, **k: calls.append(1) or real_dag(*a, **k))
    user, history, items, labels = tiny_batch()
    model = tiny_model(dag_reg=False, dependency_reg=False)
    _, terms = model.loss(model(user, history, items), labels)
    assert calls == [] and "dag" not in terms and "struct" not in terms


@pytest.mark.parametrize("structure", ["shared", "personalized"])
def test_reconstruction_reg_switch_decides_whether_reconstruction_sees_the_structure(structure):
    """RecR on: the decoder reads e-hat, so the reconstruction loss reaches A and g. Off: it reads z."""
    user, history, items, labels = tiny_batch()
    for on in (True, False):
        model = tiny_model(structure=structure, reconstruction_reg=on)
        out = model(user, history, items)
        _, terms = model.loss(out, labels)
        gA, gw = torch.autograd.grad(terms["reconstruct"], (model.dependency_matrix, model.g.w1), allow_unused=True)
        if on:
            assert gA is not None and gA.abs().sum() > 0 and gw is not None and gw.abs().sum() > 0
        else:
            assert gA is None or (gA == 0).all()
            assert gw is None or (gw == 0).all()


@pytest.mark.parametrize("structure", ["none", "shared", "personalized"])
@pytest.mark.parametrize("n_mask_samples", [1, 3])
def test_model_output_shapes(structure, n_mask_samples):
    B, C = 3, 4
    recorder = RecordingSCM()
    torch.manual_seed(0)
    cfg = tiny_config(structure=structure, n_mask_samples=n_mask_samples)
    model = PlanRec(cfg, scm_fn=recorder)
    N, d, D = cfg.n_factors, cfg.factor_dim, cfg.embed_dim
    user, history, items, labels = tiny_batch(B, C)
    out = model(user, history, items)
    assert out["y"].shape == (B, C)
    assert ((out["y"] > 0) & (out["y"] < 1)).all()             # probabilities (trained with BCE)
    assert out["mean"].shape == (B, C, N, d) and out["logvar"].shape == (B, C, N, d)
    # z, e, e-hat: one N x d block per candidate (the batch layout, [B, C] or [B*C], is the model's)
    per_candidate = lambda t: t.shape[-2:] == (N, d) and t.numel() == B * C * N * d
    assert per_candidate(out["z"])
    assert out["recon_target"].shape == (B, C, 2 * D)
    if structure != "none":
        assert per_candidate(out["e"]) and per_candidate(out["e_hat"])
        assert out["e"].shape == out["z"].shape == out["e_hat"].shape
    if structure == "personalized":
        assert out["uncertainty"].shape == (B, C)
        assert ((out["uncertainty"] >= 0.5) & (out["uncertainty"] <= 1)).all()
        if n_mask_samples == 1:
            assert (out["uncertainty"] == 0.5).all()                   # zero variance with one sample
        (call,) = recorder.calls
        e_star, mask_A, mask_e = call["result"]
        S = n_mask_samples
        rows = call["z"].shape[0]                        # B, or B*C if candidates get their own masks
        assert rows in (B, B * C) and call["z"].numel() == B * C * N * d
        assert e_star.shape == (rows, S) + call["z"].shape[1:]
        assert mask_A.shape == (rows, S, N, N) and mask_e.shape == (rows, S, N)
        assert call["k_A"] == cfg.k_A and call["k_e"] == cfg.k_e and call["n_samples"] == S
        assert ((mask_A > 0.5).sum((-1, -2)) == cfg.k_A).all()
        assert ((mask_e > 0.5).sum(-1) == cfg.k_e).all()
        assert (torch.diagonal(mask_A, dim1=-2, dim2=-1) == 0).all()
    _, terms = model.loss(out, labels)
    assert all(v.dim() == 0 for v in terms.values())


@pytest.mark.parametrize("structure", ["shared", "personalized"])
def test_model_scm_solves_match_float64_reference(structure):
    recorder = RecordingSCM()
    torch.manual_seed(0)
    model = PlanRec(tiny_config(structure=structure), scm_fn=recorder).double()
    with torch.no_grad():                       # diagonal included: the model must ignore it
        model.dependency_matrix.copy_(torch.randn(8, 8, generator=rng(1), dtype=torch.float64) * 0.2)
    user, history, items, _ = tiny_batch()
    out = model(user, history, items)
    A = model.dependency_matrix.detach().numpy().copy()
    np.fill_diagonal(A, 0.0)
    z = out["z"].detach().numpy()
    # Eq. (7): e = (I - A^T)^-1 z
    expected = np.einsum("ij,...jd->...id", np.linalg.inv(np.eye(8) - A.T), z)
    torch.testing.assert_close(out["e"].detach(), torch.from_numpy(expected), rtol=1e-10, atol=1e-12)
    if structure == "personalized":
        (call,) = recorder.calls
        assert not call["A"].requires_grad                            # A enters detached
        torch.testing.assert_close(call["A"], torch.from_numpy(A), rtol=0, atol=0)
        # the personalized solve reads the same exogenous factors z (possibly regrouped)
        torch.testing.assert_close(call["z"].sum(), out["z"].sum(), rtol=1e-12, atol=1e-12)
        e_star, mask_A, mask_e = call["result"]
        expected = reference_e_star(call["z"], torch.from_numpy(A), mask_A, mask_e)
        torch.testing.assert_close(e_star.detach(), expected, rtol=1e-10, atol=1e-12)


def test_no_gradient_reaches_A_through_the_personalized_branch():
    model = tiny_model(structure="personalized", n_mask_samples=4)
    captured = {}
    hook = model.predict_personal.register_forward_hook(lambda m, i, o: captured.setdefault("y_star", o))
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    hook.remove()
    y_star = captured["y_star"]                              # MLP_R*(e-hat*): everything personalized
    A = model.dependency_matrix
    for personal in (y_star.sum(), out["uncertainty"].sum()):
        (g,) = torch.autograd.grad(personal, A, retain_graph=True, allow_unused=True)
        assert g is None or (g == 0).all()
    # the check is not vacuous: the personalized output does carry gradient to its own inputs,
    # and the final prediction does reach A (through the shared branch)
    g_mask, g_enc = torch.autograd.grad(y_star.sum(), (model.mask_mlp[0].weight, model.encoder.to_factors.weight),
                                        retain_graph=True)
    assert g_mask.abs().sum() > 0 and g_enc.abs().sum() > 0
    (g_y,) = torch.autograd.grad(out["y"].sum(), A, retain_graph=True)
    assert g_y.abs().sum() > 0
    # and quantitatively: dY/dA = sigma(Y*_sigma / beta) * dY^c/dA, the shared branch alone (Eq. 17)
    torch.manual_seed(5)
    shared = {}
    hook = model.predict_shared.register_forward_hook(lambda m, i, o: shared.setdefault("logit", o))
    out = model(user, history, items)
    hook.remove()
    y_c = torch.sigmoid(shared["logit"]).reshape(out["y"].shape)
    (g_y,) = torch.autograd.grad(out["y"].sum(), A, retain_graph=True)
    (g_ref,) = torch.autograd.grad((y_c * out["uncertainty"].detach()).sum(), A)
    torch.testing.assert_close(g_y, g_ref, rtol=1e-5, atol=1e-8)


def test_model_personalized_branch_factor_masked_everywhere_gets_no_gradient():
    """In the model: if MLP_mask makes factor j's logit hopeless, z_j gets no gradient via e*."""
    model = tiny_model(structure="personalized", n_mask_samples=3)
    j = 5
    N = model.cfg.n_factors
    with torch.no_grad():                                    # last layer of MLP_mask: bias -1e9 on factor j
        model.mask_mlp[2].bias[N * N + j] = -1e9
    captured = {}
    hook = model.predict_personal.register_forward_hook(lambda m, i, o: captured.setdefault("y_star", o))
    recorder = RecordingSCM()
    model.scm_fn = recorder
    user, history, items, _ = tiny_batch()
    out = model(user, history, items)
    hook.remove()
    (call,) = recorder.calls
    _, _, mask_e = call["result"]
    assert (mask_e[..., j] == 0).all()
    (gz,) = torch.autograd.grad(captured["y_star"].sum(), out["z"])
    assert (gz[..., j, :] == 0).all()
    kept = [i for i in range(N) if i != j]
    assert (gz[..., kept, :].abs().sum((-1, -2)) > 0).all()


@pytest.mark.parametrize("prior_scale", [1.0, 2.0])
def test_loss_terms_match_their_equations(prior_scale):
    """BCE of Eq. (1), the Gaussian KL of Eq. (6) and L_struct of Eq. (9), each against a hand
    formula. The KL and L_struct may be summed or averaged over the N*d latent coordinates (the
    model's choice); either way one consistent factor must relate them to the per-coordinate mean."""
    model = tiny_model(dtype=torch.float64, prior_scale=prior_scale)
    N, d = model.cfg.n_factors, model.cfg.factor_dim
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    _, terms = model.loss(out, labels)
    y = out["y"].detach()
    bce = -(labels * torch.log(y) + (1 - labels) * torch.log(1 - y)).mean()
    torch.testing.assert_close(terms["recommend"].detach(), bce, rtol=1e-10, atol=1e-12)

    b0 = prior_scale
    # posterior = prior: zero KL
    prior = dict(out, mean=torch.zeros_like(out["mean"]), logvar=torch.full_like(out["logvar"], 2 * math.log(b0)))
    assert model.loss(prior, labels)[1]["kl"].item() == pytest.approx(0.0, abs=1e-12)
    # a uniform shift m: KL per coordinate is m^2 / (2 b0^2); this fixes the reduction factor
    m = 0.7
    shifted = dict(prior, mean=torch.full_like(out["mean"], m))
    factor = model.loss(shifted, labels)[1]["kl"].item() / (m**2 / (2 * b0**2))
    assert factor == pytest.approx(1.0, rel=1e-9) or factor == pytest.approx(N * d, rel=1e-9)
    # random posteriors against torch.distributions
    g = rng(4)
    mean = torch.randn(out["mean"].shape, generator=g, dtype=torch.float64)
    logvar = torch.randn(out["logvar"].shape, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.full_like(mean, b0))
    kl = torch.distributions.kl_divergence(q, p).mean()
    got = model.loss(dict(out, mean=mean, logvar=logvar), labels)[1]["kl"]
    torch.testing.assert_close(got.detach(), factor * kl, rtol=1e-9, atol=1e-12)
    # L_struct: the same reduction of (e-hat - e)^2
    struct = (out["e_hat"] - out["e"]).detach().pow(2).mean()
    ratio = terms["struct"].item() / struct.item()
    assert ratio == pytest.approx(factor, rel=1e-9)


@pytest.mark.parametrize("kw", [dict(structure="full"), dict(structure=""), dict(structure="PERSONALIZED"),
                                dict(k_A=0), dict(k_A=-3), dict(k_A=57), dict(n_factors=4, k_A=13, k_e=2),
                                dict(k_e=0), dict(k_e=9), dict(n_factors=4, k_A=6, k_e=5)])
def test_config_rejects_invalid_values(kw):
    with pytest.raises(ValueError):
        Config(**kw)


@pytest.mark.parametrize("kw", [dict(k_A=1, k_e=1), dict(k_A=56, k_e=8), dict(n_factors=4, n_user_factors=2, k_A=12, k_e=4),
                                dict(structure="none"), dict(structure="shared")])
def test_config_accepts_boundary_values(kw):
    cfg = Config(**kw)
    assert cfg.to_dict()["k_A"] == cfg.k_A


def toy_problem():
    """7 users, each with a fixed history; the positive item is a fixed function of the user."""
    users = torch.arange(7)
    history = torch.randint(1, 12, (7, 5), generator=rng(1))
    positive = users + 1
    negatives = torch.stack([(positive + 3 + k) % 11 + 1 for k in range(3)], 1)
    items = torch.cat([positive[:, None], negatives], 1)
    labels = torch.zeros(7, 4)
    labels[:, 0] = 1
    return users, history, items, labels


def train_toy(steps, lr, seed=0, **kw):
    torch.manual_seed(seed)
    model = PlanRec(tiny_config(**kw))
    users, history, items, labels = toy_problem()

    def evaluate():
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            _, terms = model.loss(model(users, history, items), labels)
        model.train()
        return terms

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = model.loss(model(users, history, items), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, evaluate()


@pytest.mark.parametrize("structure", ["none", "shared", "personalized"])
def test_loss_falls_on_a_toy_problem(structure):
    before, after = train_toy(50, 1e-2, structure=structure)
    assert after["total"] < 0.6 * before["total"]
    assert after["recommend"] < before["recommend"] - 0.05


CONSTANT_BCE = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))   # H(1/4) = 0.562


def test_vae_base_beats_the_constant_predictor_on_a_toy_problem():
    # 1 positive in 4: the best input-independent prediction has BCE H(1/4). Beating it clearly
    # needs the prediction to depend on (history, item) through z.
    _, after = train_toy(60, 2e-2, structure="none")
    assert after["recommend"] < CONSTANT_BCE - 0.2


SHARED_TOY = dict(structure="shared", w_kl=0.0, reconstruction_reg=False, dag_reg=False, dependency_reg=False)


def shared_toy_losses(seeds):
    return [float(train_toy(100, 2e-2, seed=seed, **SHARED_TOY)[1]["recommend"]) for seed in seeds]


def test_shared_structure_path_can_carry_the_signal_on_a_toy_problem():
    """The same through e-hat = g(A_i * e), with the regularizers and the KL off. A starts small
    (0.1 randn), so at first the prediction nearly ignores its input: a saddle that one float
    trajectory may or may not leave in 100 steps (seed 0 stays there on one thread on an AMD EPYC
    and leaves it on two). So: 5 initializations, and a majority of them must beat the constant
    predictor by 0.1 (measured: 5 or 6 of 6 do, ending near 0, with 1 and 2 threads). A broken
    path fails every seed (the next test)."""
    losses = shared_toy_losses(range(5))
    assert sum(loss < CONSTANT_BCE - 0.1 for loss in losses) >= 3, losses


def test_shared_toy_fails_when_the_structure_carries_nothing(monkeypatch):
    """The control of the test above: with A forced to zero every e-hat_i = g(0) is a constant, so
    the prediction cannot depend on the input and no seed may beat the constant predictor."""
    monkeypatch.setattr(PlanRec, "shared_A", lambda self: torch.zeros_like(self.dependency_matrix))
    losses = shared_toy_losses(range(2))
    assert all(loss > CONSTANT_BCE - 0.02 for loss in losses), losses


# ================================================================================================
# The paper's model by default, attribute prior, blocked dependencies (issue 8); g of Eq. (8)
# and its CPU kernel are tested in tests/test_factor_mlps.py
# ================================================================================================

def test_default_model_is_the_papers_architecture():
    cfg = Config()
    assert cfg.predict_from == "e_hat"                         # Eq. (15): heads read e-hat only
    model = PlanRec(tiny_config())
    N, d = model.cfg.n_factors, model.cfg.factor_dim
    assert model.predict_shared[0].in_features == N * d and model.predict_personal[0].in_features == N * d
    # and the shared prediction depends on A: with A = 0 every e-hat_i is g of zeros, a constant
    with torch.no_grad():
        model.dependency_matrix.zero_()
    user, history, items, _ = tiny_batch()
    model.eval()
    y_shared = model(user, history, items)["y_shared"]
    assert torch.allclose(y_shared, y_shared[0, 0].expand_as(y_shared))


def test_paper_settings_are_section_3_1():
    cfg = Config(**planrec.PAPER_SETTINGS)
    assert (cfg.embed_dim, cfg.encoder, cfg.mask_input, cfg.predict_from) == (8, "paper", "id", "e_hat")
    assert cfg.w_recommend == cfg.w_reconstruct == cfg.w_kl == cfg.w_struct == cfg.w_dag == 1.0
    assert (cfg.tau, cfg.beta, cfg.history_len, cfg.n_layers) == (1.0, 0.002, 50, 2)


def test_eq9_gradient_reaches_z_through_e():
    """Eq. (9) is ||e-hat - e||^2 with e not detached: z gets the gradient of both terms."""
    model = tiny_model(dtype=torch.float64, structure="shared")
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    _, terms = model.loss(out, labels)
    (grad_z,) = torch.autograd.grad(terms["struct"], out["z"])
    # the same loss by hand from z, with e live and with e detached: only the live one matches
    A = model.shared_A()
    z = out["z"].detach().requires_grad_()
    e = planrec.scm(z, A)
    live = (model.g(A, e) - e).pow(2).mean()
    detached = (model.g(A, e) - e.detach()).pow(2).mean()
    (grad_live,) = torch.autograd.grad(live, z, retain_graph=True)
    (grad_detached,) = torch.autograd.grad(detached, z)
    torch.testing.assert_close(grad_z, grad_live, rtol=1e-10, atol=1e-14)
    assert (grad_live - grad_detached).abs().max() > 1e-3 * grad_live.abs().max()


@pytest.mark.parametrize("drop", ["u2i,i2u", "u2u,i2i", "i2u", "u2u,u2i,i2u"])
def test_blocked_dependencies_stay_zero_and_are_never_masked(drop):
    torch.manual_seed(0)
    cfg = tiny_config(drop_dependencies=drop, n_mask_samples=4)
    model = PlanRec(cfg)
    support = planrec.dependency_support(cfg)
    blocked = ~support
    assert model.k_A == min(cfg.k_A, int(support.sum()))
    users, history, items, labels = toy_problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):
        out = model(users, history, items)
        assert (out["mask_A"][:, :, blocked] == 0).all()
        assert ((out["mask_A"] > 0.5).sum((-1, -2)) == model.k_A).all()
        loss, _ = model.loss(out, labels)
        opt.zero_grad()
        loss.backward()
        assert (model.dependency_matrix.grad[blocked] == 0).all()
        opt.step()
    assert (model.dependency_matrix.detach()[blocked] == 0).all()
    assert (model.shared_A().detach()[blocked] == 0).all()
    assert (model.dependency_matrix.detach()[support] != 0).all()


def test_dependency_blocks_are_the_right_quadrants():
    cfg = Config(n_factors=5, n_user_factors=2, k_A=3, k_e=2, drop_dependencies="u2i")
    support = planrec.dependency_support(cfg)
    # A[i, j] = effect of i on j: rows 0-1 are user parents, columns 2-4 item children
    assert not support[:2, 2:].any() and support[2:, :2].all()
    assert not support.diagonal().any()
    with pytest.raises(ValueError, match="unknown block"):
        Config(drop_dependencies="u2x")
    with pytest.raises(ValueError, match="leaves no dependency"):
        Config(drop_dependencies="u2u,u2i,i2u,i2i")


TIED = ("user.gender:class:2", "user.age:regression:1", "item.genres:multilabel:3", "item.year:regression:1")


def test_factor_names_and_tied_indices():
    cfg = tiny_config(tied_attributes=TIED)
    assert planrec.tied_factor_index(cfg) == [0, 1, 4, 5]
    assert planrec.factor_names(cfg) == ["user.gender", "user.age", "user_2", "user_3",
                                         "item.genres", "item.year", "item_6", "item_7"]
    with pytest.raises(ValueError, match="user-side"):
        tiny_config(n_user_factors=1, tied_attributes=TIED)
    with pytest.raises(ValueError, match="side.name:kind:size"):
        tiny_config(tied_attributes=("gender",))


def attribute_targets(B, C, seed=0):
    g = rng(seed)
    return {"user.gender": torch.randint(0, 2, (B,), generator=g), "user.age": torch.randn(B, generator=g),
            "item.genres": (torch.rand(B, C, 3, generator=g) > 0.5).float(), "item.year": torch.randn(B, C, generator=g)}


def test_each_tied_predictor_gets_gradient_only_from_its_own_factor():
    model = tiny_model(tied_attributes=TIED)
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    targets = attribute_targets(*items.shape)
    for spec, factor in zip(TIED, model.attributes.factor_index):
        key = spec.split(":")[0]
        (grad_z,) = torch.autograd.grad(out["attribute_predictions"][key].pow(2).sum(), out["z"], retain_graph=True)
        others = [i for i in range(model.cfg.n_factors) if i != factor]
        assert grad_z[..., factor, :].abs().sum() > 0
        assert (grad_z[..., others, :] == 0).all()
    # in the model's loss the attribute term is weighted into the total, and is required
    total, terms = model.loss(out, labels, attribute_targets=targets)
    assert torch.isfinite(terms["attribute"])
    torch.testing.assert_close(total, terms["total"])
    without = sum(w * terms[k] for k, w in (("recommend", 1.0), ("reconstruct", 0.1), ("kl", 0.1),
                                              ("struct", 0.1), ("dag", 0.1)))
    torch.testing.assert_close(total, without + model.cfg.w_attribute * terms["attribute"])
    with pytest.raises(ValueError, match="attribute_targets"):
        model.loss(out, labels)


def test_paper_encoder_attends_both_ways_and_ours_keeps_the_history_blind():
    D = 8
    layer = planrec.SelfAttentionLayer(D, 1, 16).double()
    ours = planrec.TargetAttentionLayer(D, 1, 16, history_len=4).double()
    missing, unexpected = ours.load_state_dict(layer.state_dict(), strict=False)
    assert missing == ["offset_bias"] and not unexpected        # ours adds only the offset bias (zero)
    history = torch.randn(2, 4, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 1, D, dtype=torch.float64, requires_grad=True)
    out = layer(torch.cat([history, target], 1), planrec.padding_bias(torch.ones(2, 5, dtype=torch.bool), torch.float64))
    # the target token attends to the history, and the history tokens attend to the target
    (g_t_from_h,) = torch.autograd.grad(out[:, -1].sum(), history, retain_graph=True)
    (g_h_from_t,) = torch.autograd.grad(out[:, :-1].sum(), target)
    assert g_t_from_h.abs().sum() > 0 and g_h_from_t.abs().sum() > 0
    ids = torch.ones(2, 4, dtype=torch.long)                 # two sequences of 4 real items, one block each
    windows = planrec.band_windows(ids, None, 4)
    band = planrec.band_bias(windows, torch.float64)
    # each row at the last slot of its block (M = 1 slot per block): its window is the whole block
    window_bias = planrec.mask_bias(windows[:, -1:], torch.float64)[:, None]
    h, t = ours(history, target, band, window_bias, torch.arange(2))
    (g_h_from_t,) = torch.autograd.grad(h.sum(), target, allow_unused=True)
    assert g_h_from_t is None or (g_h_from_t == 0).all()
    # the target token computes the same thing in both (it sees everything in both)
    torch.testing.assert_close(t[:, 0], out[:, -1])
    # and ours is causal: a history token never sees the tokens after it
    (g_first_from_later,) = torch.autograd.grad(h[:, 0].sum(), history)
    assert (g_first_from_later[:, 1:] == 0).all() and g_first_from_later[:, 0].abs().sum() > 0


@pytest.mark.parametrize("encoder", ["paper", "target_attention"])
@pytest.mark.parametrize("mask_input", ["id", "id+history"])
def test_encoders_and_mask_inputs_run(encoder, mask_input):
    model = tiny_model(encoder=encoder, mask_input=mask_input)
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    loss, _ = model.loss(out, labels)
    loss.backward()
    assert torch.isfinite(loss)
    # u of Eq. (11) is the ID embedding alone with mask_input="id": the history cannot move the masks
    logits_1 = model.mask_logits(user, out["summary"])[1]
    logits_2 = model.mask_logits(user, out["summary"] + 1.0)[1]
    assert torch.equal(logits_1, logits_2) == (mask_input == "id")


def test_balance_never_gives_the_personalized_prediction_more_than_half():
    y_samples = torch.rand(50, 7, 8, dtype=torch.float64)
    _, uncertainty = balance(torch.rand(50, 7, dtype=torch.float64), y_samples, 0.002)
    assert (uncertainty >= 0.5).all()


def test_is_acyclic():
    assert planrec.is_acyclic(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert not planrec.is_acyclic(torch.tensor([[0.0, 1.0], [0.5, 0.0]]))
    assert planrec.is_acyclic(torch.tensor([[0.0, 1.0], [0.01, 0.0]]))     # below the threshold


def test_personal_struct_option_is_eq9_on_the_personalized_structures():
    """Config.w_personal_struct (ours, off by default): ||e-hat*^k - e*^k||^2 averaged over the N_m
    structures, and the mask network learns from it."""
    assert Config().w_personal_struct == 0
    user, history, items, labels = tiny_batch()
    base = tiny_model(dtype=torch.float64)
    _, terms = base.loss(base(user, history, items), labels)
    assert "struct_personal" not in terms
    model = tiny_model(dtype=torch.float64, w_personal_struct=0.5)
    out = model(user, history, items)
    total, terms = model.loss(out, labels)
    expected = (out["e_hat_star"] - out["e_star"]).pow(2).mean()
    torch.testing.assert_close(terms["struct_personal"], expected)
    others = sum(w * terms[k] for k, w in (("recommend", 1.0), ("reconstruct", 0.1), ("kl", 0.1),
                                            ("struct", 0.1), ("dag", 0.1)))
    torch.testing.assert_close(total, others + 0.5 * expected)
    grads = torch.autograd.grad(terms["struct_personal"], list(model.mask_mlp.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # A stays fixed in the personalized structures (Eq. (13)-(14)): no gradient reaches it from here
    (grad_A,) = torch.autograd.grad(terms["struct_personal"], [model.dependency_matrix], allow_unused=True)
    assert grad_A is None or not grad_A.abs().sum()


def test_padding_bias_is_the_boolean_mask():
    keep = torch.tensor([[False, True, True], [True, True, True]])
    q, k, v = (torch.randn(2, 1, 3, 4, generator=rng(i), dtype=torch.float64) for i in range(3))
    bias = planrec.padding_bias(keep, torch.float64)
    assert bias.shape == (2, 1, 1, 3) and bias[0, 0, 0, 0] == float("-inf") and (bias[1] == 0).all()
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]),
                               rtol=0, atol=0)


# ================================================================================================
# Our encoder on user sequences (issue 18): each history encoded once per sequence
# ================================================================================================

def test_context_length_is_the_receptive_field():
    assert planrec.context_length(Config()) == 50 + 2 * 49
    assert planrec.context_length(Config(encoder="paper")) == 50
    assert planrec.context_length(tiny_config(n_layers=3)) == 5 + 3 * 4
    assert PlanRec(tiny_config()).context_len == 5 + 2 * 4


def sequence_model(seed=0, **kw):
    """A float64 model with random relative-position biases (they start at zero)."""
    model = tiny_model(seed, torch.float64, **kw)
    if model.cfg.encoder != "paper":
        with torch.no_grad():
            for layer in model.encoder.layers:
                layer.offset_bias.copy_(torch.randn(layer.offset_bias.shape, generator=rng(seed + 1), dtype=torch.float64))
    return model


@st.composite
def chunkings(draw):
    """A user sequence, cut into chunks (each with the items before it that its encoding reaches),
    laid end to end in a shuffled order after another user's items."""
    L, n_layers = draw(st.integers(2, 5)), draw(st.integers(1, 3))
    n = draw(st.integers(1, 30))
    items = draw(st.lists(st.integers(1, 11), min_size=n, max_size=n))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4)))) if n > 1 else []
    bounds = list(zip([0] + cuts, cuts + [n]))
    order = draw(st.permutations(range(len(bounds))))
    other = draw(st.lists(st.integers(1, 11), max_size=2 * L))
    return L, n_layers, items, [bounds[i] for i in order], other


@PROPERTY
@given(case=chunkings(), n_heads=st.sampled_from([1, 2]))
def test_a_history_tokens_encoding_is_the_same_in_every_chunk_it_falls_in(case, n_heads):
    L, n_layers, items, chunks, other = case
    model = sequence_model(history_len=L, n_layers=n_layers, n_heads=n_heads)
    reach = n_layers * (L - 1)                 # how far back a token's encoding reads
    whole = model.encode_history(torch.tensor([items]))[0]
    # (1) the chunks end to end in one row, after another user's items, told apart by segment
    row, segment, where = list(other), [0] * len(other), []
    for k, (a, b) in enumerate(chunks):
        start = max(0, a - reach)
        where.append((a, b, len(row) + a - start))
        row += items[start:b]
        segment += [k + 1] * (b - start)
    packed = model.encode_history(torch.tensor([row]), torch.tensor([segment]))[0]
    for a, b, at in where:
        torch.testing.assert_close(packed[at:at + b - a], whole[a:b], rtol=1e-10, atol=1e-12)
    # (2) one chunk per row, left-padded (no segments): the same encodings again
    width = max(b - max(0, a - reach) for a, b in chunks)
    rows = torch.zeros(len(chunks), width, dtype=torch.long)
    for k, (a, b) in enumerate(chunks):
        rows[k, width - (b - max(0, a - reach)):] = torch.tensor(items[max(0, a - reach):b])
    padded = model.encode_history(rows)
    for k, (a, b) in enumerate(chunks):
        torch.testing.assert_close(padded[k, width - (b - a):], whole[a:b], rtol=1e-10, atol=1e-12)


def hand_sequence_batch(sequences, chunks, context, width=None):
    """A sequence batch as data.RecData.train_sequences makes it, from hand-made `sequences` and
    `chunks` (user, first target, last target; targets t >= 1), and the same rows one by one:
    (user, history, items, seq, end, segment), (user, row histories [B, width or context])."""
    width = width or context
    g = rng(7)
    row, segment, ends, users, rows = [], [], [], [], []
    for k, (u, a, b) in enumerate(chunks):
        s = sequences[u]
        start = max(0, a - context)
        for t in range(a, b + 1):
            ends.append(len(row) + t - start)
            users.append(u)
            h = s[max(0, t - width):t]
            rows.append([0] * (width - len(h)) + h)
        row += s[start:b]
        segment += [k] * (b - start)
    B = len(ends)
    user = torch.tensor(users)
    items = torch.randint(1, 12, (B, 3), generator=g)
    batch = dict(user=user, history=torch.tensor([row]), items=items, seq=torch.zeros(B, dtype=torch.long),
                 end=torch.tensor(ends), segment=torch.tensor([segment]))
    return batch, dict(user=user, history=torch.tensor(rows), items=items)


SEQUENCES = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2], [11, 10], [6, 6, 6, 1, 2]]
# user 0 in three chunks (the later ones start `context` items early), the rest whole, shuffled
CHUNKS = [(1, 1, 8), (0, 9, 12), (2, 1, 1), (0, 1, 4), (3, 1, 4), (0, 5, 8), (0, 13, 15)]


@pytest.mark.parametrize("kw", [dict(), dict(structure="none"), dict(mask_input="id", n_layers=3),
                                dict(n_heads=2), dict(encoder="paper")])
@pytest.mark.parametrize("extra_context", [0, 3])
def test_sequence_batched_forward_equals_the_row_by_row_forward(kw, extra_context):
    """The same rows, once as a sequence batch (each sequence encoded once) and once row by row
    with context_length items of history: every output, the loss and every gradient agree
    (float64; the same noise, drawn from the same seed in the same shapes)."""
    model = sequence_model(**kw).train()
    context = model.context_len
    batch, rows = hand_sequence_batch(SEQUENCES, CHUNKS, context, context + extra_context)
    labels = torch.zeros(rows["items"].shape, dtype=torch.float64)
    labels[:, 0] = 1
    results = []
    for inputs in (batch, rows):
        torch.manual_seed(3)
        out = model(**inputs)
        loss, terms = model.loss(out, labels)
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        results.append((out, terms, grads))
    (out_b, terms_b, grads_b), (out_r, terms_r, grads_r) = results
    for key in ("mean", "logvar", "z", "summary", "recon_target", "y", "y_shared", "uncertainty", "e_hat"):
        if key in out_r:
            torch.testing.assert_close(out_b[key], out_r[key], rtol=1e-10, atol=1e-12, msg=key)
    for key in terms_r:
        torch.testing.assert_close(terms_b[key], terms_r[key], rtol=1e-10, atol=1e-12, msg=key)
    for (name, _), gb, gr in zip(model.named_parameters(), grads_b, grads_r):
        assert (gb is None) == (gr is None), name
        if gr is not None:
            torch.testing.assert_close(gb, gr, rtol=1e-9, atol=1e-12, msg=name)
    if model.cfg.encoder != "paper":
        # the relative-position biases are learned: they get gradient
        grad_of = dict(zip([id(p) for p in model.parameters()], grads_b))
        assert all(grad_of[id(layer.offset_bias)].abs().sum() > 0 for layer in model.encoder.layers)


def test_a_shorter_history_changes_only_what_reads_past_it():
    """A row-wise call with only history_len items of history (less than context_length) runs, and
    its target still reads its whole window; it differs from the full-context result only because
    the oldest window items' own encodings saw less."""
    model = sequence_model().eval()
    batch, rows = hand_sequence_batch(SEQUENCES, CHUNKS, model.context_len)
    short = dict(rows, history=rows["history"][:, -model.cfg.history_len:])
    torch.manual_seed(0)
    full = model(**rows)["mean"]
    torch.manual_seed(0)
    cut = model(**short)["mean"]
    lengths = (rows["history"] != 0).sum(1)
    same = lengths <= model.cfg.history_len      # nothing was cut off: identical
    torch.testing.assert_close(cut[same], full[same], rtol=1e-10, atol=1e-12)
    assert (cut[~same] - full[~same]).abs().amax((1, 2, 3)).min() > 0



# ------------------------------------------------------------------------------------------------
# Our option: independent keep/drop gates for the masks (Config.mask_form = "gates", w_keep)
# ------------------------------------------------------------------------------------------------

def test_gumbel_gates_keep_each_entry_with_probability_sigmoid_of_its_logit():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0, float("-inf")], dtype=torch.float64)
    draws = planrec.gumbel_gates(logits.expand(200_000, -1).clone())
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and draws[:, -1].sum() == 0     # -inf: never kept
    # 200,000 draws: the share kept is sigmoid(logit) to within 5 standard errors
    torch.testing.assert_close(draws[:, :-1].mean(0), torch.sigmoid(logits[:-1]), atol=5 * 0.5 / 200_000 ** 0.5, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_gumbel_gates_straight_through_gradient_is_the_sigmoids(tau):
    logits = torch.randn(7, 5, generator=rng(0), dtype=torch.float64, requires_grad=True)
    uniform = uniform_like((7, 5), seed=1)
    mask = planrec.gumbel_gates(logits, tau, uniform)
    perturbed = logits.detach() + torch.log(uniform) - torch.log1p(-uniform)
    assert torch.equal(mask.detach(), (perturbed > 0).double())
    upstream = torch.randn(7, 5, generator=rng(2), dtype=torch.float64)
    (grad,) = torch.autograd.grad(mask, logits, upstream)
    soft = torch.sigmoid(perturbed / tau)
    torch.testing.assert_close(grad, upstream * soft * (1 - soft) / tau)        # each entry its own gradient


def test_gates_model_trains_its_masks_with_a_keep_prior_and_no_top_k():
    model = tiny_model(mask_form="gates", w_keep=0.5)
    user, history, items, labels = tiny_batch()
    out = model(user, history, items)
    kept = out["mask_A"].detach().sum((-1, -2))
    assert len(kept.unique()) > 1                 # no fixed K_A: samples keep different numbers of entries
    assert (torch.diagonal(out["mask_A"], dim1=-2, dim2=-1) == 0).all()
    loss, terms = model.loss(out, labels)
    allowed = model.support.bool()
    prior = torch.cat([F.softplus(-out["mask_logits_A"][:, allowed]), F.softplus(-out["mask_logits_e"])], 1).mean()
    torch.testing.assert_close(terms["keep"], prior)
    torch.testing.assert_close(terms["total"], sum(w * terms[k] for k, w in (
        ("recommend", 1.0), ("reconstruct", 0.1), ("kl", 0.1), ("struct", 0.1), ("dag", 0.1), ("keep", 0.5))))
    loss.backward()
    assert model.mask_mlp[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert set(model(user, history, items)["mask_A"].unique().tolist()) <= {0.0, 1.0}


def test_gates_are_off_by_default_and_topk_models_never_reach_them(monkeypatch):
    assert planrec.Config().mask_form == "topk" and planrec.Config().w_keep == 0.0
    monkeypatch.setattr(planrec, "sample_gates", lambda *a, **k: pytest.fail("gates sampled for a top-K model"))
    model = tiny_model()
    out = model(*tiny_batch()[:3])
    assert "keep" not in model.loss(out, tiny_batch()[3])[1]
    with pytest.raises(ValueError, match="mask_form"):
        planrec.Config(mask_form="bernoulli")
    with pytest.raises(ValueError, match="w_keep is the keep prior"):
        planrec.Config(w_keep=0.1)
