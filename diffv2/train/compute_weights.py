"""`trainer.bf16_weights=true`: bf16 copies of the matmul weights, cast once per optimizer step, not per micro-batch.

Under bf16 autocast each micro-batch casts every fp32 `nn.Linear` weight (and the MoE experts' grouped weights) to
bf16 in its forward, and autograd casts each bf16 weight gradient back to fp32 before adding it to `.grad`. With many
micro-batches per optimizer step these casts and adds are a fixed tax per micro-batch: ~8% of the step at 1b on an
H100 (bench/results/throughput-1b-H100.md).

With this switch the weights are cast once per optimizer step (`refresh`) into persistent bf16 tensors, which
each micro-batch's forward *and* backward use in place of the fp32 parameters (`swapped`: the backward too, so an
activation-checkpointed block recomputes with the same weights). Everything else (clipping, optimizer, monitors,
checkpoints) sees the fp32 parameters and gradients as before.

The weight gradients of the `nn.Linear` layers never exist in bf16: each layer's backward adds dY^T X straight into the
fp32 `.grad` (Megatron's gradient-accumulation fusion, `LinearIntoFP32Grad`). On CUDA that is one cuBLAS GEMM with
beta = 1 writing fp32 (`torch.addmm(..., out_dtype=torch.float32)`), which saves the bf16 gradient's write and read
and a separate fp32 add per micro-batch. It runs inside an opaque custom op (`diffv2::wgrad_into_`), so the compiler
keeps it one call. The product is then summed in fp32 without a rounding to bf16 in between, so it is at least as
precise as autocast's (whether this torch has that GEMM is probed once, when ComputeWeights is built:
`probe_fused_gemm`). On CPU, and on a torch without that GEMM, the op computes the bf16 product and adds it, which
is autocast's arithmetic exactly (tested bit for bit). The fp32 `.grad` of these layers is allocated at `refresh`
(zeros) when the step begins without one.

The MoE experts' grouped weights keep bf16 gradients, added into the fp32 `.grad` after each backward in one pass
each (`accumulate`); so do the Linear weights with `trainer.fused_wgrad=false` (`fused_wgrad=False` here).

Scope: one process (plain tensors, trainer's single engine). Left out: the lm_head (the fused cross-entropy casts it
itself and keeps its gradient in fp32) and the MoE router (its logits are computed in fp32).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from diffv2.model.moe import GroupedExperts

log = logging.getLogger(__name__)

KEEP_FP32 = ("lm_head", "router")  # module names whose weights are not replaced (see the module doc)


def probe_fused_gemm(device: torch.device) -> bool:
    """Whether this torch can add a bf16 GEMM into an fp32 tensor on `device` in one call
    (`torch.addmm(..., out_dtype=torch.float32)`): tried once on a tiny product, on CUDA only (False elsewhere), with
    one warning when it cannot."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    grad = torch.zeros(2, 2, device=device)
    ones = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(grad, ones.t(), ones, out_dtype=torch.float32, out=grad)
        problem = None if bool((grad == 2).all()) else f"wrong result {grad.tolist()}"
    except (RuntimeError, TypeError) as err:  # the GEMM is not in this torch
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
    if problem is not None:
        log.warning("bf16_weights: this torch cannot add a bf16 GEMM into fp32 (%s); weight gradients are "
                    "computed in bf16 and added (as autocast does)", problem)
    return problem is None


@torch.library.custom_op("diffv2::wgrad_into_", mutates_args=("grad_OI",))
def wgrad_into_(grad_OI: torch.Tensor, dy_TO: torch.Tensor, x_TI: torch.Tensor, fused: bool) -> None:
    """grad_OI (fp32) += dy_TO^T @ x_TI (bf16): one GEMM into fp32 on CUDA when `fused` (the result of
    `probe_fused_gemm`); else the bf16 product, then the add."""
    if fused and grad_OI.is_cuda:
        torch.addmm(grad_OI, dy_TO.t(), x_TI, out_dtype=torch.float32, out=grad_OI)
        return
    grad_OI.add_(dy_TO.t() @ x_TI)


@wgrad_into_.register_fake
def _(grad_OI, dy_TO, x_TI, fused) -> None:
    return None


class LinearIntoFP32Grad(torch.autograd.Function):
    """y = x W^T with bf16 W; backward returns dX and adds dW into `grad_OI` (the fp32 parameter's .grad) instead of
    returning it; `fused_gemm`: the addition is one GEMM into fp32 (see wgrad_into_). Legend: T tokens,
    I in_features, O out_features."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_OI: torch.Tensor, grad_OI: torch.Tensor,
                fused_gemm: bool = False) -> torch.Tensor:
        x_c = x.to(weight_OI.dtype)  # autocast's cast of the input
        ctx.save_for_backward(x_c, weight_OI, grad_OI)
        ctx.x_dtype, ctx.fused_gemm = x.dtype, fused_gemm
        return F.linear(x_c, weight_OI)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_c, weight_OI, grad_OI = ctx.saved_tensors
        dy = dy.to(weight_OI.dtype)
        wgrad_into_(grad_OI, dy.reshape(-1, dy.shape[-1]), x_c.reshape(-1, x_c.shape[-1]), ctx.fused_gemm)
        return (dy @ weight_OI).to(ctx.x_dtype), None, None, None


class FusedWgradLinear(nn.Linear):
    """The class ComputeWeights gives its bias-free Linear layers (same parameters and state dict): while swapped in
    (`wgrad_into` = the fp32 .grad) the weight gradient goes into that tensor; otherwise a plain Linear.
    `fused_gemm`: ComputeWeights' probe result, passed to the op."""

    wgrad_into: Optional[torch.Tensor] = None
    fused_gemm: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wgrad_into is None or not torch.is_grad_enabled():
            return F.linear(x, self.weight)
        return LinearIntoFP32Grad.apply(x, self.weight, self.wgrad_into, self.fused_gemm)


class ComputeWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype, fused_wgrad: bool = True,
                 fused_gemm: Optional[bool] = None):
        """`fused_gemm`: whether the fused Linear layers add their weight gradient by one GEMM into fp32; None: probe
        it (`probe_fused_gemm`) on the device of the model's parameters."""
        self.model = model
        if fused_gemm is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            fused_gemm = fused_wgrad and probe_fused_gemm(device)
        self.fused_gemm = bool(fused_gemm)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.linears: list[Optional[nn.Linear]] = []  # per entry: its nn.Linear (fused weight gradient) or None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.bias is None and name.rsplit(".", 1)[-1] not in KEEP_FP32:
                weights = {"weight": module.weight}
            elif isinstance(module, GroupedExperts):  # cast to the autocast dtype per micro-batch in its forward
                weights = {"w1": module.w1, "w3": module.w3, "w2": module.w2}
            else:
                continue
            for attr, param in weights.items():
                if param.requires_grad:
                    self.names.append(f"{name}.{attr}")
                    self.params.append(param)
                    self.linears.append(module if attr == "weight" and fused_wgrad else None)
        # bf16 copies: the Linear ones never get a gradient of their own (fused into the fp32 .grad)
        self.copies = [p.detach().to(dtype).requires_grad_(linear is None)
                       for p, linear in zip(self.params, self.linears)]
        for module in self.linears:
            if module is not None:
                module.__class__ = FusedWgradLinear  # its wgrad_into is the fp32 .grad while swapped in
                module.fused_gemm = self.fused_gemm

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the current fp32 weights into the bf16 copies (after each optimizer step, before the next forward);
        give each fused Linear's parameter a zero fp32 .grad if the step starts without one."""
        torch._foreach_copy_(self.copies, [p.detach() for p in self.params])
        for param, module in zip(self.params, self.linears):
            if module is not None and param.grad is None:
                param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the model's Linear weights are the bf16 copies (wrap a micro-batch's forward and backward), their
        weight gradients go into the parameters' fp32 .grad."""
        for param, module in zip(self.params, self.linears):
            if module is not None:
                if param.grad is None or param.grad.dtype != torch.float32 or not param.grad.is_contiguous():
                    raise RuntimeError(f"bf16_weights: {module.__class__.__name__} weight needs a contiguous fp32 "
                                       f".grad before its forward; call refresh() at the start of each step")
                module.wgrad_into = param.grad
        try:
            with _reparametrize_module(self.model, dict(zip(self.names, self.copies))):
                yield
        finally:
            for module in self.linears:
                if module is not None:
                    module.wgrad_into = None

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add each unfused copy's bf16 gradient (grouped experts) into its parameter's fp32 `.grad` (after each
        micro-batch's backward)."""
        for param, copy in zip(self.params, self.copies):
            if copy.grad is None:
                continue
            if param.grad is None:
                param.grad = copy.grad.to(param.dtype)
            else:
                param.grad.add_(copy.grad)
            copy.grad = None
