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
(M = B * N_m * C rows), and autograd keeps it, the hidden layer before and after GELU and the
gradients of each (16.8 MB apiece), every one of them written to memory and read back. Tensors that
size live outside every cache, and above glibc's mmap threshold each allocation is page-faulted
in afresh. Here the whole g is one autograd.Function that runs G_CHUNK_ROWS rows at a time (x of a
chunk is 2 MiB at N = d = 8, which stays in cache) through both layers, forward and backward, and
keeps only its inputs and the first layer's pre-activation: the backward rebuilds each chunk of x
and its GELU instead of storing them, and forms every gradient of the chunk while it is in cache.
The loop is over chunks of rows, never over rows or factors. Measured: issue 12 chunked the first
layer alone (the personalized training step 1.37x faster); issue 18's second round took in the
GELU, the second layer and their backward (docs/RESULTS.md, "g fused in chunks").
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


class _FactorMLPs(torch.autograd.Function):
    """Every factor's g at once, in chunks of G_CHUNK_ROWS rows through both layers:
    pre[i, m] = b1[i] + sum_j coef[m, j, i] (e[m, j] @ W1[i, j]);  out[i, m] = b2[i] + gelu(pre[i, m]) @ W2[i].

    The same numbers as the spec's batched matmuls, with the memory traffic kept in cache. Backward,
    per chunk: grad W2 = gelu(pre)^T grad_out, grad pre = gelu'(pre) * (grad_out W2^T), grad W1 =
    x^T grad_pre, grad x = grad_pre W1^T, then grad coef (a sum over d) and grad e (a sum over the
    children) from grad x."""

    @staticmethod
    def forward(ctx, coef_t, e, w1, b1, w2, b2):
        """coef_t [N(child), M, N(parent)], e [M, N, d], w1 [N, N*d, H], b1 [N, 1, H], w2 [N, H, d],
        b2 [N, 1, d] -> [N, M, d]."""
        N, M, _ = coef_t.shape
        pre = torch.empty(N, M, w1.shape[-1], dtype=e.dtype, device=e.device)
        out = torch.empty(N, M, w2.shape[-1], dtype=e.dtype, device=e.device)
        for start in range(0, M, G_CHUNK_ROWS):       # chunks of rows, not a loop over rows
            rows = slice(start, start + G_CHUNK_ROWS)
            pre[:, rows] = torch.baddbmm(b1, _parent_masked(coef_t, e, rows), w1)
            out[:, rows] = torch.baddbmm(b2, F.gelu(pre[:, rows]), w2)
        ctx.save_for_backward(coef_t, e, w1, w2, pre)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        coef_t, e, w1, w2, pre = ctx.saved_tensors
        N, M, _ = coef_t.shape
        d = e.shape[-1]
        need_coef, need_e, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_coef_t = torch.empty_like(coef_t) if need_coef else None
        grad_e = torch.empty_like(e) if need_e else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = pre.new_zeros(N, 1, pre.shape[-1]) if need_b1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        grad_b2 = grad_out.sum(1, keepdim=True) if need_b2 else None
        w1_t, w2_t = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        first_layer = need_coef or need_e or need_w1 or need_b1
        for start in range(0, M, G_CHUNK_ROWS):
            rows = slice(start, start + G_CHUNK_ROWS)
            grad_chunk, pre_chunk = grad_out[:, rows], pre[:, rows]
            if need_w2:
                grad_w2.baddbmm_(F.gelu(pre_chunk).transpose(1, 2), grad_chunk)
            if not first_layer:
                continue
            grad_pre = torch.ops.aten.gelu_backward(torch.bmm(grad_chunk, w2_t), pre_chunk)   # [N, rows, H]
            if need_b1:
                grad_b1 += grad_pre.sum(1, keepdim=True)
            if need_w1:
                grad_w1.baddbmm_(_parent_masked(coef_t, e, rows).transpose(1, 2), grad_pre)
            if need_coef or need_e:
                grad_x = torch.bmm(grad_pre, w1_t).unflatten(-1, (N, d))      # [N(child), rows, N, d]
                if need_coef:       # sum over d of grad x * e (einsum measured faster than product + sum)
                    grad_coef_t[:, rows] = torch.einsum("imjd,mjd->imj", grad_x, e[rows])
                if need_e:          # sum over children of coef * grad x
                    grad_e[rows] = (grad_x * coef_t[:, rows, :, None]).sum(0)
        return grad_coef_t, grad_e, grad_w1, grad_b1, grad_w2, grad_b2


def factor_mlps(coefficient, e, w1, b1, w2, b2):
    """planrec.factor_mlps in chunks of rows through both layers; same signature and numbers.

    coefficient [..., N(parent), N(child)] (A, or a masked A); e [..., N, d]; w1 [N, N*d, H],
    b1 [N, 1, H], w2 [N, H, d], b2 [N, 1, d]. Returns e-hat [..., N, d]."""
    N, d = e.shape[-2:]
    batch = torch.broadcast_shapes(coefficient.shape[:-2], e.shape[:-2])
    coef_t = coefficient.expand(*batch, N, N).reshape(-1, N, N).permute(2, 0, 1).contiguous()
    rows = e.expand(*batch, N, d).reshape(-1, N, d).contiguous()
    out = _FactorMLPs.apply(coef_t, rows, w1, b1, w2, b2)          # [N, M, d]
    return out.transpose(0, 1).reshape(*batch, N, d)
