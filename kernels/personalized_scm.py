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
    factorize system once (Gaussian elimination with partial pivoting)
    for each chunk of BLOCK_C columns of z[b]:
        e_star[b, s, :, chunk] = solve(system, mask_e[:, None] * z[b, :, chunk])

Backward, per row, with the upstream gradients grad_e_star, grad_mask_A, grad_mask_e (the masks
are straight-through: hard 0/1 forward, the gradient of softmax(perturbed / tau) backward):

    factorize system^T = I - mask_A * A once
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
Every per-row quantity is a register tile [BLOCK_ROWS, BLOCK_N, BLOCK_N] (masks, the system, its
factors) or [BLOCK_ROWS, BLOCK_N, BLOCK_C] (a chunk of right-hand-side columns), with N padded
to BLOCK_N and the chunk to BLOCK_C (powers of two), padding masked off.

- forward: program p takes BLOCK_ROWS consecutive flat rows m = b * n_samples + s.
- backward: program p takes BLOCK_EXAMPLES whole examples; its rows are (example, sample slot)
  with SAMPLES_PAD = next_power_of_2(n_samples) slots per example, so that the sums over samples
  (grad_z, grad_logits_A, grad_logits_e) are a reshape and a sum inside the program: no atomics,
  no per-sample partial buffers. At B = 4096, N_m = 8, N = d = 8 that is 2048 programs.

Indexing a register tile. Triton cannot index a tile with a runtime value (X[:, k] does not
exist), so row or column k of a tile is read as

    tl.sum(tl.where(cols == k, X, 0.0), axis=2)      # == X[:, :, k]   ("column k of X")
    tl.sum(tl.where(rows == k, X, 0.0), axis=1)      # == X[:, k, :]   ("row k of X")

and written as tl.where(cols == k, new_column[:, :, None], X). The comments name the result.

Random numbers: tl.rand(seed, offset) with the GLOBAL int64 flat offset of each entry
(b*N_m*N*N + s*N*N + i*N + j for the A mask; B*N_m*N*N + b*N_m*N + s*N + i for the factor mask),
so the noise depends only on (seed, entry), never on the block sizes or the grid, and the
backward regenerates exactly what the forward drew (`philox_uniforms` returns that stream).
Uniforms are clamped to [tiny, 1) like the eager function.

Top-K: exact radix select on a monotone uint32 key of the perturbed logit (32 counting passes
find the K-th largest key T); entries with key > T are in, and entries equal to T are taken in
increasing flat index (i*N + j, resp. i) until exactly K are chosen. So ties go to the LOWER
index, deterministically. torch.topk does not document its tie order; the two agree whenever
there is no tie at the K-th place (probability ~0 with continuous noise). Entries that are not
candidates (the diagonal, padding) are never chosen, even when fewer than K candidates are
finite (the eager function can then pick a diagonal entry).

A's gradient is reduced deterministically: each backward program writes the sum over its rows
as one [N, N] partial, and torch sums the partials in a fixed order. The grid depends on the
shapes only, so results are bitwise reproducible (atomics would make the float order depend on
scheduling).

Singular systems (possible only for cyclic masked graphs with unit-gain cycles) give inf/NaN
here, where torch.linalg.solve raises.

Cost model (float32, per row = per (example, sample); estimates, to be checked on a GPU)
--------------------------------------------------------------------------------------
Bytes. Forward: write e* (4 N d), mask_A (4 N^2), mask_e (4 N); read z, logits_A, logits_e once
per example (shared by its N_m rows). At N = d = 8: ~550 bytes per row, 4.9 KB per example with
N_m = 8, i.e. 20 MB at B = 4096 and 320 MB at B = 65536. Backward: read grad_e*, e*, mask_A,
mask_e (and the upstream mask gradients if any), write grad_z and the logits' gradients per
example: ~800-1100 bytes per row.
Operations (simple ALU ops per row at N = d = 8, padding included): Philox and two logs for
N^2 + N = 72 uniforms, ~7k; radix top-K, 32 passes over the 64 + 8 keys, ~5k; factorization,
N steps of ~4 N^2, ~2.5k; per chunk of columns, replay + back substitution, ~3.5k (backward
adds the outer product e* lam^T, ~1k). About 18k ops per forward row: ~33 ops per byte, while an
H100 does ~10 simple fp32/int ops per byte of HBM bandwidth. So at the benchmark's shapes the
kernel is expected to be bound by ALU work and reduction latency (the 32 dependent top-K passes,
the N dependent elimination steps), not by memory: at B = 65536 it would reach about a third
of the copy bandwidth, short of the 50% goal, unless the top-K gets cheaper. At B = 4096 the
forward moves 20 MB (~7 us at 3 TB/s): launch latency and the dependent steps dominate.
"""

import os
from typing import NamedTuple, Optional

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
# Launch parameters, from `python -m kernels.bench --sweep` on an H200 (BENCHMARKS.md): at
# B = 4096 and 65536, N_m = N = d = 8, 16 rows per program (1024-element tiles) with 4 warps in
# the forward and 2 in the backward beat every other combination of rows 8-64 x warps 1-8 tried
# (forward 1.4-1.5x, backward 1.2-2x the old 2048-element tiles with 4 warps, which spilled).
TILE_ELEMENTS = 1024          # target size of the largest per-program register tile
NUM_WARPS = 4                 # forward warps per program
BACKWARD_NUM_WARPS = 2        # backward warps per program
# NaN-fill output buffers before each launch, so a test catches any element a kernel fails to
# write. It costs one extra write pass, so it is on only where the tests (or this variable) ask.
POISON_OUTPUTS = os.environ.get("PLANREC_POISON_OUTPUTS") == "1"
_TINY = torch.finfo(torch.float32).tiny

# Every compiled kernel variant launched so far: (kernel name, meta-parameters) -> the object
# Triton's launch returns (on a GPU it carries n_regs and n_spills; None under the interpreter).
COMPILED_VARIANTS = {}


if triton is not None:

    @triton.jit
    def _perturbed_logits(logits, candidate, offset, uniform_ptr, seed, noise_base, HAS_UNIFORM: tl.constexpr):
        """logits + Gumbel noise on the candidate entries, -inf elsewhere (offset: global flat index)."""
        if HAS_UNIFORM:
            u = tl.load(uniform_ptr + offset, mask=candidate, other=0.5).to(tl.float32)
        else:
            u = tl.rand(seed, offset + noise_base)
            u = tl.maximum(u, 1.1754943508222875e-38)        # torch.finfo(float32).tiny, as eager
        gumbel = -tl.log(-tl.log(u))
        return tl.where(candidate, logits + gumbel, float("-inf"))

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
    def _topk(perturbed, candidate, flat_index, K, ROWS: tl.constexpr, INDEX_BITS: tl.constexpr):
        """Exactly K of each row's candidate entries: the largest perturbed, ties to the lower index."""
        bits = perturbed.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)   # monotone in the float
        key = tl.where(candidate, key, 0)                                # below every candidate
        # threshold = the K-th largest key, built bit by bit from the top.
        threshold = tl.zeros([ROWS], dtype=tl.uint32)
        bit = tl.full([ROWS], 0x80000000, dtype=tl.uint32)
        for _ in range(32):
            trial = threshold | bit
            count = _sum12((key >= trial[:, None, None]).to(tl.int32))
            threshold = tl.where(count >= K, trial, threshold)
            bit = bit >> 1
        above = key > threshold[:, None, None]
        tied = key == threshold[:, None, None]
        still_needed = K - _sum12(above.to(tl.int32))
        excess = tl.where(threshold > 0, _sum12(tied.to(tl.int32)) - still_needed, 0)
        last_index = tl.full([ROWS], 1 << INDEX_BITS, dtype=tl.int32)
        if tl.max(excess, axis=0) > 0:      # a tie straddles the K-th place somewhere: take low indices
            last_index = tl.zeros([ROWS], dtype=tl.int32)
            for i in tl.static_range(INDEX_BITS):
                trial = last_index | (1 << (INDEX_BITS - 1 - i))
                count = _sum12((tied & (flat_index < trial[:, None, None])).to(tl.int32))
                last_index = tl.where(count < still_needed, trial, last_index)
        return (above | (tied & (flat_index <= last_index[:, None, None]))) & candidate

    @triton.jit
    def _lu_factor(system, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Gaussian elimination with partial pivoting of each row's n x n system (tile [ROWS, BLOCK_N, BLOCK_N]).

        Rows are never swapped; the pivot order is recorded instead. Returns
          upper        the eliminated system: its rows pivot[0], pivot[1], ... form U
          multipliers  multipliers[:, i, k] = how much of the step-k pivot row was subtracted from row i
          pivot        pivot[:, k] = the row chosen at step k ([ROWS, BLOCK_N])
        so that _lu_solve can replay the elimination on any number of right-hand sides."""
        row_id = tl.arange(0, BLOCK_N)[None, :]              # [1, BLOCK_N]
        cols = tl.arange(0, BLOCK_N)[None, None, :]          # [1, 1, BLOCK_N]
        free = (row_id < n) & (tl.zeros([ROWS, BLOCK_N], dtype=tl.int32) == 0)   # not yet a pivot row
        pivot = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)
        multipliers = tl.zeros([ROWS, BLOCK_N, BLOCK_N], dtype=tl.float32)
        for k in range(n):
            # system[:, :, k], by the indexing idiom of the module docstring (no X[:, k] on tiles)
            column_k = tl.sum(tl.where(cols == k, system, 0.0), axis=2)                 # system[:, :, k]
            candidate = tl.where(free, tl.abs(column_k), -1.0)
            best = tl.max(candidate, axis=1)
            p = tl.min(tl.where(candidate == best[:, None], row_id, BLOCK_N), axis=1)   # first largest |.|
            is_pivot = row_id == p[:, None]
            pivot_row = tl.sum(tl.where(is_pivot[:, :, None], system, 0.0), axis=1)    # system[:, p, :]
            pivot_value = tl.sum(tl.where(is_pivot, column_k, 0.0), axis=1)             # system[:, p, k]
            free = free & (row_id != p[:, None])
            factor = tl.where(free, column_k / pivot_value[:, None], 0.0)
            system = system - factor[:, :, None] * pivot_row[:, None, :]
            multipliers = tl.where(cols == k, factor[:, :, None], multipliers)          # multipliers[:, :, k] = factor
            pivot = tl.where(row_id == k, p[:, None], pivot)                            # pivot[:, k] = p
        return system, multipliers, pivot

    @triton.jit
    def _lu_solve(upper, multipliers, pivot, rhs, n, left, outer,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, OUTER: tl.constexpr):
        """X with system X = rhs, from _lu_factor's factors; rhs is a [ROWS, BLOCK_N, BLOCK_C] chunk.

        With OUTER, also returns outer + left X^T, i.e. outer[:, i, k] += sum_c left[:, i, c] X[:, k, c],
        added as each row of X appears (the backward's grad_P = e* lam^T)."""
        row_id = tl.arange(0, BLOCK_N)[None, :]
        rows = tl.arange(0, BLOCK_N)[None, :, None]
        cols = tl.arange(0, BLOCK_N)[None, None, :]
        # Forward elimination: subtract from rhs what the factorization subtracted from the system.
        for k in range(n):
            p = tl.sum(tl.where(row_id == k, pivot, 0), axis=1)                          # pivot[:, k]
            rhs_pivot = tl.sum(tl.where((row_id == p[:, None])[:, :, None], rhs, 0.0), axis=1)  # rhs[:, p, :]
            factor = tl.sum(tl.where(cols == k, multipliers, 0.0), axis=2)               # multipliers[:, :, k]
            rhs = rhs - factor[:, :, None] * rhs_pivot[:, None, :]
        # Back substitution: unknown k from pivot row pivot[k], last unknown first.
        X = tl.zeros([ROWS, BLOCK_N, BLOCK_C], dtype=tl.float32)
        for kk in range(n):
            k = n - 1 - kk
            p = tl.sum(tl.where(row_id == k, pivot, 0), axis=1)                          # pivot[:, k]
            is_pivot = (row_id == p[:, None])[:, :, None]
            u_row = tl.sum(tl.where(is_pivot, upper, 0.0), axis=1)                       # upper[:, p, :]
            rhs_row = tl.sum(tl.where(is_pivot, rhs, 0.0), axis=1)                       # rhs[:, p, :]
            diagonal = tl.sum(tl.where(row_id == k, u_row, 0.0), axis=1)                 # upper[:, p, k]
            known = tl.sum(u_row[:, :, None] * X, axis=1)                                # rows > k of X only
            x_k = (rhs_row - known) / diagonal[:, None]
            X = tl.where(rows == k, x_k[:, None, :], X)                                  # X[:, k, :] = x_k
            if OUTER:
                outer = tl.where(cols == k, outer + tl.sum(left * x_k[:, None, :], axis=2)[:, :, None], outer)
        return X, outer

    @triton.jit
    def _sum_over_samples(x, BLOCK_EXAMPLES: tl.constexpr, SAMPLES_PAD: tl.constexpr,
                          X: tl.constexpr, Y: tl.constexpr):
        """[BLOCK_EXAMPLES * SAMPLES_PAD, X, Y] (rows = example-major) -> per example [BLOCK_EXAMPLES, X, Y]."""
        return tl.sum(tl.reshape(x, [BLOCK_EXAMPLES, SAMPLES_PAD, X, Y]), axis=1)

    # Runtime integers are not specialized (Triton would otherwise compile a variant for every
    # value equal to 1 or divisible by 16); only the constexpr block shapes and flags are.
    @triton.jit(do_not_specialize=["n_rows", "n_samples", "N", "n_cols", "k_A", "k_e", "seed", "e_noise_base"])
    def _forward_kernel(
            # inputs
            z_ptr, A_ptr, logits_A_ptr, logits_e_ptr, uniform_A_ptr, uniform_e_ptr,
            # outputs
            e_star_ptr, mask_A_ptr, mask_e_ptr,
            # sizes and sampling
            n_rows, n_samples, N, n_cols, k_A, k_e, seed, e_noise_base,
            # meta-parameters
            HAS_UNIFORM_A: tl.constexpr, HAS_UNIFORM_E: tl.constexpr,
            BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            INDEX_BITS_A: tl.constexpr, INDEX_BITS_E: tl.constexpr):
        """Masks, factorization and e* for BLOCK_ROWS (example, sample) rows; all column chunks."""
        pid = tl.program_id(0)
        m = pid.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)      # flat row b * n_samples + s
        live = (m < n_rows)[:, None, None]
        b = m // n_samples
        m3 = m[:, None, None]
        b3 = b[:, None, None]
        rows = tl.arange(0, BLOCK_N)[None, :, None]
        cols = tl.arange(0, BLOCK_N)[None, None, :]
        chunk_cols = tl.arange(0, BLOCK_C)[None, None, :]
        # --- mask_A, held transposed: tile[r, c] is entry (i, j) = (c, r) of A, so that
        #     system = I - (mask_A * A)^T needs no transpose ---
        a_index = cols * N + rows
        in_nn = (rows < N) & (cols < N)
        candidate_A = in_nn & (rows != cols) & live
        logits_A = tl.load(logits_A_ptr + b3 * N * N + a_index, mask=candidate_A, other=0.0).to(tl.float32)
        perturbed_A = _perturbed_logits(logits_A, candidate_A, m3 * N * N + a_index, uniform_A_ptr, seed, 0,
                                        HAS_UNIFORM_A)
        mask_A = _topk(perturbed_A, candidate_A, a_index, k_A, BLOCK_ROWS, INDEX_BITS_A).to(tl.float32)
        tl.store(mask_A_ptr + m3 * N * N + a_index, mask_A, mask=in_nn & live)
        # --- mask_e, a [rows, BLOCK_N, 1] tile ---
        candidate_e = (rows < N) & live
        logits_e = tl.load(logits_e_ptr + b3 * N + rows, mask=candidate_e, other=0.0).to(tl.float32)
        perturbed_e = _perturbed_logits(logits_e, candidate_e, m3 * N + rows, uniform_e_ptr, seed, e_noise_base,
                                        HAS_UNIFORM_E)
        mask_e = _topk(perturbed_e, candidate_e, rows, k_e, BLOCK_ROWS, INDEX_BITS_E).to(tl.float32)
        tl.store(mask_e_ptr + m3 * N + rows, mask_e, mask=candidate_e)
        # --- system = I - (mask_A * A)^T, factorized once; then system e* = mask_e * z per chunk ---
        A_t = tl.load(A_ptr + a_index, mask=in_nn, other=0.0).to(tl.float32)
        system = tl.where(rows == cols, 1.0, 0.0) - mask_A * A_t
        upper, multipliers, pivot = _lu_factor(system, N, BLOCK_ROWS, BLOCK_N)
        for col0 in range(0, n_cols, BLOCK_C):
            col = col0 + chunk_cols
            in_chunk = (rows < N) & (col < n_cols) & live
            z = tl.load(z_ptr + b3 * N * n_cols + rows * n_cols + col, mask=in_chunk, other=0.0).to(tl.float32)
            e_star, _ = _lu_solve(upper, multipliers, pivot, mask_e * z, N, z, z,
                                  BLOCK_ROWS, BLOCK_N, BLOCK_C, False)
            tl.store(e_star_ptr + m3 * N * n_cols + rows * n_cols + col, e_star, mask=in_chunk)

    @triton.jit(do_not_specialize=["n_examples", "n_samples", "N", "n_cols", "seed", "e_noise_base"])
    def _backward_kernel(
            # inputs: the forward's inputs and outputs, and the upstream gradients
            z_ptr, A_ptr, logits_A_ptr, logits_e_ptr, uniform_A_ptr, uniform_e_ptr,
            e_star_ptr, mask_A_ptr, mask_e_ptr,
            grad_e_star_ptr, grad_mask_A_ptr, grad_mask_e_ptr,
            # outputs (grad_A_partial: one [N, N] partial per program, summed by torch)
            grad_z_ptr, grad_logits_A_ptr, grad_logits_e_ptr, grad_A_partial_ptr,
            # sizes and sampling
            n_examples, n_samples, N, n_cols, tau, seed, e_noise_base,
            # meta-parameters
            HAS_UNIFORM_A: tl.constexpr, HAS_UNIFORM_E: tl.constexpr,
            HAS_GRAD_MASK_A: tl.constexpr, HAS_GRAD_MASK_E: tl.constexpr, NEED_GRAD_A: tl.constexpr,
            BLOCK_EXAMPLES: tl.constexpr, SAMPLES_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
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
        m3 = (b * n_samples + s)[:, None, None]              # flat row, as in the forward
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
        upper, multipliers, pivot = _lu_factor(tl.where(rows == cols, 1.0, 0.0) - mask_A * A, N,
                                               BLOCK_ROWS, BLOCK_N)
        grad_P = tl.zeros([BLOCK_ROWS, BLOCK_N, BLOCK_N], dtype=tl.float32)
        grad_mask_e = tl.zeros([BLOCK_ROWS, BLOCK_N, 1], dtype=tl.float32)
        for col0 in range(0, n_cols, BLOCK_C):
            col = col0 + chunk_cols
            in_chunk = (rows < N) & (col < n_cols) & live
            row_offset = m3 * N * n_cols + rows * n_cols + col
            grad_e_star = tl.load(grad_e_star_ptr + row_offset, mask=in_chunk, other=0.0).to(tl.float32)
            e_star = tl.load(e_star_ptr + row_offset, mask=in_chunk, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + b3 * N * n_cols + rows * n_cols + col, mask=in_chunk, other=0.0).to(tl.float32)
            # lam = system^-T g, and grad_P += e* lam^T
            lam, grad_P = _lu_solve(upper, multipliers, pivot, grad_e_star, N, e_star, grad_P,
                                    BLOCK_ROWS, BLOCK_N, BLOCK_C, True)
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
        logits_A = tl.load(logits_A_ptr + b3 * N * N + a_index, mask=candidate_A, other=0.0).to(tl.float32)
        soft_A = _softmax(_perturbed_logits(logits_A, candidate_A, m3 * N * N + a_index, uniform_A_ptr, seed, 0,
                                            HAS_UNIFORM_A), tau)
        grad_logits_A = soft_A * (grad_mask_A - _sum12(soft_A * grad_mask_A)[:, None, None])
        grad_logits_A = _sum_over_samples(grad_logits_A, BLOCK_EXAMPLES, SAMPLES_PAD, BLOCK_N, BLOCK_N)
        tl.store(grad_logits_A_ptr + example3 * N * N + a_index, grad_logits_A / tau, mask=in_nn & example_live)
        logits_e = tl.load(logits_e_ptr + b3 * N + rows, mask=candidate_e, other=0.0).to(tl.float32)
        soft_e = _softmax(_perturbed_logits(logits_e, candidate_e, m3 * N + rows, uniform_e_ptr, seed, e_noise_base,
                                            HAS_UNIFORM_E), tau)
        grad_logits_e = soft_e * (grad_mask_e - _sum12(soft_e * grad_mask_e)[:, None, None])
        grad_logits_e = _sum_over_samples(grad_logits_e, BLOCK_EXAMPLES, SAMPLES_PAD, BLOCK_N, 1)
        tl.store(grad_logits_e_ptr + example3 * N + rows, grad_logits_e / tau, mask=(rows < N) & example_live)

    @triton.jit
    def _philox_uniforms_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
        offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        u = tl.maximum(tl.rand(seed, offset), 1.1754943508222875e-38)
        tl.store(out_ptr + offset, u, mask=offset < n)


# ------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------

class Blocks(NamedTuple):
    """Block sizes of a launch; None = the default for the shapes (tests force small ones)."""
    rows: Optional[int] = None          # forward rows per program
    examples: Optional[int] = None      # backward examples per program
    cols: Optional[int] = None          # right-hand-side columns per chunk
    warps: Optional[int] = None         # forward num_warps (default NUM_WARPS)
    backward_warps: Optional[int] = None    # backward num_warps (default BACKWARD_NUM_WARPS)


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


def _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e, uniform_A, uniform_e, seed, blocks=None):
    n_examples, N, n_cols = z.shape
    e_star = _poisoned((n_examples, n_samples, N, n_cols), z.dtype, z.device)
    mask_A = _poisoned((n_examples, n_samples, N, N), logits_A.dtype, z.device)
    mask_e = _poisoned((n_examples, n_samples, N), logits_e.dtype, z.device)
    if n_examples == 0:
        return e_star, mask_A, mask_e
    block_n, block_c, block_rows, _, _ = _block_sizes(n_samples, N, n_cols, blocks)
    n_rows = n_examples * n_samples
    _launch(_forward_kernel, (triton.cdiv(n_rows, block_rows),),
            z, A, logits_A, logits_e,
            uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
            e_star, mask_A, mask_e,
            n_rows, n_samples, N, n_cols, k_A, k_e, seed, n_rows * N * N,
            HAS_UNIFORM_A=uniform_A is not None, HAS_UNIFORM_E=uniform_e is not None,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_C=block_c,
            INDEX_BITS_A=(block_n * block_n).bit_length() - 1, INDEX_BITS_E=block_n.bit_length() - 1,
            num_warps=(blocks and blocks.warps) or NUM_WARPS)
    return e_star, mask_A, mask_e


def _backward(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, tau,
              e_star, mask_A, mask_e, grad_e_star, grad_mask_A, grad_mask_e, need_grad_A, blocks=None):
    n_examples, n_samples, N, n_cols = e_star.shape
    dev = z.device
    grad_z = _poisoned((n_examples, N, n_cols), torch.float32, dev)
    grad_logits_A = _poisoned((n_examples, N, N), torch.float32, dev)
    grad_logits_e = _poisoned((n_examples, N), torch.float32, dev)
    block_n, block_c, _, block_examples, samples_pad = _block_sizes(n_samples, N, n_cols, blocks)
    n_programs = triton.cdiv(n_examples, block_examples)
    grad_A_partial = _poisoned((n_programs, N, N), torch.float32, dev) if need_grad_A else grad_z
    if n_examples > 0:
        _launch(_backward_kernel, (n_programs,),
                z, A, logits_A, logits_e,
                uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
                e_star, mask_A, mask_e,
                grad_e_star, grad_mask_A if grad_mask_A is not None else grad_e_star,
                grad_mask_e if grad_mask_e is not None else grad_e_star,
                grad_z, grad_logits_A, grad_logits_e, grad_A_partial,
                n_examples, n_samples, N, n_cols, float(tau), seed, n_examples * n_samples * N * N,
                HAS_UNIFORM_A=uniform_A is not None, HAS_UNIFORM_E=uniform_e is not None,
                HAS_GRAD_MASK_A=grad_mask_A is not None, HAS_GRAD_MASK_E=grad_mask_e is not None,
                NEED_GRAD_A=need_grad_A,
                BLOCK_EXAMPLES=block_examples, SAMPLES_PAD=samples_pad, BLOCK_ROWS=block_examples * samples_pad,
                BLOCK_N=block_n, BLOCK_C=block_c,
                num_warps=(blocks and blocks.backward_warps) or BACKWARD_NUM_WARPS)
    grad_A = None
    if need_grad_A:    # a fixed-order sum of the per-program partials: deterministic
        grad_A = grad_A_partial.sum(0) if n_examples > 0 else torch.zeros(N, N, dtype=torch.float32, device=dev)
    return grad_z, grad_A, grad_logits_A, grad_logits_e


class PersonalizedSCMFunction(torch.autograd.Function):
    """Fused forward and backward; the masks are differentiable outputs (straight-through)."""

    @staticmethod
    def forward(ctx, z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed,
                blocks=None):
        e_star, mask_A, mask_e = _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e,
                                          uniform_A, uniform_e, seed, blocks)
        ctx.save_for_backward(z, A, logits_A, logits_e, uniform_A, uniform_e, e_star, mask_A, mask_e)
        ctx.tau, ctx.seed, ctx.blocks = tau, seed, blocks
        ctx.set_materialize_grads(False)
        return e_star, mask_A, mask_e

    @staticmethod
    def backward(ctx, grad_e_star, grad_mask_A, grad_mask_e):
        z, A, logits_A, logits_e, uniform_A, uniform_e, e_star, mask_A, mask_e = ctx.saved_tensors
        if grad_e_star is None:
            grad_e_star = torch.zeros_like(e_star)
        grad_e_star = grad_e_star.contiguous()
        grad_mask_A = grad_mask_A.contiguous() if grad_mask_A is not None else None
        grad_mask_e = grad_mask_e.contiguous() if grad_mask_e is not None else None
        grad_z, grad_A, grad_logits_A, grad_logits_e = _backward(
            z, A, logits_A, logits_e, uniform_A, uniform_e, ctx.seed, ctx.tau,
            e_star, mask_A, mask_e, grad_e_star, grad_mask_A, grad_mask_e,
            need_grad_A=ctx.needs_input_grad[1], blocks=ctx.blocks)
        return (grad_z.to(z.dtype), grad_A.to(A.dtype) if grad_A is not None else None,
                grad_logits_A.to(logits_A.dtype), grad_logits_e.to(logits_e.dtype),
                None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in 0..2**63-1, got {seed!r}")


def personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau=1.0,
                     uniform_A=None, uniform_e=None, seed=None):
    """planrec.personalized_scm, fused; same signature and semantics plus an optional `seed`.

    z [B, N, d]; A [N, N]; logits_A [B, N, N] (diagonal ignored); logits_e [B, N]; uniform_A
    [B, N_m, N, N] and uniform_e [B, N_m, N] optionally fix the noise (N_m = n_samples). Returns
    e_star [B, N_m, N, d], mask_A [B, N_m, N, N], mask_e [B, N_m, N]. With `seed` (and no uniforms) the noise is Philox
    drawn in the kernel and reproducible; without, the seed is drawn from torch's default
    generator (so torch.manual_seed makes runs reproducible).

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
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    z, A, logits_A, logits_e, uniform_A, uniform_e = [
        t.contiguous() if t is not None else None for t in (z, A, logits_A, logits_e, uniform_A, uniform_e)]
    return PersonalizedSCMFunction.apply(z, A, logits_A, logits_e, n_samples, k_A, k_e, float(tau),
                                         uniform_A, uniform_e, seed)


def philox_uniforms(n_examples, n_samples, N, seed, device):
    """The uniforms the kernel draws for `seed` (uniform_A [B, N_m, N, N], uniform_e [B, N_m, N]):
    planrec.personalized_scm fed with them computes what the kernel computes with `seed`."""
    n_A, n_e = n_examples * n_samples * N * N, n_examples * n_samples * N
    u = torch.empty(n_A + n_e, dtype=torch.float32, device=device)
    _philox_uniforms_kernel[(triton.cdiv(n_A + n_e, 1024),)](u, n_A + n_e, seed, BLOCK=1024)
    return u[:n_A].view(n_examples, n_samples, N, N), u[n_A:].view(n_examples, n_samples, N)


def _eager(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed):
    import planrec
    if seed is not None:
        gen = torch.Generator(device=z.device).manual_seed(seed)
        B, N, _ = z.shape
        if uniform_A is None:
            uniform_A = torch.rand((B, n_samples, N, N), generator=gen, dtype=logits_A.dtype,
                                   device=z.device).clamp_(min=torch.finfo(logits_A.dtype).tiny)
        if uniform_e is None:
            uniform_e = torch.rand((B, n_samples, N), generator=gen, dtype=logits_e.dtype,
                                   device=z.device).clamp_(min=torch.finfo(logits_e.dtype).tiny)
    return planrec.personalized_scm(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e)
