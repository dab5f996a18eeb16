"""Fused Triton kernels for planrec.personalized_scm (Eq. (11)-(13) of the paper).

The executable spec is `planrec.personalized_scm`: this file computes the same function (the tests
check every output and every gradient against it) with one kernel launch forward and one
backward, where eager torch runs a chain of about 20 kernels each way.

What one "row" computes
-----------------------
A row is one (example b, sample s) pair; rows are independent. Per row, in plain Python:

    # Eq. (12): Gumbel top-K masks (u: Philox uniforms drawn in the kernel, or the given ones)
    perturbed_A = logits_A[b] - log(-log(u_A[b, s]))      # diagonal entries are not candidates
    mask_A      = 1 on the k_A largest off-diagonal entries of perturbed_A, else 0
    perturbed_e = logits_e[b] - log(-log(u_e[b, s]))
    mask_e      = 1 on the k_e largest entries of perturbed_e, else 0
    # Eq. (13): the masked SCM, one N x N linear system shared by all d columns of z[b]
    system      = I - (mask_A * A)^T
    for each chunk of BLOCK_C columns of z[b]:
        e_star[b, s, :, chunk] = solve(system, mask_e[:, None] * z[b, :, chunk])   # Gauss-Jordan

Backward, per row, with the upstream gradients grad_e_star, grad_mask_A, grad_mask_e (the masks
are straight-through: hard 0/1 forward, the gradient of softmax(perturbed / tau) backward):

    for each chunk:  lam = solve(system^T, grad_e_star[b, s, :, chunk])  # system^-T grad_e_star
                     grad_z[b, :, chunk] += mask_e[:, None] * lam             (summed over s)
                     grad_P              += e_star[b, s, :, chunk] @ lam^T    (P = mask_A * A)
                     grad_mask_e         += sum over columns of z[b] * lam
    grad_mask_A  = A * grad_P  (+ upstream grad_mask_A)
    grad_A      += mask_A * grad_P                                            (summed over b, s)
    grad_logits  = soft * (grad_mask - <soft, grad_mask>) / tau   (soft = softmax(perturbed / tau)),
                   summed over s, for both masks

Layout and grids
----------------
Every per-row quantity is a register tile [BLOCK_ROWS, BLOCK_N, BLOCK_N] (masks, the system) or
[BLOCK_ROWS, BLOCK_N, BLOCK_C] (a chunk of right-hand-side columns), with N padded to BLOCK_N
and the chunk to BLOCK_C (powers of two), padding masked off.

- forward: program p takes BLOCK_ROWS consecutive flat rows m = b * n_samples + s.
- backward: program p takes BLOCK_EXAMPLES whole examples; its rows are (example, sample slot)
  with SAMPLES_PAD = next_power_of_2(n_samples) slots per example, so that the sums over samples
  (grad_z, grad_logits_A, grad_logits_e) are a reshape and a sum inside the program: no atomics,
  no per-sample partial buffers. At B = 4096, N_m = 8, N = d = 8 that is 2048 programs.

Indexing a register tile. Triton cannot index a tile with a runtime value (X[:, k] does not
exist). Row or column k of a tile is read with tl.gather (Triton >= 3.3; `_column`, `_row`,
`_pick`), or, where the installed Triton lacks it (or Blocks(gather=False) asks), with the
masked-sum idiom tl.sum(tl.where(cols == k, X, 0.0), axis=2), a reduction across the lanes that
hold the row. It is written as tl.where(cols == k, new_column[:, :, None], X).

Random numbers (a 4-wide Philox stream, drawn 4 numbers per call)
-----------------------------------------------------------------
Each row m owns BLOCK_N^2 stream positions f = 0 .. BLOCK_N^2 - 1, drawn as
tl.rand4x(seed, m * BLOCK_N^2 / 4 + f // 4)[f % 4], i.e. one Philox call per 4 numbers:
    u_A[b, s, i, j] = position j * BLOCK_N + i          (entry (i, j) of A, i != j)
    u_e[b, s, i]    = position i * BLOCK_N + i          (the diagonal of A, never a candidate)
so the A mask's unused diagonal feeds the factor mask and nothing is drawn twice: 16 Philox
calls per row at N = 8, where one tl.rand per entry took 72. The stream depends only on (seed,
row, entry) and on BLOCK_N = next_power_of_2(N) (a function of the shapes), never on the launch
block sizes or the grid, and the backward regenerates exactly what the forward drew
(`philox_uniforms` returns that stream; the tests rebuild it independently). Uniforms are
clamped to [tiny, 1) like the eager function.

The seed is a one-element int64 tensor on z's device, read by the kernels (no host sync, and a
CUDA graph replays with whatever value it holds): drawn from torch's generator on that device
when `seed` is None, filled from an int, or the caller's tensor, which each call that draws
noise advances in place by one on the device (so successive calls get fresh masks; an equal
seed tensor gives the same masks). Philox keys seed and seed + 1 give independent streams.

Top-K
-----
mask_A: a bisection for the K-th largest perturbed logit that stops as soon as exactly K
candidates lie at or above the threshold (the rule of vLLM's Triton top-k/top-p sampler). It
works on a monotone uint32 key of the float, bounded by the row's smallest and largest candidate
key. The first passes halve the VALUE interval (~log2(range / gap between the K-th and
(K+1)-th value) passes; the first no lower than 32 below the largest value, so that a few
far-below candidates, e.g. blocked dependencies at NEVER_LOGIT, cost one pass, not ten), later
ones the key interval (at most 32 more, so it always ends). A block of rows loops until its
last row is done: simulated for 16-row blocks at N = 8, k_A = 28 with N(0, 1) logits (the
benchmark's), 11 passes on average and 16 at the 99th percentile, where the radix select took
32 (with two reductions each); 14 on average with 12 of the 56 candidates at NEVER_LOGIT.
If it ends on a tie at the K-th place (no threshold separates exactly K), the tied entries are
taken in increasing flat index i*N + j (a second bisection on the index, rarely run).
mask_e (N <= 32 entries): ranks by one pairwise comparison, rank_i = #{j: key_j > key_i, or
key_j == key_i and j < i}; mask_e = rank < K. Ties go to the lower index there too.
So ties go to the LOWER index, deterministically. torch.topk (planrec.gumbel_topk) breaks ties
in no documented order (on the CPU it is not the lower index), so the two agree exactly whenever
there is no tie at the K-th place (probability ~0 with continuous noise; the tests' contract).
Entries that are not candidates (the diagonal, padding) are never chosen, even when fewer than
K candidates are finite (the eager function can then pick a diagonal entry).

The solve
---------
Gauss-Jordan elimination with partial pivoting on (system, right-hand-side chunk) together:
N steps, each one column read, one pivot search (tl.max with return_indices, the first largest
|.|), one row read of each tile and a rank-1 update of every other row; rows are never swapped,
the pivot order is recorded and one gather puts the solution rows in order at the end (the
backward reads them in order in the loop that adds e* lam^T to grad_P instead). That is
N dependent steps per chunk, where LU factorization + forward + back substitution took 3N. A
later chunk repeats the elimination (N steps) instead of replaying stored factors (2N steps).

A's gradient is reduced deterministically: each backward program writes the sum over its rows
as one [N, N] partial, and torch sums the partials in a fixed order. The grid depends on the
shapes only, so results are bitwise reproducible (atomics would make the float order depend on
scheduling).

Singular systems (possible only for cyclic masked graphs with unit-gain cycles) give inf/NaN
here, where torch.linalg.solve would raise.

Inside a compiled graph
-----------------------
On torch versions with torch.library.custom_op (2.4+), the forward and the backward are the
registered ops torch.ops.planrec.personalized_scm_fwd / _bwd, with fake (meta) implementations
and the autograd formula registered (register_autograd), so torch.compile(fullgraph=True)
traces kernels.personalized_scm without a graph break. Eager calls (and torch versions without
custom_op) run the plain torch.autograd.Function PersonalizedSCMFunction instead: the same
kernels and bits, with less host time per call (REGISTERED_OP says when the op is used).

Cost model (float32, per row = per (example, sample); estimates, to be checked on a GPU)
--------------------------------------------------------------------------------------
Bytes. Forward: write e* (4 N d), mask_A (4 N^2), mask_e (4 N); read z, logits_A, logits_e once
per example (shared by its N_m rows). At N = d = 8: ~550 bytes per row, 4.9 KB per example with
N_m = 8, i.e. 20 MB at B = 4096 and 320 MB at B = 65536. Backward: read grad_e*, e*, mask_A,
mask_e (and the upstream mask gradients if any), write grad_z and the logits' gradients per
example: ~800-1100 bytes per row. The masks are written as the public dtype (float32 for float32
logits): they are differentiable outputs of that dtype, so a uint8 copy would add bytes to the
forward to save them in the backward.
Operations at N = d = 8, padding included (issue 21's H200 measurement: the old forward used
8.4% of the copy bandwidth at B = 65536, bound by arithmetic and dependent reductions):
  old: Philox per entry (72 calls, ~6k ops), 32-pass radix top-K twice (each pass two
       reductions over the tile), LU 3N steps with ~3 masked-sum reads each;
  now: 16 Philox calls (~1.5k ops) + 128 logs; top-K ~11 passes per 16-row block (one
       reduction each) for mask_A, one pairwise pass for mask_e; Gauss-Jordan N steps with
       gathers (5 reads per step, none of them a masked sum where tl.gather exists).
Measured effects belong in BENCHMARKS.md (kernels/gpu_check.sh, step bench_ablate, separates
Philox, top-K and the solve).
"""

import os
from typing import List, NamedTuple, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package can still be imported; CPU falls back to eager
    triton = None
    tl = None

MAX_N = 32
MAX_SAMPLES = 16
MAX_BLOCK_C = 32              # columns per chunk: wider z loops over chunks inside the kernel
DTYPES = (torch.float32, torch.bfloat16)
# Launch parameters, from `python -m kernels.bench --sweep` on an H200 (docs/BENCHMARKS.md): at
# B = 4096 and 65536, N_m = N = d = 8, 16 rows per program (1024-element tiles) with 4 warps in
# the forward and 2 in the backward beat every other combination of rows 8-64 x warps 1-8 tried
# (forward 1.4-1.5x, backward 1.2-2x the old 2048-element tiles with 4 warps, which spilled).
# Tuned for the LU kernel before issue 21: re-run the sweep (gpu_check.sh bench_sweep). Issue 21:
# the Gauss-Jordan backward at 16 rows per program spills with 2 warps (an sm_90 cubin built by
# Triton 3.9 without a GPU, read with cuobjdump: 255 registers and a 384-byte stack at 2 warps;
# 247 registers and no stack at 4), so the backward takes 4 warps, the same rows and grid.
# The forward: 135 registers, no stack, at 4 warps (the LU forward: 150).
TILE_ELEMENTS = 1024          # target size of the largest per-program register tile
NUM_WARPS = 4                 # forward warps per program
BACKWARD_NUM_WARPS = 4        # backward warps per program
# Top-K bisection: passes that halve the value interval before the key interval is halved.
FLOAT_PASSES = 24
# NaN-fill output buffers before each launch, so a test catches any element a kernel fails to
# write. It costs one extra write pass, so it is on only where the tests (or this variable) ask.
POISON_OUTPUTS = os.environ.get("PLANREC_POISON_OUTPUTS") == "1"
_TINY = torch.finfo(torch.float32).tiny

# Triton features, by what the installed version has (checked, not assumed from its number):
# tl.gather from Triton 3.3 on; older versions read rows and columns by masked sums.
HAS_GATHER = tl is not None and hasattr(tl, "gather")
# torch.library.custom_op / register_fake / register_autograd from torch 2.4 on.
HAS_CUSTOM_OP = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake", "register_autograd"))
# When the public function calls the registered op: "compile" (while torch.compile traces it;
# eager calls take the plain autograd.Function, the same kernels at a third of the host time per
# call: custom_op's Python dispatch costs ~200 us with autograd on a slow CPU), "always" (e.g.
# for make_fx / export tracing without Dynamo) or "never".
REGISTERED_OP = "compile"

# Benchmark-only ablations (Blocks(ablation=...)): they compute WRONG results on purpose, to
# say what bounds the kernel. FIXED_MASK: no top-K (the first K candidates in index order; the
# noise is still drawn and kept alive). NO_SOLVE: no elimination (e* = mask_e * z).
ABLATE_FIXED_MASK = 1
ABLATE_NO_SOLVE = 2

# Every compiled kernel variant launched so far: (kernel name, meta-parameters) -> the object
# Triton's launch returns (on a GPU it carries n_regs and n_spills; None under the interpreter).
COMPILED_VARIANTS = {}


if triton is not None:

    # --------------------------------------------------------------------------------------------
    # noise
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _philox_tile(seed, m, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """[ROWS, BLOCK_N, BLOCK_N] uniforms: tile[r, a, c] = stream position a * BLOCK_N + c of row m[r],
        drawn four per Philox call (tl.rand4x), clamped to [tiny, 1)."""
        Q: tl.constexpr = BLOCK_N * BLOCK_N // 4
        counter = m[:, None] * Q + tl.arange(0, Q)[None, :]                  # [ROWS, Q], int64
        u0, u1, u2, u3 = tl.rand4x(seed, counter)
        # tl.join stacks along a new LAST axis: [ROWS, Q, 2, 2][r, q, y, x] = lane 2y + x = position 4q + 2y + x
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [ROWS, BLOCK_N, BLOCK_N])
        return tl.maximum(u, 1.1754943508222875e-38)        # torch.finfo(float32).tiny, as eager

    @triton.jit
    def _perturb(logits, candidate, u):
        """logits + Gumbel noise -log(-log u) on the candidate entries, -inf elsewhere."""
        return tl.where(candidate, logits - tl.log(-tl.log(u)), float("-inf"))

    # --------------------------------------------------------------------------------------------
    # reading rows and columns of register tiles
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _column(X, k, ROWS: tl.constexpr, H: tl.constexpr, W: tl.constexpr, USE_GATHER: tl.constexpr):
        """X[:, :, k] of a [ROWS, H, W] tile, k a scalar -> [ROWS, H]."""
        if USE_GATHER:
            return tl.reshape(tl.gather(X, tl.zeros([ROWS, H, 1], dtype=tl.int32) + k, axis=2), [ROWS, H])
        else:
            return tl.sum(tl.where(tl.arange(0, W)[None, None, :] == k, X, 0.0), axis=2)

    @triton.jit
    def _row(X, p, ROWS: tl.constexpr, H: tl.constexpr, W: tl.constexpr, USE_GATHER: tl.constexpr):
        """X[r, p[r], :] of a [ROWS, H, W] tile, p [ROWS] -> [ROWS, W]."""
        if USE_GATHER:
            index = tl.broadcast_to(p.to(tl.int32)[:, None, None], [ROWS, 1, W])
            return tl.reshape(tl.gather(X, index, axis=1), [ROWS, W])
        else:
            return tl.sum(tl.where(tl.arange(0, H)[None, :, None] == p[:, None, None], X, 0.0), axis=1)

    @triton.jit
    def _pick(v, p, ROWS: tl.constexpr, W: tl.constexpr, USE_GATHER: tl.constexpr):
        """v[r, p[r]] of a [ROWS, W] tile, p [ROWS] -> [ROWS]."""
        if USE_GATHER:
            return tl.reshape(tl.gather(v, p.to(tl.int32)[:, None], axis=1), [ROWS])
        else:
            return tl.sum(tl.where(tl.arange(0, W)[None, :] == p[:, None], v, 0), axis=1)

    @triton.jit
    def _diagonal(X, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, USE_GATHER: tl.constexpr):
        """X[r, i, i] of a [ROWS, BLOCK_N, BLOCK_N] tile -> [ROWS, BLOCK_N]."""
        if USE_GATHER:
            index = tl.broadcast_to(tl.arange(0, BLOCK_N)[None, :, None], [ROWS, BLOCK_N, 1])
            return tl.reshape(tl.gather(X, index, axis=2), [ROWS, BLOCK_N])
        else:
            eye = tl.arange(0, BLOCK_N)[None, :, None] == tl.arange(0, BLOCK_N)[None, None, :]
            return tl.sum(tl.where(eye, X, 0.0), axis=2)

    @triton.jit
    def _permute_rows(X, order, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr,
                      USE_GATHER: tl.constexpr):
        """Y[r, k, :] = X[r, order[r, k], :] for a [ROWS, BLOCK_N, W] tile, order [ROWS, BLOCK_N]
        (rows k >= n keep order[r, k] = k)."""
        if USE_GATHER:
            return tl.gather(X, tl.broadcast_to(order[:, :, None], [ROWS, BLOCK_N, W]), axis=1)
        else:
            rows = tl.arange(0, BLOCK_N)[None, :, None]
            Y = tl.where(rows < n, 0.0, X)
            for k in range(n):
                source = _pick(order, tl.zeros([ROWS], dtype=tl.int32) + k, ROWS, BLOCK_N, False)
                Y = tl.where(rows == k, _row(X, source, ROWS, BLOCK_N, W, False)[:, None, :], Y)
            return Y

    # --------------------------------------------------------------------------------------------
    # top-K
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _key(x):
        """A uint32 key with the order of the float32 x; -0.0 and +0.0 share one (they are equal)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(bits == 0x80000000, 0, bits)
        return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)

    @triton.jit
    def _unkey(key):
        """The float32 of a _key."""
        bits = tl.where((key >> 31) != 0, key & 0x7FFFFFFF, ~key)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _finite(x):
        """x with the infinities clamped to the largest finite floats (their midpoint stays a number)."""
        return tl.minimum(tl.maximum(x, -3.4028234663852886e38), 3.4028234663852886e38)

    @triton.jit
    def _topk_bisect(perturbed, candidate, flat_index, K, INDEX_BITS: tl.constexpr, FLOAT_PASSES: tl.constexpr):
        """[ROWS, E] tiles -> exactly K of each row's candidates: the largest perturbed, ties to the
        lower flat_index. A bisection that stops once exactly K keys lie at or above the threshold."""
        key = tl.where(candidate, _key(perturbed), 0)                       # 0: below every candidate
        # Invariant: count(key >= lo) = count_lo >= K and the K-th largest key lies in [lo, hi].
        lo = tl.min(tl.where(candidate, key, 0xFFFFFFFF), axis=1)
        hi = tl.max(key, axis=1)
        count_lo = tl.sum(candidate.to(tl.int32), axis=1)
        done = (count_lo == K) | (lo >= hi)         # rows without candidates are done at once (lo > hi)
        passes = 0
        while tl.min(done.to(tl.int32), axis=0) == 0:       # some row of the block is still searching
            # the next threshold, in (lo, hi]: halfway in value (the first pass no lower than 32
            # below the largest, so that far-below candidates, e.g. blocked dependencies at
            # NEVER_LOGIT = -1e4, cost one pass, not ten), or halfway in key where that is not
            # strictly inside (rounding, infinities) or after FLOAT_PASSES passes (exact ties)
            hi_value = _finite(_unkey(hi))
            lo_value = _finite(_unkey(lo))
            lo_value = tl.where(passes == 0, tl.maximum(lo_value, hi_value - 64.0), lo_value)
            mid = _key(lo_value * 0.5 + hi_value * 0.5)
            key_half = lo + (hi - lo) // 2 + 1
            mid = tl.where((mid <= lo) | (mid > hi) | (passes >= FLOAT_PASSES), key_half, mid)
            count = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1)
            up = (count >= K) & ~done
            lo = tl.where(up, mid, lo)
            count_lo = tl.where(up, count, count_lo)
            hi = tl.where((count < K) & ~done, mid - 1, hi)
            done = (count_lo == K) | (lo >= hi)
            passes += 1
        # lo is now a threshold with exactly K keys at or above it, or the K-th largest key itself
        above = key > lo[:, None]
        tied = (key == lo[:, None]) & candidate
        still_needed = K - tl.sum(above.to(tl.int32), axis=1)
        excess = tl.sum(tied.to(tl.int32), axis=1) - still_needed
        last_index = tl.full(lo.shape, 1 << INDEX_BITS, dtype=tl.int32)
        if tl.max(excess, axis=0) > 0:      # a tie straddles the K-th place somewhere: take low indices
            last_index = tl.zeros(lo.shape, dtype=tl.int32)
            for i in tl.static_range(INDEX_BITS):
                trial = last_index | (1 << (INDEX_BITS - 1 - i))
                count = tl.sum((tied & (flat_index < trial[:, None])).to(tl.int32), axis=1)
                last_index = tl.where(count < still_needed, trial, last_index)
        return (above | (tied & (flat_index <= last_index[:, None]))) & candidate

    @triton.jit
    def _topk_rank(perturbed, candidate, K, BLOCK_N: tl.constexpr):
        """[ROWS, BLOCK_N] -> exactly K candidates per row by rank: the largest, ties to the lower index."""
        key = tl.where(candidate, _key(perturbed), 0)
        index = tl.arange(0, BLOCK_N)
        key_i, key_j = key[:, :, None], key[:, None, :]
        beats = candidate[:, None, :] & ((key_j > key_i) | ((key_j == key_i) & (index[None, None, :] < index[None, :, None])))
        rank = tl.sum(beats.to(tl.int32), axis=2)
        return candidate & (rank < K)

    # --------------------------------------------------------------------------------------------
    # the solve
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _gauss_jordan_eliminate(system, rhs, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                                USE_GATHER: tl.constexpr):
        """Gauss-Jordan elimination with partial pivoting of each row's n x n system
        ([ROWS, BLOCK_N, BLOCK_N]) together with a chunk of right-hand sides ([ROWS, BLOCK_N, BLOCK_C]).

        Step k takes as pivot the free row with the largest |system[:, :, k]| (the first such),
        and subtracts it from every other row, so that column k is zero outside the pivot row.
        Rows are never swapped. Returns (rhs, pivot, diagonal): unknown k of system X = rhs is
        rhs[pivot[k]] / diagonal[k] (rows k >= n: pivot[k] = k, diagonal[k] = 1)."""
        row_id = tl.arange(0, BLOCK_N)[None, :]                                 # [1, BLOCK_N]
        free = (row_id < n) & (tl.zeros([ROWS, BLOCK_N], dtype=tl.int32) == 0)   # not yet a pivot row
        pivot = row_id + tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)              # padding rows: themselves
        diagonal = tl.full([ROWS, BLOCK_N], 1.0, dtype=tl.float32)
        for k in range(n):
            column_k = _column(system, k, ROWS, BLOCK_N, BLOCK_N, USE_GATHER)                # system[:, :, k]
            _, p = tl.max(tl.where(free, tl.abs(column_k), -1.0), axis=1, return_indices=True)   # first largest |.|
            pivot_row = _row(system, p, ROWS, BLOCK_N, BLOCK_N, USE_GATHER)                  # system[:, p, :]
            rhs_row = _row(rhs, p, ROWS, BLOCK_N, BLOCK_C, USE_GATHER)                       # rhs[:, p, :]
            pivot_value = _pick(column_k, p, ROWS, BLOCK_N, USE_GATHER)                      # system[:, p, k]
            is_pivot = row_id == p[:, None]
            factor = tl.where(is_pivot, 0.0, column_k * (1.0 / pivot_value)[:, None])
            system = system - factor[:, :, None] * pivot_row[:, None, :]
            rhs = rhs - factor[:, :, None] * rhs_row[:, None, :]
            free = free & ~is_pivot
            pivot = tl.where(row_id == k, p[:, None], pivot)                                 # pivot[:, k] = p
            diagonal = tl.where(row_id == k, pivot_value[:, None], diagonal)                 # diagonal[:, k]
        return rhs, pivot, diagonal

    @triton.jit
    def _gauss_jordan(system, rhs, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                      USE_GATHER: tl.constexpr):
        """X with system X = rhs (tiles as in _gauss_jordan_eliminate), its rows put in order by one gather."""
        rhs, pivot, diagonal = _gauss_jordan_eliminate(system, rhs, n, ROWS, BLOCK_N, BLOCK_C, USE_GATHER)
        return _permute_rows(rhs, pivot, n, ROWS, BLOCK_N, BLOCK_C, USE_GATHER) / diagonal[:, :, None]

    # --------------------------------------------------------------------------------------------
    # reductions of the backward
    # --------------------------------------------------------------------------------------------

    @triton.jit
    def _sum12(x):
        return tl.sum(tl.sum(x, axis=2), axis=1)

    @triton.jit
    def _max12(x):
        return tl.max(tl.max(x, axis=2), axis=1)

    @triton.jit
    def _softmax(perturbed, tau):
        """softmax(perturbed / tau) over axes 1 and 2 of a [rows, X, Y] tile (-inf off-candidate)."""
        x = perturbed / tau
        x_max = _max12(x)
        x_max = tl.where(x_max == float("-inf"), 0.0, x_max)   # all-masked rows: zeros, not NaN
        ex = tl.exp(x - x_max[:, None, None])
        den = _sum12(ex)
        den = tl.where(den == 0.0, 1.0, den)
        return ex / den[:, None, None]

    @triton.jit
    def _sum_over_samples(x, BLOCK_EXAMPLES: tl.constexpr, SAMPLES_PAD: tl.constexpr,
                          X: tl.constexpr, Y: tl.constexpr):
        """[BLOCK_EXAMPLES * SAMPLES_PAD, X, Y] (rows = example-major) -> per example [BLOCK_EXAMPLES, X, Y]."""
        return tl.sum(tl.reshape(x, [BLOCK_EXAMPLES, SAMPLES_PAD, X, Y]), axis=1)

    # --------------------------------------------------------------------------------------------
    # kernels
    # --------------------------------------------------------------------------------------------

    # Runtime integers are not specialized (Triton would otherwise compile a variant for every
    # value equal to 1 or divisible by 16); only the constexpr block shapes and flags are.
    @triton.jit(do_not_specialize=["n_rows", "n_samples", "N", "n_cols", "k_A", "k_e"])
    def _forward_kernel(
            # inputs
            z_ptr, A_ptr, logits_A_ptr, logits_e_ptr, uniform_A_ptr, uniform_e_ptr, seed_ptr,
            # outputs
            e_star_ptr, mask_A_ptr, mask_e_ptr,
            # sizes and sampling
            n_rows, n_samples, N, n_cols, k_A, k_e,
            # meta-parameters
            HAS_UNIFORM_A: tl.constexpr, HAS_UNIFORM_E: tl.constexpr,
            BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, INDEX_BITS_A: tl.constexpr,
            FLOAT_PASSES: tl.constexpr, USE_GATHER: tl.constexpr,
            ABLATE_TOPK: tl.constexpr, ABLATE_SOLVE: tl.constexpr):
        """Masks and e* for BLOCK_ROWS (example, sample) rows; all column chunks."""
        pid = tl.program_id(0)
        m = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)      # flat row b * n_samples + s
        b = m // n_samples
        m2, b2 = m[:, None], b[:, None]
        m3, b3 = m2[:, :, None], b2[:, :, None]
        live2 = m2 < n_rows
        live = live2[:, :, None]
        row_id = tl.arange(0, BLOCK_N)[None, :]
        rows = tl.arange(0, BLOCK_N)[None, :, None]
        cols = tl.arange(0, BLOCK_N)[None, None, :]
        chunk_cols = tl.arange(0, BLOCK_C)[None, None, :]
        # --- noise: one Philox tile per row, A's entries off its diagonal, the factor mask's on it ---
        if not (HAS_UNIFORM_A and HAS_UNIFORM_E):
            noise = _philox_tile(tl.load(seed_ptr), m, BLOCK_ROWS, BLOCK_N)
        # --- mask_A, held transposed: tile[r, c] is entry (i, j) = (c, r) of A, so that
        #     system = I - (mask_A * A)^T needs no transpose (and the noise tile needs none) ---
        a_index = cols * N + rows
        in_nn = (rows < N) & (cols < N)
        candidate_A = in_nn & (rows != cols) & live
        logits_A = tl.load(logits_A_ptr + b3 * N * N + a_index, mask=candidate_A, other=0.0).to(tl.float32)
        if HAS_UNIFORM_A:
            u_A = tl.load(uniform_A_ptr + m3 * N * N + a_index, mask=candidate_A, other=0.5).to(tl.float32)
        else:
            u_A = noise
        perturbed_A = _perturb(logits_A, candidate_A, u_A)
        if ABLATE_TOPK:     # benchmark only: the first k_A candidates (the noise stays alive)
            off_diagonal_rank = cols * (N - 1) + rows - (rows > cols).to(tl.int32)
            chosen_A = candidate_A & (off_diagonal_rank < k_A) & (perturbed_A == perturbed_A)
        else:
            E: tl.constexpr = BLOCK_N * BLOCK_N
            chosen_A = _topk_bisect(tl.reshape(perturbed_A, [BLOCK_ROWS, E]), tl.reshape(candidate_A, [BLOCK_ROWS, E]),
                                    tl.reshape(tl.broadcast_to(a_index, [BLOCK_ROWS, BLOCK_N, BLOCK_N]), [BLOCK_ROWS, E]),
                                    k_A, INDEX_BITS_A, FLOAT_PASSES)
            chosen_A = tl.reshape(chosen_A, [BLOCK_ROWS, BLOCK_N, BLOCK_N])
        mask_A = chosen_A.to(tl.float32)
        tl.store(mask_A_ptr + m3 * N * N + a_index, mask_A, mask=in_nn & live)
        # --- mask_e, a [rows, BLOCK_N] tile ---
        candidate_e = (row_id < N) & live2
        logits_e = tl.load(logits_e_ptr + b2 * N + row_id, mask=candidate_e, other=0.0).to(tl.float32)
        if HAS_UNIFORM_E:
            u_e = tl.load(uniform_e_ptr + m2 * N + row_id, mask=candidate_e, other=0.5).to(tl.float32)
        else:
            u_e = _diagonal(noise, BLOCK_ROWS, BLOCK_N, USE_GATHER)
        perturbed_e = _perturb(logits_e, candidate_e, u_e)
        if ABLATE_TOPK:
            chosen_e = candidate_e & (row_id < k_e) & (perturbed_e == perturbed_e)
        else:
            chosen_e = _topk_rank(perturbed_e, candidate_e, k_e, BLOCK_N)
        mask_e = chosen_e.to(tl.float32)
        tl.store(mask_e_ptr + m2 * N + row_id, mask_e, mask=candidate_e)
        # --- system = I - (mask_A * A)^T; system e* = mask_e * z, chunk by chunk ---
        if not ABLATE_SOLVE:
            A_t = tl.load(A_ptr + a_index, mask=in_nn, other=0.0).to(tl.float32)
            system = tl.where(rows == cols, 1.0, 0.0) - mask_A * A_t
        for col0 in range(0, n_cols, BLOCK_C):
            col = col0 + chunk_cols
            in_chunk = (rows < N) & (col < n_cols) & live
            z = tl.load(z_ptr + b3 * N * n_cols + rows * n_cols + col, mask=in_chunk, other=0.0).to(tl.float32)
            if ABLATE_SOLVE:    # benchmark only: no elimination
                e_star = mask_e[:, :, None] * z
            else:
                e_star = _gauss_jordan(system, mask_e[:, :, None] * z, N, BLOCK_ROWS, BLOCK_N, BLOCK_C, USE_GATHER)
            tl.store(e_star_ptr + m3 * N * n_cols + rows * n_cols + col, e_star, mask=in_chunk)

    @triton.jit(do_not_specialize=["n_examples", "n_samples", "N", "n_cols"])
    def _backward_kernel(
            # inputs: the forward's inputs and outputs, and the upstream gradients
            z_ptr, A_ptr, logits_A_ptr, logits_e_ptr, uniform_A_ptr, uniform_e_ptr, seed_ptr,
            e_star_ptr, mask_A_ptr, mask_e_ptr,
            grad_e_star_ptr, grad_mask_A_ptr, grad_mask_e_ptr,
            # outputs (grad_A_partial: one [N, N] partial per program, summed by torch)
            grad_z_ptr, grad_logits_A_ptr, grad_logits_e_ptr, grad_A_partial_ptr,
            # sizes and sampling
            n_examples, n_samples, N, n_cols, tau,
            # meta-parameters
            HAS_UNIFORM_A: tl.constexpr, HAS_UNIFORM_E: tl.constexpr,
            HAS_GRAD_MASK_A: tl.constexpr, HAS_GRAD_MASK_E: tl.constexpr, NEED_GRAD_A: tl.constexpr,
            BLOCK_EXAMPLES: tl.constexpr, SAMPLES_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, USE_GATHER: tl.constexpr):
        """Gradients for BLOCK_EXAMPLES whole examples (rows = example x sample slot).

        With system = I - P^T, P = mask_A * A, system e* = mask_e * z and g = grad_e_star:
            lam          = system^-T g                      (solve with system^T = I - mask_A * A)
            grad_z       = sum_s mask_e * lam
            grad_P       = e* lam^T                        (dL/dP; = -(dL/d system)^T)
            grad_mask_A  = A * grad_P          + upstream grad_mask_A
            grad_mask_e  = sum_cols z * lam    + upstream grad_mask_e
            grad_A       = sum_{b,s} mask_A * grad_P
            grad_logits  = sum_s soft * (grad_mask - <soft, grad_mask>) / tau,  soft = softmax(perturbed / tau)
        (straight-through: the backward of a hard mask is the softmax Jacobian).
        BLOCK_ROWS = BLOCK_EXAMPLES * SAMPLES_PAD."""
        pid = tl.program_id(0)
        slot = tl.arange(0, BLOCK_ROWS)
        b = pid.to(tl.int64) * BLOCK_EXAMPLES + slot // SAMPLES_PAD
        s = slot % SAMPLES_PAD
        live = ((b < n_examples) & (s < n_samples))[:, None, None]
        m = b * n_samples + s                                # flat row, as in the forward
        m3 = m[:, None, None]
        b3 = b[:, None, None]
        example3 = (pid.to(tl.int64) * BLOCK_EXAMPLES + tl.arange(0, BLOCK_EXAMPLES))[:, None, None]
        example_live = example3 < n_examples
        rows = tl.arange(0, BLOCK_N)[None, :, None]
        cols = tl.arange(0, BLOCK_N)[None, None, :]
        chunk_cols = tl.arange(0, BLOCK_C)[None, None, :]
        # A's own layout here: tile[r, c] is entry (r, c), so I - mask_A * A is system^T
        a_index = rows * N + cols
        in_nn = (rows < N) & (cols < N)
        candidate_A = in_nn & (rows != cols) & live
        candidate_e = (rows < N) & live
        A = tl.load(A_ptr + a_index, mask=in_nn, other=0.0).to(tl.float32)
        mask_A = tl.load(mask_A_ptr + m3 * N * N + a_index, mask=in_nn & live, other=0.0).to(tl.float32)
        mask_e = tl.load(mask_e_ptr + m3 * N + rows, mask=candidate_e, other=0.0).to(tl.float32)
        system_t = tl.where(rows == cols, 1.0, 0.0) - mask_A * A
        grad_P = tl.zeros([BLOCK_ROWS, BLOCK_N, BLOCK_N], dtype=tl.float32)
        grad_mask_e = tl.zeros([BLOCK_ROWS, BLOCK_N, 1], dtype=tl.float32)
        for col0 in range(0, n_cols, BLOCK_C):
            col = col0 + chunk_cols
            in_chunk = (rows < N) & (col < n_cols) & live
            row_offset = m3 * N * n_cols + rows * n_cols + col
            grad_e_star = tl.load(grad_e_star_ptr + row_offset, mask=in_chunk, other=0.0).to(tl.float32)
            # lam = system^-T g. Its rows come out of the elimination one by one, in the loop that
            # also adds them to grad_P (no separate gather puts them in order). e* and z are loaded
            # where they are used, so that they hold no registers during the solve (it spilled).
            solved, pivot, diagonal = _gauss_jordan_eliminate(system_t, grad_e_star, N, BLOCK_ROWS, BLOCK_N, BLOCK_C,
                                                              USE_GATHER)
            e_star = tl.load(e_star_ptr + row_offset, mask=in_chunk, other=0.0).to(tl.float32)
            lam = tl.zeros([BLOCK_ROWS, BLOCK_N, BLOCK_C], dtype=tl.float32)
            for k in range(N):                  # lam[:, k, :], and grad_P[:, :, k] += sum_cols e* * lam[:, k, :]
                k_vector = tl.zeros([BLOCK_ROWS], dtype=tl.int32) + k
                lam_k = (_row(solved, _pick(pivot, k_vector, BLOCK_ROWS, BLOCK_N, USE_GATHER), BLOCK_ROWS, BLOCK_N,
                              BLOCK_C, USE_GATHER) / _pick(diagonal, k_vector, BLOCK_ROWS, BLOCK_N, USE_GATHER)[:, None])
                lam = tl.where(rows == k, lam_k[:, None, :], lam)
                grad_P = tl.where(cols == k, grad_P + tl.sum(e_star * lam_k[:, None, :], axis=2)[:, :, None], grad_P)
            z = tl.load(z_ptr + b3 * N * n_cols + rows * n_cols + col, mask=in_chunk, other=0.0).to(tl.float32)
            grad_mask_e += tl.sum(z * lam, axis=2)[:, :, None]                     # sum_cols z * lam
            grad_z = _sum_over_samples(mask_e * lam, BLOCK_EXAMPLES, SAMPLES_PAD, BLOCK_N, BLOCK_C)   # sum_s mask_e * lam
            tl.store(grad_z_ptr + example3 * N * n_cols + rows * n_cols + col, grad_z,
                     mask=(rows < N) & (col < n_cols) & example_live)
        grad_mask_A = A * grad_P                                                    # A * grad_P
        if HAS_GRAD_MASK_A:
            grad_mask_A += tl.load(grad_mask_A_ptr + m3 * N * N + a_index, mask=in_nn & live, other=0.0).to(tl.float32)
        if HAS_GRAD_MASK_E:
            grad_mask_e += tl.load(grad_mask_e_ptr + m3 * N + rows, mask=candidate_e, other=0.0).to(tl.float32)
        if NEED_GRAD_A:
            r2 = tl.arange(0, BLOCK_N)[:, None]
            c2 = tl.arange(0, BLOCK_N)[None, :]
            tl.store(grad_A_partial_ptr + pid * N * N + r2 * N + c2, tl.sum(mask_A * grad_P, axis=0),   # sum mask_A * grad_P
                     mask=(r2 < N) & (c2 < N))
        # straight-through: regenerate the forward's noise, the softmax Jacobian times grad_mask
        if not (HAS_UNIFORM_A and HAS_UNIFORM_E):
            noise = _philox_tile(tl.load(seed_ptr), m, BLOCK_ROWS, BLOCK_N)     # tile[r, j, i]: entry (i, j)
        logits_A = tl.load(logits_A_ptr + b3 * N * N + a_index, mask=candidate_A, other=0.0).to(tl.float32)
        if HAS_UNIFORM_A:
            u_A = tl.load(uniform_A_ptr + m3 * N * N + a_index, mask=candidate_A, other=0.5).to(tl.float32)
        else:
            u_A = tl.permute(noise, (0, 2, 1))                                   # tile[r, i, j]: entry (i, j)
        soft_A = _softmax(_perturb(logits_A, candidate_A, u_A), tau)
        grad_logits_A = soft_A * (grad_mask_A - _sum12(soft_A * grad_mask_A)[:, None, None])
        grad_logits_A = _sum_over_samples(grad_logits_A, BLOCK_EXAMPLES, SAMPLES_PAD, BLOCK_N, BLOCK_N)
        tl.store(grad_logits_A_ptr + example3 * N * N + a_index, grad_logits_A / tau, mask=in_nn & example_live)
        logits_e = tl.load(logits_e_ptr + b3 * N + rows, mask=candidate_e, other=0.0).to(tl.float32)
        if HAS_UNIFORM_E:
            u_e = tl.load(uniform_e_ptr + m3 * N + rows, mask=candidate_e, other=0.5).to(tl.float32)
        else:
            u_e = _diagonal(noise, BLOCK_ROWS, BLOCK_N, USE_GATHER)[:, :, None]
        soft_e = _softmax(_perturb(logits_e, candidate_e, u_e), tau)
        grad_logits_e = soft_e * (grad_mask_e - _sum12(soft_e * grad_mask_e)[:, None, None])
        grad_logits_e = _sum_over_samples(grad_logits_e, BLOCK_EXAMPLES, SAMPLES_PAD, BLOCK_N, 1)
        tl.store(grad_logits_e_ptr + example3 * N + rows, grad_logits_e / tau, mask=(rows < N) & example_live)

    @triton.jit
    def _philox_stream_kernel(out_ptr, n_counters, seed_ptr, BLOCK: tl.constexpr):
        """out[4 c + lane] = tl.rand4x(seed, c)[lane], clamped to [tiny, 1)."""
        c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), c)
        live = c < n_counters
        tiny = 1.1754943508222875e-38
        tl.store(out_ptr + 4 * c, tl.maximum(u0, tiny), mask=live)
        tl.store(out_ptr + 4 * c + 1, tl.maximum(u1, tiny), mask=live)
        tl.store(out_ptr + 4 * c + 2, tl.maximum(u2, tiny), mask=live)
        tl.store(out_ptr + 4 * c + 3, tl.maximum(u3, tiny), mask=live)


# ------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------

class Blocks(NamedTuple):
    """Launch variant; None = the default for the shapes (tests force small blocks, the
    benchmark sweeps them and times the ablations)."""
    rows: Optional[int] = None          # forward rows per program
    examples: Optional[int] = None      # backward examples per program
    cols: Optional[int] = None          # right-hand-side columns per chunk
    warps: Optional[int] = None         # forward num_warps (default NUM_WARPS)
    backward_warps: Optional[int] = None    # backward num_warps (default BACKWARD_NUM_WARPS)
    gather: Optional[bool] = None       # read tile rows/columns with tl.gather (default: HAS_GATHER)
    ablation: int = 0                   # benchmark only: ABLATE_FIXED_MASK | ABLATE_NO_SOLVE (wrong results)


def _blocks_to_list(blocks):
    """Blocks as the int list the registered op takes (0 = default; gather -1 = default)."""
    b = blocks or Blocks()
    gather = -1 if b.gather is None else int(bool(b.gather))
    return [b.rows or 0, b.examples or 0, b.cols or 0, b.warps or 0, b.backward_warps or 0, gather, int(b.ablation)]


def _blocks_from_list(values):
    rows, examples, cols, warps, backward_warps, gather, ablation = values
    return Blocks(rows or None, examples or None, cols or None, warps or None, backward_warps or None,
                  None if gather < 0 else bool(gather), ablation)


def _use_gather(blocks):
    gather = (blocks or Blocks()).gather
    if gather and not HAS_GATHER:
        raise ValueError("Blocks(gather=True): this Triton has no tl.gather (Triton >= 3.3)")
    return HAS_GATHER if gather is None else bool(gather)


def _poisoned(shape, dtype, device):
    """Output buffers start as NaN so an element the kernel fails to write cannot go unnoticed."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _pow2(x):
    return triton.next_power_of_2(x)


def _block_sizes(n_samples, N, n_cols, blocks=None):
    """BLOCK_N, BLOCK_C, forward BLOCK_ROWS, backward BLOCK_EXAMPLES and SAMPLES_PAD.

    A program's largest tile ([rows, BLOCK_N, max(BLOCK_N, BLOCK_C)]) holds about TILE_ELEMENTS
    elements; the backward needs all SAMPLES_PAD slots of an example in one program."""
    blocks = blocks or Blocks()
    block_n = _pow2(N)
    block_c = blocks.cols or min(_pow2(n_cols), MAX_BLOCK_C)
    rows = max(1, min(64, TILE_ELEMENTS // (block_n * max(block_n, block_c))))
    samples_pad = _pow2(n_samples)
    block_rows = blocks.rows or rows
    block_examples = blocks.examples or max(1, rows // samples_pad)
    return block_n, block_c, block_rows, block_examples, samples_pad


def backward_grid(n_examples, n_samples, N, n_cols, blocks=None):
    """Number of backward programs (one per BLOCK_EXAMPLES examples)."""
    block_examples = _block_sizes(n_samples, N, n_cols, blocks)[3]
    return triton.cdiv(n_examples, block_examples)


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch goes through here: it records the compiled variant (registers and
    spills on a GPU) and lets the tests count launches."""
    compiled = kernel[grid](*args, **meta)
    key = (getattr(kernel, "__name__", None) or kernel.fn.__name__,
           tuple(sorted((k, v) for k, v in meta.items())))
    COMPILED_VARIANTS[key] = compiled
    return compiled


def compiled_variant_report():
    """One line per compiled kernel variant: its meta-parameters, registers per thread and spills
    (Triton fills n_regs / n_spills when it loads a kernel on a GPU; the interpreter has none)."""
    lines = []
    for (name, meta), compiled in sorted(COMPILED_VARIANTS.items(), key=lambda kv: str(kv[0])):
        n_regs, n_spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
        regs = "n/a (interpreter)" if n_regs is None else f"{n_regs} registers, {n_spills} spills"
        lines.append(f"{name} {dict(meta)}: {regs}")
    return lines


def _seed_tensor(seed, device):
    """The one-element int64 device tensor the kernels read (None stays None: noise given)."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


def _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e, uniform_A, uniform_e, seed, blocks=None):
    """seed: an int or a one-element int64 tensor on z's device (read, not advanced); unused
    (and may be None) when both uniforms are given."""
    n_examples, N, n_cols = z.shape
    e_star = _poisoned((n_examples, n_samples, N, n_cols), z.dtype, z.device)
    mask_A = _poisoned((n_examples, n_samples, N, N), logits_A.dtype, z.device)
    mask_e = _poisoned((n_examples, n_samples, N), logits_e.dtype, z.device)
    if n_examples == 0:
        return e_star, mask_A, mask_e
    blocks = blocks or Blocks()
    block_n, block_c, block_rows, _, _ = _block_sizes(n_samples, N, n_cols, blocks)
    n_rows = n_examples * n_samples
    seed = _seed_tensor(seed, z.device)
    _launch(_forward_kernel, (triton.cdiv(n_rows, block_rows),),
            z, A, logits_A, logits_e,
            uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
            seed if seed is not None else z,
            e_star, mask_A, mask_e,
            n_rows, n_samples, N, n_cols, k_A, k_e,
            HAS_UNIFORM_A=uniform_A is not None, HAS_UNIFORM_E=uniform_e is not None,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_C=block_c,
            INDEX_BITS_A=(block_n * block_n).bit_length() - 1, FLOAT_PASSES=FLOAT_PASSES,
            USE_GATHER=_use_gather(blocks),
            ABLATE_TOPK=bool(blocks.ablation & ABLATE_FIXED_MASK), ABLATE_SOLVE=bool(blocks.ablation & ABLATE_NO_SOLVE),
            num_warps=blocks.warps or NUM_WARPS)
    return e_star, mask_A, mask_e


def _backward(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, tau,
              e_star, mask_A, mask_e, grad_e_star, grad_mask_A, grad_mask_e, need_grad_A, blocks=None):
    n_examples, n_samples, N, n_cols = e_star.shape
    dev = z.device
    grad_z = _poisoned((n_examples, N, n_cols), torch.float32, dev)
    grad_logits_A = _poisoned((n_examples, N, N), torch.float32, dev)
    grad_logits_e = _poisoned((n_examples, N), torch.float32, dev)
    blocks = blocks or Blocks()
    block_n, block_c, _, block_examples, samples_pad = _block_sizes(n_samples, N, n_cols, blocks)
    n_programs = triton.cdiv(n_examples, block_examples)
    grad_A_partial = _poisoned((n_programs, N, N), torch.float32, dev) if need_grad_A else grad_z
    seed = _seed_tensor(seed, dev)
    if n_examples > 0:
        _launch(_backward_kernel, (n_programs,),
                z, A, logits_A, logits_e,
                uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
                seed if seed is not None else z,
                e_star, mask_A, mask_e,
                grad_e_star, grad_mask_A if grad_mask_A is not None else grad_e_star,
                grad_mask_e if grad_mask_e is not None else grad_e_star,
                grad_z, grad_logits_A, grad_logits_e, grad_A_partial,
                n_examples, n_samples, N, n_cols, float(tau),
                HAS_UNIFORM_A=uniform_A is not None, HAS_UNIFORM_E=uniform_e is not None,
                HAS_GRAD_MASK_A=grad_mask_A is not None, HAS_GRAD_MASK_E=grad_mask_e is not None,
                NEED_GRAD_A=need_grad_A,
                BLOCK_EXAMPLES=block_examples, SAMPLES_PAD=samples_pad, BLOCK_ROWS=block_examples * samples_pad,
                BLOCK_N=block_n, BLOCK_C=block_c, USE_GATHER=_use_gather(blocks),
                num_warps=blocks.backward_warps or BACKWARD_NUM_WARPS)
    grad_A = None
    if need_grad_A:    # a fixed-order sum of the per-program partials: deterministic
        grad_A = grad_A_partial.sum(0) if n_examples > 0 else torch.zeros(N, N, dtype=torch.float32, device=dev)
    return grad_z, grad_A, grad_logits_A, grad_logits_e


def _contiguous_or_none(t):
    return t.contiguous() if t is not None else None


class PersonalizedSCMFunction(torch.autograd.Function):
    """Fused forward and backward; the masks are differentiable outputs (straight-through).
    The plain path: what the public function uses where torch.library.custom_op is missing, and
    what tests and the benchmark call with forced launch Blocks. seed: an int or a one-element
    int64 tensor on z's device, read and not advanced (the public function advances)."""

    @staticmethod
    def forward(ctx, z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed,
                blocks=None):
        seed = _seed_tensor(seed, z.device)
        e_star, mask_A, mask_e = _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e,
                                          uniform_A, uniform_e, seed, blocks)
        ctx.save_for_backward(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, e_star, mask_A, mask_e)
        ctx.tau, ctx.blocks = tau, blocks
        ctx.set_materialize_grads(False)
        return e_star, mask_A, mask_e

    @staticmethod
    def backward(ctx, grad_e_star, grad_mask_A, grad_mask_e):
        z, A, logits_A, logits_e, uniform_A, uniform_e, seed, e_star, mask_A, mask_e = ctx.saved_tensors
        if grad_e_star is None:
            grad_e_star = torch.zeros_like(e_star)
        grad_z, grad_A, grad_logits_A, grad_logits_e = _backward(
            z, A, logits_A, logits_e, uniform_A, uniform_e, seed, ctx.tau,
            e_star, mask_A, mask_e, grad_e_star.contiguous(), _contiguous_or_none(grad_mask_A),
            _contiguous_or_none(grad_mask_e), need_grad_A=ctx.needs_input_grad[1], blocks=ctx.blocks)
        return (grad_z.to(z.dtype), grad_A.to(A.dtype) if grad_A is not None else None,
                grad_logits_A.to(logits_A.dtype), grad_logits_e.to(logits_e.dtype),
                None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# The registered ops (torch.library.custom_op): what torch.compile traces
# ------------------------------------------------------------------------------------------------

scm_forward_op = None           # torch.ops.planrec.personalized_scm_fwd where registered
scm_backward_op = None          # torch.ops.planrec.personalized_scm_bwd


def _register_ops():
    """Forward and backward as custom ops with fake implementations (shapes and dtypes only, for
    tracing) and the autograd formula; the real implementations launch the Triton kernels."""
    Tensor = torch.Tensor

    @torch.library.custom_op("planrec::personalized_scm_fwd", mutates_args=())
    def forward_op(z: Tensor, A: Tensor, logits_A: Tensor, logits_e: Tensor, uniform_A: Optional[Tensor],
                   uniform_e: Optional[Tensor], seed: Optional[Tensor], n_samples: int, k_A: int, k_e: int,
                   tau: float, blocks: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
        return _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e, uniform_A, uniform_e, seed,
                        _blocks_from_list(blocks))

    @forward_op.register_fake
    def _(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, n_samples, k_A, k_e, tau, blocks):
        B, N, d = z.shape
        return (z.new_empty((B, n_samples, N, d)), logits_A.new_empty((B, n_samples, N, N)),
                logits_e.new_empty((B, n_samples, N)))

    @torch.library.custom_op("planrec::personalized_scm_bwd", mutates_args=())
    def backward_op(z: Tensor, A: Tensor, logits_A: Tensor, logits_e: Tensor, uniform_A: Optional[Tensor],
                    uniform_e: Optional[Tensor], seed: Optional[Tensor], e_star: Tensor, mask_A: Tensor,
                    mask_e: Tensor, grad_e_star: Tensor, grad_mask_A: Optional[Tensor],
                    grad_mask_e: Optional[Tensor], tau: float, need_grad_A: bool,
                    blocks: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        grad_z, grad_A, grad_logits_A, grad_logits_e = _backward(
            z, A, logits_A, logits_e, uniform_A, uniform_e, seed, tau, e_star, mask_A, mask_e,
            grad_e_star, grad_mask_A, grad_mask_e, need_grad_A, _blocks_from_list(blocks))
        if grad_A is None:          # an op returns tensors: an empty one stands for "not needed"
            grad_A = torch.zeros(0, dtype=torch.float32, device=z.device)
        return grad_z, grad_A, grad_logits_A, grad_logits_e

    @backward_op.register_fake
    def _(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, e_star, mask_A, mask_e, grad_e_star,
          grad_mask_A, grad_mask_e, tau, need_grad_A, blocks):
        B, N, d = z.shape
        f32 = dict(dtype=torch.float32)
        return (z.new_empty((B, N, d), **f32), A.new_empty((N, N) if need_grad_A else (0,), **f32),
                logits_A.new_empty((B, N, N), **f32), logits_e.new_empty((B, N), **f32))

    def setup_context(ctx, inputs, output):
        z, A, logits_A, logits_e, uniform_A, uniform_e, seed, _, _, _, tau, blocks = inputs
        ctx.save_for_backward(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, *output)
        ctx.tau, ctx.blocks = tau, blocks
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_e_star, grad_mask_A, grad_mask_e):
        z, A, logits_A, logits_e, uniform_A, uniform_e, seed, e_star, mask_A, mask_e = ctx.saved_tensors
        if grad_e_star is None:
            grad_e_star = torch.zeros_like(e_star)
        need_grad_A = ctx.needs_input_grad[1]
        grad_z, grad_A, grad_logits_A, grad_logits_e = backward_op(
            z, A, logits_A, logits_e, uniform_A, uniform_e, seed, e_star, mask_A, mask_e,
            grad_e_star.contiguous(), _contiguous_or_none(grad_mask_A), _contiguous_or_none(grad_mask_e),
            ctx.tau, need_grad_A, ctx.blocks)
        return (grad_z.to(z.dtype), grad_A.to(A.dtype) if need_grad_A else None,
                grad_logits_A.to(logits_A.dtype), grad_logits_e.to(logits_e.dtype),
                None, None, None, None, None, None, None, None)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op, backward_op


if triton is not None and HAS_CUSTOM_OP:
    scm_forward_op, scm_backward_op = _register_ops()


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compiling():
    """Whether torch.compile (Dynamo) is tracing this call."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _check(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed):
    if z.dim() != 3:
        raise ValueError(f"z must be [B, N, d], got shape {tuple(z.shape)}")
    B, N, d = z.shape
    if not 2 <= N <= MAX_N:
        raise ValueError(f"N (number of factors) must be in 2..{MAX_N} for the Triton kernel, got {N}")
    if d < 1:
        raise ValueError(f"d (right-hand-side columns) must be >= 1, got {d}")
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise ValueError(f"n_samples (N_m) must be in 1..{MAX_SAMPLES} for the Triton kernel, got {n_samples}")
    if not 1 <= k_A <= N * (N - 1):
        raise ValueError(f"k_A must be in 1..N(N-1)={N * (N - 1)}, got {k_A}")
    if not 1 <= k_e <= N:
        raise ValueError(f"k_e must be in 1..N={N}, got {k_e}")
    if not (float(tau) > 0 and float(tau) < float("inf")):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    shapes = {"A": (A, (N, N)), "logits_A": (logits_A, (B, N, N)), "logits_e": (logits_e, (B, N))}
    if uniform_A is not None:
        shapes["uniform_A"] = (uniform_A, (B, n_samples, N, N))
    if uniform_e is not None:
        shapes["uniform_e"] = (uniform_e, (B, n_samples, N))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    for name, t in [("z", z), ("A", A), ("logits_A", logits_A), ("logits_e", logits_e),
                    ("uniform_A", uniform_A), ("uniform_e", uniform_e)]:
        if t is None:
            continue
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16 for the Triton kernel, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device}, z on {z.device}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != z.device:
            raise ValueError(f"a seed tensor must be one int64 element on {z.device}, got "
                             f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")
    elif seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in 0..2**63-1 or a one-element int64 tensor, got {seed!r}")


def _seed_for_call(seed, uniform_A, uniform_e, device):
    """The seed tensor this call's kernels read: None when both uniforms are given; drawn from
    torch's generator on `device` when seed is None; an int filled in; a caller's tensor cloned,
    then advanced in place by one (on the device, no host sync)."""
    if uniform_A is not None and uniform_e is not None:
        return None
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        used = seed.clone()
        seed.add_(1)
        return used
    return _seed_tensor(seed, device)


def personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau=1.0,
                     uniform_A=None, uniform_e=None, seed=None):
    """planrec.personalized_scm, fused; same signature and semantics plus an optional `seed`.

    z [B, N, d]; A [N, N]; logits_A [B, N, N] (diagonal ignored); logits_e [B, N]; uniform_A
    [B, N_m, N, N] and uniform_e [B, N_m, N] optionally fix the noise (N_m = n_samples). Returns
    e_star [B, N_m, N, d], mask_A [B, N_m, N, N], mask_e [B, N_m, N].

    The noise, where not given, is Philox drawn in the kernel from `seed`: an int (reproducible),
    a one-element int64 tensor on z's device (read on the device and advanced in place by one
    per call: fresh masks each call, the same masks for an equal seed tensor, no host sync;
    torch.compile and CUDA graphs keep it live), or None (a seed tensor drawn from torch's
    generator on z's device, so torch.manual_seed makes runs reproducible).

    Runs the Triton kernels on CUDA tensors and, with TRITON_INTERPRET=1, on CPU tensors; other
    CPU tensors go to planrec.personalized_scm (with `seed`, its uniforms come from a
    torch.Generator seeded with it: reproducible, but not the kernel's Philox stream).
    Kernel limits: N <= 32, n_samples <= 16, float32 or bfloat16 (solved in float32); d is any
    size: one launch each way, looping over chunks of up to 32 columns inside the kernel.
    """
    if not (z.is_cuda or _interpreting()) or triton is None:
        return _eager(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed)
    if z.device.type == "cpu" and not _forward_kernel.__class__.__name__.startswith("Interpreted"):
        raise RuntimeError("TRITON_INTERPRET=1 was set after kernels.personalized_scm was imported; "
                           "set it before importing triton kernels")
    _check(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed)
    seed = _seed_for_call(seed, uniform_A, uniform_e, z.device)
    z, A, logits_A, logits_e, uniform_A, uniform_e = [
        _contiguous_or_none(t) for t in (z, A, logits_A, logits_e, uniform_A, uniform_e)]
    if scm_forward_op is not None and (REGISTERED_OP == "always" or REGISTERED_OP == "compile" and _compiling()):
        return scm_forward_op(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, n_samples, k_A, k_e,
                              float(tau), _blocks_to_list(None))
    return PersonalizedSCMFunction.apply(z, A, logits_A, logits_e, n_samples, k_A, k_e, float(tau),
                                         uniform_A, uniform_e, seed)


def philox_uniforms(n_examples, n_samples, N, seed, device):
    """The uniforms the kernel draws for `seed` (an int or a one-element int64 tensor, not
    advanced): uniform_A [B, N_m, N, N] (its diagonal unused) and uniform_e [B, N_m, N], so that
    planrec.personalized_scm fed with them computes what the kernel computes with `seed`."""
    block_n = _pow2(N)
    n_rows = n_examples * n_samples
    n_counters = n_rows * block_n * block_n // 4
    stream = torch.empty(4 * n_counters, dtype=torch.float32, device=device)
    if n_counters:
        _philox_stream_kernel[(triton.cdiv(n_counters, 256),)](stream, n_counters, _seed_tensor(seed, device),
                                                              BLOCK=256)
    tiles = stream.view(n_rows, block_n, block_n)          # tiles[m, a, c] = position a * BLOCK_N + c
    uniform_A = tiles.transpose(1, 2)[:, :N, :N]            # entry (i, j) at position j * BLOCK_N + i
    uniform_e = torch.diagonal(tiles, dim1=1, dim2=2)[:, :N]
    return (uniform_A.reshape(n_examples, n_samples, N, N).contiguous(),
            uniform_e.reshape(n_examples, n_samples, N).contiguous())


def _eager(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed):
    import planrec
    if seed is not None and (uniform_A is None or uniform_e is None):
        if isinstance(seed, torch.Tensor):      # a CPU tensor here: read it, then advance it as the kernel path does
            value = int(seed.item())
            seed.add_(1)
        else:
            value = seed
        gen = torch.Generator(device=z.device).manual_seed(value)
        B, N, _ = z.shape
        if uniform_A is None:
            uniform_A = torch.rand((B, n_samples, N, N), generator=gen, dtype=logits_A.dtype,
                                   device=z.device).clamp_(min=torch.finfo(logits_A.dtype).tiny)
        if uniform_e is None:
            uniform_e = torch.rand((B, n_samples, N), generator=gen, dtype=logits_e.dtype,
                                   device=z.device).clamp_(min=torch.finfo(logits_e.dtype).tiny)
    return planrec.personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e)
