"""planrec.factor_mlps (g_vartheta of Eq. (8) and (14)), tuned for CPU.

The executable spec is `planrec.factor_mlps`: this file computes the same function, the same
operations in float arithmetic (the tests check the output and every gradient against it), with
the same signature, so PlanRec(cfg, factor_mlps_fn=kernels.factor_mlps) swaps it in.

What it computes
----------------
For every factor i (child) and row m (an element of the broadcast batch, flattened):

    x[i, m, (j, d)] = coefficient[m, j, i] * e[m, j, d]        # factor i's parent-masked input
    e_hat[m, i]     = b2[i] + gelu(b1[i] + x[i, m] @ w1[i]) @ w2[i]

Why it is faster on CPU than the spec
-------------------------------------
The spec materializes x, N x M x N*d floats: 67 MB in the personalized branch at the ML-1M batch
(M = B * N_m * C rows), and autograd keeps it for the backward of the first matmul and builds
more tensors of that size there (the gradient of x, the broadcast products of coefficient and e).
A tensor that size lives outside every cache, and above glibc's mmap threshold each allocation
of it is page-faulted in afresh. Here the first layer is one autograd.Function that builds x
G_CHUNK_ROWS rows at a time (2 MiB at N = d = 8, which stays in cache), multiplies it at once,
and keeps nothing but its inputs: the backward rebuilds each chunk of x instead of storing it and
forms the gradients of coefficient and e chunk by chunk from the gradient of that chunk of x.
The loop is over chunks of rows, never over rows or factors. Measured in issue 12 (docs/RESULTS.md,
`python -m bench_train --parts`): the first layer went from 141 ms to 96 ms forward + backward,
and the personalized training step 1.37x faster.
"""

import torch
import torch.nn.functional as F

# Rows of g's first layer per chunk: the parent-masked inputs of a chunk (N x rows x N*d floats,
# 2 MiB at N = d = 8) stay in the CPU's cache, where the whole [N, M, N*d] tensor of the
# personalized branch (67 MB at the ML-1M batch) would not, and would be page-faulted in afresh on
# every allocation (issue 12; `python -m bench_train` measures it).
G_CHUNK_ROWS = 1024


def _parent_masked(coef_t, e, rows):
    """x[i, m, (j, d)] = coef[m, j, i] e[m, j, d] for the rows m of one chunk: [N, rows, N*d]."""
    return (coef_t[:, rows, :, None] * e[rows]).flatten(2)


class _ParentMaskedLinear(torch.autograd.Function):
    """The first layer of every factor's g at once: pre[i, m] = b1[i] + sum_j coef[m, j, i] (e[m, j] @ W1[i, j]).

    The parent-masked inputs x[i, m, (j, d)] = coef[m, j, i] e[m, j, d] are built and used one
    chunk of G_CHUNK_ROWS rows at a time, forward and backward (which rebuilds them rather than
    keeping them): the same numbers as one big batched matmul, with the memory traffic kept in
    cache. Backward: grad W1 = x^T grad_pre, grad x = grad_pre W1^T, then grad coef (a sum over d)
    and grad e (a sum over the children) from grad x."""

    @staticmethod
    def forward(ctx, coef_t, e, w1, b1):
        """coef_t [N(child), M, N(parent)], e [M, N, d], w1 [N, N*d, H], b1 [N, 1, H] -> [N, M, H]."""
        N, M, _ = coef_t.shape
        pre = torch.empty(N, M, w1.shape[-1], dtype=e.dtype, device=e.device)
        for start in range(0, M, G_CHUNK_ROWS):       # chunks of rows, not a loop over rows
            rows = slice(start, start + G_CHUNK_ROWS)
            pre[:, rows] = torch.baddbmm(b1, _parent_masked(coef_t, e, rows), w1)
        ctx.save_for_backward(coef_t, e, w1)
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        coef_t, e, w1 = ctx.saved_tensors
        N, M, _ = coef_t.shape
        d = e.shape[-1]
        need_coef, need_e, need_w1, need_b1 = ctx.needs_input_grad
        grad_coef_t = torch.empty_like(coef_t) if need_coef else None
        grad_e = torch.empty_like(e) if need_e else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = grad_pre.sum(1, keepdim=True) if need_b1 else None
        w1_t = w1.transpose(1, 2).contiguous()
        for start in range(0, M, G_CHUNK_ROWS):
            rows = slice(start, start + G_CHUNK_ROWS)
            grad_chunk, e_chunk, coef_chunk = grad_pre[:, rows], e[rows], coef_t[:, rows, :, None]
            if need_w1:
                grad_w1.baddbmm_(_parent_masked(coef_t, e, rows).transpose(1, 2), grad_chunk)
            if need_coef or need_e:
                grad_x = torch.bmm(grad_chunk, w1_t).unflatten(-1, (N, d))      # [N(child), rows, N, d]
                if need_coef:       # sum over d of grad x * e (einsum measured faster than product + sum)
                    grad_coef_t[:, rows] = torch.einsum("imjd,mjd->imj", grad_x, e_chunk)
                if need_e:          # sum over children of coef * grad x
                    grad_e[rows] = (grad_x * coef_chunk).sum(0)
        return grad_coef_t, grad_e, grad_w1, grad_b1


def factor_mlps(coefficient, e, w1, b1, w2, b2):
    """planrec.factor_mlps, with the first layer in chunks; same signature and numbers.

    coefficient [..., N(parent), N(child)] (A, or a masked A); e [..., N, d]; w1 [N, N*d, H],
    b1 [N, 1, H], w2 [N, H, d], b2 [N, 1, d]. Returns e-hat [..., N, d]."""
    N, d = e.shape[-2:]
    batch = torch.broadcast_shapes(coefficient.shape[:-2], e.shape[:-2])
    coef_t = coefficient.expand(*batch, N, N).reshape(-1, N, N).permute(2, 0, 1).contiguous()
    rows = e.expand(*batch, N, d).reshape(-1, N, d).contiguous()
    h = F.gelu(_ParentMaskedLinear.apply(coef_t, rows, w1, b1))     # [N, M, H]
    out = torch.baddbmm(b2, h, w2)                                  # [N, M, d]
    return out.transpose(0, 1).reshape(*batch, N, d)
