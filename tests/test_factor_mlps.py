"""Tests of g_vartheta, Eq. (8) and (14): the spec planrec.factor_mlps and the CPU-tuned
kernels.factor_mlps, which must compute the same function, forward and every gradient.

All in float64, where the two differ only by rounding (the kernel sums the same products in
another grouping), so they are compared at 1e-12 forward and 1e-10 for the gradients: a real
bug (a missing term, a transposed coefficient, a lost chunk) is O(1) relative.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
import planrec

kernel_module = importlib.import_module("kernels.factor_mlps")   # kernels.factor_mlps is the function
PROPERTY = settings(max_examples=40, deadline=None)
NAMES = ("coefficient", "e", "w1", "b1", "w2", "b2")


@pytest.fixture(autouse=True, scope="module")
def one_thread(few_threads):
    """Every tensor here is tiny: one thread (conftest.py: PLANREC_TEST_THREADS overrides it)."""


def rng(seed):
    return torch.Generator().manual_seed(seed)


def inputs(coef_batch, e_batch, N, d, H, seed, requires_grad=NAMES):
    """coefficient [*coef_batch, N, N], e [*e_batch, N, d] and the weights of N MLPs with hidden
    width H, all random (biases too, so that a lost bias shows), float64."""
    g = rng(seed)
    shapes = {"coefficient": (*coef_batch, N, N), "e": (*e_batch, N, d),
              "w1": (N, N * d, H), "b1": (N, 1, H), "w2": (N, H, d), "b2": (N, 1, d)}
    return [torch.randn(shapes[name], generator=g, dtype=torch.float64).requires_grad_(name in requires_grad)
            for name in NAMES]


def value_and_grads(fn, args, upstream_seed):
    out = fn(*args)
    needed = [a for a in args if a.requires_grad]
    upstream = torch.randn(out.shape, generator=rng(upstream_seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, needed, upstream) if needed else ()


def assert_kernel_equals_spec(args, seed):
    spec_out, spec_grads = value_and_grads(planrec.factor_mlps, args, seed)
    kernel_out, kernel_grads = value_and_grads(kernels.factor_mlps, args, seed)
    assert kernel_out.shape == spec_out.shape
    torch.testing.assert_close(kernel_out, spec_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip([n for n, x in zip(NAMES, args) if x.requires_grad], kernel_grads, spec_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")


@st.composite
def broadcast_batches(draw):
    """Two batch shapes that broadcast together: a common shape of 0-3 dims, from which each side
    drops leading dims and sets others to 1 (as A [N, N] against e [B, C, N, d], or the masked
    coefficient [B, S, 1, N, N] against e* [B, S, C, N, d])."""
    common = draw(st.lists(st.integers(1, 4), max_size=3))

    def side():
        kept = common[draw(st.integers(0, len(common))):]
        return tuple(1 if draw(st.booleans()) else n for n in kept)

    return side(), side()


@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), batches=broadcast_batches(), N=st.integers(1, 5), d=st.integers(1, 5),
       H=st.integers(1, 4), chunk_rows=st.sampled_from([1, 2, 3, 5, 1024]),
       requires_grad=st.sets(st.sampled_from(NAMES), min_size=1).map(tuple) | st.just(NAMES))
def test_kernel_equals_spec(seed, batches, N, d, H, chunk_rows, requires_grad):
    """Forward and the gradient of every input that asks for one (any subset: the personalized
    branch's coefficient, for one, carries no gradient into A), over broadcast batch shapes and
    chunk sizes that split the rows into several chunks and a remainder, or one chunk."""
    args = inputs(*batches, N, d, H, seed, requires_grad)
    saved = kernel_module.G_CHUNK_ROWS
    kernel_module.G_CHUNK_ROWS = chunk_rows      # not monkeypatch: hypothesis reruns the body
    try:
        assert_kernel_equals_spec(args, seed + 1)
    finally:
        kernel_module.G_CHUNK_ROWS = saved


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 13, 14])
def test_kernel_in_chunks_equals_spec(chunk_rows, monkeypatch):
    """M = 14 rows: chunks of 1, 2 (even split), 5 (a remainder of 4), 13 (a remainder of 1), 14 (one)."""
    monkeypatch.setattr(kernel_module, "G_CHUNK_ROWS", chunk_rows)
    assert_kernel_equals_spec(inputs((7, 1), (7, 2), 4, 3, 5, seed=3), seed=4)


def test_spec_is_eq8_factor_by_factor():
    """e-hat_i = g_i(A_i * e): factor i's MLP reads every factor j scaled by coefficient[j, i]
    (the effect of j on i), written here one factor at a time."""
    coefficient, e, w1, b1, w2, b2 = inputs((2, 1), (2, 3), 4, 3, 5, seed=0)
    expected = []
    for i in range(4):
        x = (coefficient[..., :, i, None] * e).flatten(-2)                # A_i * e, [2, 3, N*d]
        hidden = torch.nn.functional.gelu(x @ w1[i] + b1[i])
        expected.append(hidden @ w2[i] + b2[i])
    torch.testing.assert_close(planrec.factor_mlps(coefficient, e, w1, b1, w2, b2),
                               torch.stack(expected, -2), rtol=1e-12, atol=1e-12)


def test_spec_gradcheck():
    args = inputs((2, 1), (2, 3), 3, 2, 4, seed=1)
    assert torch.autograd.gradcheck(planrec.factor_mlps, args)


def test_factor_mlps_module_holds_the_weights_and_calls_its_fn():
    """FactorMLPs keeps the parameter names and shapes checkpoints hold; fn picks the implementation."""
    g = planrec.FactorMLPs(4, 3, 5)
    assert g.fn is planrec.factor_mlps
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == {
        "w1": (4, 12, 5), "b1": (4, 1, 5), "w2": (4, 5, 3), "b2": (4, 1, 3)}
    fast = planrec.FactorMLPs(4, 3, 5, fn=kernels.factor_mlps).double()
    fast.load_state_dict(g.double().state_dict())
    coefficient, e = inputs((2, 1), (2, 3), 4, 3, 5, seed=2)[:2]
    torch.testing.assert_close(fast(coefficient, e), g(coefficient, e), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["shared", "personalized"])
def test_planrec_passes_factor_mlps_fn_to_g(structure):
    cfg = planrec.Config(n_users=5, n_items=7, embed_dim=4, history_len=3, structure=structure)
    assert planrec.PlanRec(cfg).g.fn is planrec.factor_mlps
    assert planrec.PlanRec(cfg, factor_mlps_fn=kernels.factor_mlps).g.fn is kernels.factor_mlps


def test_kernel_imports_without_triton():
    """kernels.factor_mlps is plain torch: the package imports where Triton is missing."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import kernels.factor_mlps, kernels\n"
            "assert kernels.factor_mlps.__module__ == 'kernels.factor_mlps'\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
