"""Fused Triton kernels for planrec.personalized_scm (Eq. 11-13 of the paper).

One kernel each way replaces the eager chain (uniforms, two logs, softmax, top-K, scatter,
masking, batched LU solve, and as many again backward):

forward  one program per BLOCK_M (example, sample) rows. Per row: Gumbel noise (Philox in the
         kernel, or the given uniforms), hard top-K of the perturbed logits over the N(N-1)
         off-diagonal entries of the dependency mask and over the N factor-mask entries,
         S = I - (mask_A * A)^T built in registers, and S e* = mask_e * z solved in registers by
         Gaussian elimination with partial pivoting. Writes e*, mask_A, mask_e once; nothing else.
backward one program per block of BLOCK_B examples (grid-stride over blocks), looping over the
         samples: the noise is regenerated from the seed (or the uniforms re-read) to rebuild the
         softmax, the hard masks are read back from the forward outputs, one solve with
         S^T = I - mask_A * A gives lambda = S^-T grad_e*, and then
             grad_z       = sum_s mask_e * lambda
             grad_mask_e  = sum_d z * lambda                       (+ upstream grad on mask_e)
             grad_mask_A  = A * (e* lambda^T)                      (+ upstream grad on mask_A)
             grad_A       = sum_{b,s} mask_A * (e* lambda^T)
             grad_logits  = sum_s soft * (grad_mask - <soft, grad_mask>) / tau
         (straight-through: the backward of a hard mask is the softmax Jacobian).

Layout: every per-row quantity is a 3D register tile [rows, BN, BN] or [rows, BN, BD], with N
padded to BN and d to BD (powers of two) and masked. A launch takes up to 64 right-hand-side
columns; a wider z (the model passes C candidates as C*d columns) runs as chunks that share the
seed, hence the masks. In the forward the mask tile is held
transposed (tile[r, c] is entry (c, r) of A) so that S = I - (M * A)^T needs no transpose; in
the backward it is held in A's own layout, which is S^T.

Random numbers: tl.rand(seed, offset) with the GLOBAL int64 flat offset of each entry
(b*S*N*N + s*N*N + i*N + j for the A mask; B*S*N*N + b*S*N + s*N + i for the factor mask), so the
noise depends only on (seed, entry) and never on BLOCK_M / BLOCK_B / the grid, and backward can
regenerate exactly what forward drew. Uniforms are clamped to [tiny, 1) like the eager function.

Top-K: exact radix select on a monotone uint32 key of the perturbed logit (32 counting passes
find the K-th largest key T); entries with key > T are in, and entries equal to T are taken in
increasing flat index (i*N + j, resp. i) until exactly K are chosen. So ties are broken towards
the LOWER index, deterministically. torch.topk does not document its tie order, so the two agree
whenever there are no ties at the K-th place (probability ~0 with continuous noise). Entries that
are not candidates (the diagonal, padding) are never chosen, even when fewer than K candidates
are finite (the eager function can then pick a diagonal entry).

A's gradient is reduced deterministically: each backward program accumulates its examples in
registers and writes one [N, N] partial; torch sums the partials. The grid is
min(#blocks, MAX_BWD_PROGRAMS) whatever the device, so the summation order is fixed and results
are bitwise reproducible (atomics would make the float sum order depend on scheduling).

Singular S (possible only for cyclic masked graphs with unit-gain cycles) gives inf/NaN here, where
torch.linalg.solve raises.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package can still be imported; CPU falls back to eager
    triton = None
    tl = None

MAX_N = 32
MAX_D = 64                    # columns per launch; wider z is split into chunks
MAX_SAMPLES = 16
MAX_BWD_PROGRAMS = 1024
DTYPES = (torch.float32, torch.bfloat16)
TILE_ELEMENTS = 2048          # target size of the largest per-program register tile
# NaN-fill output buffers before each launch, so a test catches any element a kernel fails to
# write. It costs one extra write pass, so it is on only where the tests (or this variable) ask.
POISON_OUTPUTS = os.environ.get("PLANREC_POISON_OUTPUTS") == "1"
_TINY = torch.finfo(torch.float32).tiny


if triton is not None:

    @triton.jit
    def _noise_logits(logit, cand, off, u_ptr, seed, rand_base, HAS_U: tl.constexpr):
        """logit + Gumbel noise on the candidate entries, -inf elsewhere (off: global flat offset)."""
        if HAS_U:
            u = tl.load(u_ptr + off, mask=cand, other=0.5).to(tl.float32)
        else:
            u = tl.rand(seed, off + rand_base)
            u = tl.maximum(u, 1.1754943508222875e-38)        # torch.finfo(float32).tiny, as eager
        g = -tl.log(-tl.log(u))
        return tl.where(cand, logit + g, float("-inf"))

    @triton.jit
    def _sum12(x):
        return tl.sum(tl.sum(x, axis=2), axis=1)

    @triton.jit
    def _max12(x):
        return tl.max(tl.max(x, axis=2), axis=1)

    @triton.jit
    def _softmax(p, tau):
        """softmax(p / tau) over axes 1 and 2 of a [rows, X, Y] tile (p = -inf off-candidate)."""
        x = p / tau
        mx = _max12(x)
        mx = tl.where(mx == float("-inf"), 0.0, mx)           # all-masked rows: zeros, not NaN
        ex = tl.exp(x - mx[:, None, None])
        den = _sum12(ex)
        den = tl.where(den == 0.0, 1.0, den)
        return ex / den[:, None, None]

    @triton.jit
    def _topk(p, cand, idx, K, ROWS: tl.constexpr, IDX_BITS: tl.constexpr):
        """Exactly K of each row's candidate entries: the largest p, ties to the lower idx."""
        bits = p.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)   # monotone in p
        key = tl.where(cand, key, 0)                                     # below every candidate
        # T = the K-th largest key, built bit by bit from the top.
        T = tl.zeros([ROWS], dtype=tl.uint32)
        bit = tl.full([ROWS], 0x80000000, dtype=tl.uint32)
        for _ in range(32):
            trial = T | bit
            cnt = _sum12((key >= trial[:, None, None]).to(tl.int32))
            T = tl.where(cnt >= K, trial, T)
            bit = bit >> 1
        gt = key > T[:, None, None]
        eq = key == T[:, None, None]
        need = K - _sum12(gt.to(tl.int32))
        excess = tl.where(T > 0, _sum12(eq.to(tl.int32)) - need, 0)
        J = tl.full([ROWS], 1 << IDX_BITS, dtype=tl.int32)
        if tl.max(excess, axis=0) > 0:      # a tie straddles the K-th place somewhere: take low idx
            J = tl.zeros([ROWS], dtype=tl.int32)
            for i in tl.static_range(IDX_BITS):
                trial = J | (1 << (IDX_BITS - 1 - i))
                cnt = _sum12((eq & (idx < trial[:, None, None])).to(tl.int32))
                J = tl.where(cnt < need, trial, J)
        return (gt | (eq & (idx <= J[:, None, None]))) & cand

    @triton.jit
    def _solve(S, R, E, n, ROWS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
               OUTER: tl.constexpr):
        """Solve S X = R per row (S [ROWS, BN, BN], R [ROWS, BN, BD]; only the leading n x n used).

        Gaussian elimination with partial pivoting; the row permutation is implicit (pivot rows
        are tracked, not swapped), then back substitution. With OUTER, also returns
        D[:, i, k] = sum_d E[:, i, d] X[:, k, d] (E X^T), built as each row of X appears."""
        rv = tl.arange(0, BN)[None, :]                 # [1, BN] row index (2D)
        rows = tl.arange(0, BN)[None, :, None]         # [1, BN, 1]
        cols = tl.arange(0, BN)[None, None, :]         # [1, 1, BN]
        free = (rv < n) & (tl.zeros([ROWS, BN], dtype=tl.int32) == 0)
        piv = tl.zeros([ROWS, BN], dtype=tl.int32)
        for k in range(n):
            col = tl.sum(tl.where(cols == k, S, 0.0), axis=2)                 # [ROWS, BN]
            cand = tl.where(free, tl.abs(col), -1.0)
            best = tl.max(cand, axis=1)
            p = tl.min(tl.where(cand == best[:, None], rv, BN), axis=1)     # first largest |.|
            is_p = rv == p[:, None]
            srow = tl.sum(tl.where(is_p[:, :, None], S, 0.0), axis=1)      # [ROWS, BN]
            rrow = tl.sum(tl.where(is_p[:, :, None], R, 0.0), axis=1)      # [ROWS, BD]
            pv = tl.sum(tl.where(is_p, col, 0.0), axis=1)
            free = free & (rv != p[:, None])
            f = tl.where(free, col / pv[:, None], 0.0)
            S = S - f[:, :, None] * srow[:, None, :]
            R = R - f[:, :, None] * rrow[:, None, :]
            piv = tl.where(rv == k, p[:, None], piv)
        X = tl.zeros([ROWS, BN, BD], dtype=tl.float32)
        D = tl.zeros([ROWS, BN, BN], dtype=tl.float32)
        for kk in range(n):
            k = n - 1 - kk
            p = tl.sum(tl.where(rv == k, piv, 0), axis=1)
            is_p = (rv == p[:, None])[:, :, None]
            srow = tl.sum(tl.where(is_p, S, 0.0), axis=1)                     # [ROWS, BN]
            rrow = tl.sum(tl.where(is_p, R, 0.0), axis=1)                     # [ROWS, BD]
            diag = tl.sum(tl.where(rv == k, srow, 0.0), axis=1)
            acc = tl.sum(srow[:, :, None] * X, axis=1)                        # rows > k only
            xk = (rrow - acc) / diag[:, None]
            X = tl.where(rows == k, xk[:, None, :], X)
            if OUTER:
                D = tl.where(cols == k, tl.sum(E * xk[:, None, :], axis=2)[:, :, None], D)
        return X, D

    # Runtime integers are not specialized (Triton would otherwise compile a variant for every
    # value equal to 1 or divisible by 16); only the constexpr block shapes and flags are.
    @triton.jit(do_not_specialize=["n_rows", "n_samples", "N", "D", "k_A", "k_e", "seed", "e_rand_base"])
    def _fwd_kernel(z_ptr, A_ptr, la_ptr, le_ptr, ua_ptr, ue_ptr,
                    e_ptr, ma_ptr, me_ptr,
                    n_rows, n_samples, N, D, k_A, k_e, seed, e_rand_base,
                    HAS_UA: tl.constexpr, HAS_UE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    BITS_A: tl.constexpr, BITS_E: tl.constexpr):
        pid = tl.program_id(0)
        m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)       # flat (example, sample) row
        live = (m < n_rows)[:, None, None]
        b = m // n_samples
        m3 = m[:, None, None]
        b3 = b[:, None, None]
        r = tl.arange(0, BN)[None, :, None]
        c = tl.arange(0, BN)[None, None, :]
        dd = tl.arange(0, BD)[None, None, :]
        # --- dependency mask, held transposed: tile[r, c] is entry (i, j) = (c, r) of A ---
        a_idx = c * N + r
        in_nn = (r < N) & (c < N)
        cand_a = in_nn & (r != c) & live
        la = tl.load(la_ptr + b3 * N * N + a_idx, mask=cand_a, other=0.0).to(tl.float32)
        pa = _noise_logits(la, cand_a, m3 * N * N + a_idx, ua_ptr, seed, 0, HAS_UA)
        hard_a = _topk(pa, cand_a, a_idx, k_A, BLOCK_M, BITS_A).to(tl.float32)
        tl.store(ma_ptr + m3 * N * N + a_idx, hard_a, mask=in_nn & live)
        # --- factor mask, a [rows, BN, 1] tile ---
        e_idx = r
        cand_e = (r < N) & live
        le = tl.load(le_ptr + b3 * N + e_idx, mask=cand_e, other=0.0).to(tl.float32)
        pe = _noise_logits(le, cand_e, m3 * N + e_idx, ue_ptr, seed, e_rand_base, HAS_UE)
        hard_e = _topk(pe, cand_e, e_idx, k_e, BLOCK_M, BITS_E).to(tl.float32)
        tl.store(me_ptr + m3 * N + e_idx, hard_e, mask=cand_e)
        # --- S = I - (M_A * A)^T and S e* = M_e * z ---
        At = tl.load(A_ptr + a_idx, mask=in_nn, other=0.0).to(tl.float32)
        S = tl.where(r == c, 1.0, 0.0) - hard_a * At
        zmask = (r < N) & (dd < D) & live
        z = tl.load(z_ptr + b3 * N * D + r * D + dd, mask=zmask, other=0.0).to(tl.float32)
        X, _ = _solve(S, hard_e * z, z, N, BLOCK_M, BN, BD, False)
        tl.store(e_ptr + m3 * N * D + r * D + dd, X, mask=zmask)

    @triton.jit(do_not_specialize=["B", "n_samples", "N", "D", "seed", "e_rand_base", "n_blocks"])
    def _bwd_kernel(z_ptr, A_ptr, la_ptr, le_ptr, ua_ptr, ue_ptr,
                    e_ptr, ma_ptr, me_ptr, ge_ptr, gma_ptr, gme_ptr,
                    dz_ptr, dla_ptr, dle_ptr, dA_ptr,
                    B, n_samples, N, D, tau, seed, e_rand_base, n_blocks,
                    HAS_UA: tl.constexpr, HAS_UE: tl.constexpr,
                    HAS_GMA: tl.constexpr, HAS_GME: tl.constexpr, NEED_DA: tl.constexpr,
                    BLOCK_B: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.arange(0, BN)[None, :, None]
        c = tl.arange(0, BN)[None, None, :]
        dd = tl.arange(0, BD)[None, None, :]
        # A's own layout: tile[r, c] is entry (r, c)
        a_idx = r * N + c
        in_nn = (r < N) & (c < N)
        A = tl.load(A_ptr + a_idx, mask=in_nn, other=0.0).to(tl.float32)
        eye = tl.where(r == c, 1.0, 0.0)
        dA = tl.zeros([BLOCK_B, BN, BN], dtype=tl.float32)
        for blk in range(pid, n_blocks, tl.num_programs(0)):
            b = (blk * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
            live = (b < B)[:, None, None]
            b3 = b[:, None, None]
            cand_a = in_nn & (r != c) & live
            cand_e = (r < N) & live
            zmask = (r < N) & (dd < D) & live
            la = tl.load(la_ptr + b3 * N * N + a_idx, mask=cand_a, other=0.0).to(tl.float32)
            le = tl.load(le_ptr + b3 * N + r, mask=cand_e, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + b3 * N * D + r * D + dd, mask=zmask, other=0.0).to(tl.float32)
            dz = tl.zeros([BLOCK_B, BN, BD], dtype=tl.float32)
            dla = tl.zeros([BLOCK_B, BN, BN], dtype=tl.float32)
            dle = tl.zeros([BLOCK_B, BN, 1], dtype=tl.float32)
            for s in range(n_samples):
                m3 = b3 * n_samples + s
                soft_a = _softmax(_noise_logits(la, cand_a, m3 * N * N + a_idx, ua_ptr, seed, 0, HAS_UA), tau)
                soft_e = _softmax(_noise_logits(le, cand_e, m3 * N + r, ue_ptr, seed, e_rand_base, HAS_UE), tau)
                ma = tl.load(ma_ptr + m3 * N * N + a_idx, mask=in_nn & live, other=0.0).to(tl.float32)
                me = tl.load(me_ptr + m3 * N + r, mask=cand_e, other=0.0).to(tl.float32)
                g = tl.load(ge_ptr + m3 * N * D + r * D + dd, mask=zmask, other=0.0).to(tl.float32)
                e = tl.load(e_ptr + m3 * N * D + r * D + dd, mask=zmask, other=0.0).to(tl.float32)
                # S^T lambda = g, and dP = e* lambda^T = dL/d(mask_A * A)
                lam, dP = _solve(eye - ma * A, g, e, N, BLOCK_B, BN, BD, True)
                gma = A * dP
                if HAS_GMA:
                    gma += tl.load(gma_ptr + m3 * N * N + a_idx, mask=in_nn & live, other=0.0).to(tl.float32)
                gme = tl.sum(z * lam, axis=2)[:, :, None]
                if HAS_GME:
                    gme += tl.load(gme_ptr + m3 * N + r, mask=cand_e, other=0.0).to(tl.float32)
                dz += me * lam
                dla += soft_a * (gma - _sum12(soft_a * gma)[:, None, None])
                dle += soft_e * (gme - _sum12(soft_e * gme)[:, None, None])
                if NEED_DA:
                    dA += ma * dP
            tl.store(dz_ptr + b3 * N * D + r * D + dd, dz, mask=zmask)
            tl.store(dla_ptr + b3 * N * N + a_idx, dla / tau, mask=in_nn & live)
            tl.store(dle_ptr + b3 * N + r, dle / tau, mask=cand_e)
        if NEED_DA:
            r2 = tl.arange(0, BN)[:, None]
            c2 = tl.arange(0, BN)[None, :]
            tl.store(dA_ptr + pid * N * N + r2 * N + c2, tl.sum(dA, axis=0), mask=(r2 < N) & (c2 < N))


# ------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------

def _poisoned(shape, dtype, device):
    """Output buffers start as NaN so an element the kernel fails to write cannot go unnoticed."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _pow2(x):
    return triton.next_power_of_2(x)


def _rows_per_program(N, d):
    BN, BD = _pow2(N), _pow2(d)
    return max(1, min(64, TILE_ELEMENTS // (BN * max(BN, BD))))


def _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e, uniform_A, uniform_e, seed, block_m=None):
    B, N, d = z.shape
    S = n_samples
    e_star = _poisoned((B, S, N, d), z.dtype, z.device)
    mask_A = _poisoned((B, S, N, N), logits_A.dtype, z.device)
    mask_e = _poisoned((B, S, N), logits_e.dtype, z.device)
    if B == 0:
        return e_star, mask_A, mask_e
    BN, BD = _pow2(N), _pow2(d)
    block_m = block_m or _rows_per_program(N, d)
    n_rows = B * S
    grid = (triton.cdiv(n_rows, block_m),)
    _fwd_kernel[grid](
        z, A, logits_A, logits_e,
        uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
        e_star, mask_A, mask_e,
        n_rows, S, N, d, k_A, k_e, seed, B * S * N * N,
        HAS_UA=uniform_A is not None, HAS_UE=uniform_e is not None,
        BLOCK_M=block_m, BN=BN, BD=BD,
        BITS_A=(BN * BN).bit_length() - 1, BITS_E=BN.bit_length() - 1,
        num_warps=4)
    return e_star, mask_A, mask_e


def _backward(z, A, logits_A, logits_e, uniform_A, uniform_e, seed, tau,
              e_star, mask_A, mask_e, g_e, g_mA, g_me, need_dA, block_b=None):
    B, S, N, d = e_star.shape
    dev = z.device
    dz = _poisoned((B, N, d), torch.float32, dev)
    dla = _poisoned((B, N, N), torch.float32, dev)
    dle = _poisoned((B, N), torch.float32, dev)
    BN, BD = _pow2(N), _pow2(d)
    block_b = block_b or _rows_per_program(N, d)
    n_blocks = triton.cdiv(B, block_b)
    n_prog = max(1, min(n_blocks, MAX_BWD_PROGRAMS))
    dA_part = _poisoned((n_prog, N, N), torch.float32, dev) if need_dA else dz
    if B > 0:
        _bwd_kernel[(n_prog,)](
            z, A, logits_A, logits_e,
            uniform_A if uniform_A is not None else z, uniform_e if uniform_e is not None else z,
            e_star, mask_A, mask_e,
            g_e, g_mA if g_mA is not None else g_e, g_me if g_me is not None else g_e,
            dz, dla, dle, dA_part,
            B, S, N, d, float(tau), seed, B * S * N * N, n_blocks,
            HAS_UA=uniform_A is not None, HAS_UE=uniform_e is not None,
            HAS_GMA=g_mA is not None, HAS_GME=g_me is not None, NEED_DA=need_dA,
            BLOCK_B=block_b, BN=BN, BD=BD,
            num_warps=4)
    dA = None
    if need_dA:
        dA = dA_part.sum(0) if B > 0 else torch.zeros(N, N, dtype=torch.float32, device=dev)
    return dz, dA, dla, dle


class PersonalizedSCMFunction(torch.autograd.Function):
    """Fused forward and backward; the masks are differentiable outputs (straight-through)."""

    @staticmethod
    def forward(ctx, z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed,
                block_m=None):
        e_star, mask_A, mask_e = _forward(z, A, logits_A, logits_e, n_samples, k_A, k_e,
                                          uniform_A, uniform_e, seed, block_m)
        ctx.save_for_backward(z, A, logits_A, logits_e, uniform_A, uniform_e, e_star, mask_A, mask_e)
        ctx.tau, ctx.seed, ctx.block_m = tau, seed, block_m
        ctx.set_materialize_grads(False)
        return e_star, mask_A, mask_e

    @staticmethod
    def backward(ctx, g_e, g_mA, g_me):
        z, A, logits_A, logits_e, uniform_A, uniform_e, e_star, mask_A, mask_e = ctx.saved_tensors
        if g_e is None:
            g_e = torch.zeros_like(e_star)
        g_e = g_e.contiguous()
        g_mA = g_mA.contiguous() if g_mA is not None else None
        g_me = g_me.contiguous() if g_me is not None else None
        dz, dA, dla, dle = _backward(z, A, logits_A, logits_e, uniform_A, uniform_e, ctx.seed, ctx.tau,
                                     e_star, mask_A, mask_e, g_e, g_mA, g_me,
                                     need_dA=ctx.needs_input_grad[1], block_b=ctx.block_m)
        return (dz.to(z.dtype), dA.to(A.dtype) if dA is not None else None, dla.to(logits_A.dtype),
                dle.to(logits_e.dtype), None, None, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# Public function
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
    [B, S, N, N] and uniform_e [B, S, N] optionally fix the noise. Returns e_star [B, S, N, d],
    mask_A [B, S, N, N], mask_e [B, S, N]. With `seed` (and no uniforms) the noise is Philox
    drawn in the kernel and reproducible; without, the seed is drawn from torch's default
    generator (so torch.manual_seed makes runs reproducible).

    Runs the Triton kernels on CUDA tensors and, with TRITON_INTERPRET=1, on CPU tensors; other
    CPU tensors go to planrec.personalized_scm (with `seed`, its uniforms come from a
    torch.Generator seeded with it: reproducible, but not the kernel's Philox stream).
    Kernel limits: N <= 32, n_samples <= 16, float32 or bfloat16 (solved in float32); d is any
    size (a launch handles up to 64 columns; wider z runs as chunks that share the noise).
    """
    if not (z.is_cuda or _interpreting()) or triton is None:
        return _eager(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed)
    if z.device.type == "cpu" and not _fwd_kernel.__class__.__name__.startswith("Interpreted"):
        raise RuntimeError("TRITON_INTERPRET=1 was set after kernels.personalized_scm was imported; "
                           "set it before importing triton kernels")
    _check(z, A, logits_A, logits_e, n_samples, k_A, k_e, tau, uniform_A, uniform_e, seed)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    A, logits_A, logits_e, uniform_A, uniform_e = [
        t.contiguous() if t is not None else None for t in (A, logits_A, logits_e, uniform_A, uniform_e)]
    d = z.shape[-1]
    if d <= MAX_D:
        return PersonalizedSCMFunction.apply(z.contiguous(), A, logits_A, logits_e, n_samples, k_A, k_e,
                                             float(tau), uniform_A, uniform_e, seed)
    # Wider right-hand sides (the model solves the C candidates' factors as C*d columns): the
    # columns are independent solves with the same masks, so each chunk of <= MAX_D columns runs
    # the kernel with the same seed / uniforms, hence draws the same masks. The gradients for
    # logits and A add up over the chunks through autograd; the returned masks (and any upstream
    # gradient on them) are the first chunk's.
    outs = [PersonalizedSCMFunction.apply(zc.contiguous(), A, logits_A, logits_e, n_samples, k_A, k_e,
                                          float(tau), uniform_A, uniform_e, seed)
            for zc in z.tensor_split(-(-d // MAX_D), dim=-1)]
    return torch.cat([o[0] for o in outs], dim=-1), outs[0][1], outs[0][2]


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
