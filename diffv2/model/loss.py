"""lm_head + cross-entropy (+ z-loss) in token chunks, gradients computed in the forward.

Full (tokens x vocab) fp32 logits are never materialised: each chunk's logits live only while its loss and
its gradients w.r.t. the hidden states and the lm_head weight are computed, so backward is a rescale.

Legend: T tokens, M d_model, V vocab.
"""

from __future__ import annotations

import functools

import torch


def _chunk_loss_and_grad(logits_CV, y_C, z_coef: float, inv_n: float):
    """(sum of ce, sum of lse^2, dloss/dlogits in the logits' dtype) for one chunk, math in fp32."""
    logits_CV32 = logits_CV.float()
    lse_C = torch.logsumexp(logits_CV32, dim=-1)
    ce_sum = (lse_C - logits_CV32.gather(1, y_C[:, None]).squeeze(1)).sum()
    # d(ce + z_coef * lse^2)/dlogits = softmax * (1 + 2 z_coef lse) - onehot, all over n tokens. The one-hot is a
    # comparison, not a scatter: the compiled chunk then writes the bf16 gradient in one pass, where a scatter made
    # it write and re-read the chunk's fp32 gradient (4 GB per 8192 tokens at a 128k vocabulary).
    onehot_CV = torch.arange(logits_CV.shape[1], device=y_C.device)[None, :] == y_C[:, None]
    grad_CV = torch.exp(logits_CV32 - lse_C[:, None]) * (1 + 2 * z_coef * lse_C)[:, None] - onehot_CV.float()
    return ce_sum, lse_C.square().sum(), (grad_CV * inv_n).to(logits_CV.dtype)


@functools.lru_cache(maxsize=None)
def _compiled_chunk():
    # One fused pass over the chunk's logits instead of ~6 memory-bound ones (the lm_head dominates small models).
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TM, weight_VM, labels_T, chunk: int, z_coef: float, compute_dtype):
        n = labels_T.numel()
        param_dtype = weight_VM.dtype
        # The weight's compute copy is made here, not by autocast: its gradient, accumulated over the chunks in fp32,
        # then goes to the (fp32) parameter as it is, instead of being rounded to bf16 and cast back.
        if compute_dtype is not None:
            weight_VM = weight_VM.to(compute_dtype)
        chunk_fn = _compiled_chunk() if h_TM.is_cuda else _chunk_loss_and_grad
        grad_h_TM = torch.empty_like(h_TM)
        grad_w_VM = None
        ce_sum = h_TM.new_zeros((), dtype=torch.float32)
        z_sum = h_TM.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            h_CM, y_C = h_TM[start : start + chunk], labels_T[start : start + chunk]
            ce_c, z_c, grad_CV = chunk_fn(h_CM @ weight_VM.t(), y_C, z_coef, 1.0 / n)
            ce_sum += ce_c
            z_sum += z_c
            grad_h_TM[start : start + chunk] = grad_CV @ weight_VM
            grad_w_chunk = grad_CV.t() @ h_CM
            grad_w_VM = grad_w_chunk.float() if grad_w_VM is None else grad_w_VM.add_(grad_w_chunk)
        ctx.save_for_backward(grad_h_TM, grad_w_VM.to(param_dtype))
        ce, z = ce_sum / n, z_sum / n
        ctx.mark_non_differentiable(ce, z)
        return ce + z_coef * z, ce, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_z):
        grad_h_TM, grad_w_VM = ctx.saved_tensors
        return (grad_h_TM * grad_loss.to(grad_h_TM.dtype), grad_w_VM * grad_loss.to(grad_w_VM.dtype),
                None, None, None, None)


def linear_cross_entropy(h_TM, weight_VM, labels_T, chunk: int = 8192, z_coef: float = 0.0):
    """Returns (loss = ce + z_coef * z, ce, z) as means over tokens; only `loss` carries gradients."""
    compute_dtype = None
    if torch.is_autocast_enabled(h_TM.device.type):
        compute_dtype = torch.get_autocast_dtype(h_TM.device.type)
        h_TM = h_TM.to(compute_dtype)
    with torch.autocast(h_TM.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h_TM, weight_VM, labels_T, chunk, z_coef, compute_dtype)
