"""`trainer.bf16_weights=true`: bf16 copies of the matmul weights, cast once per optimizer step, not per micro-batch.

Under bf16 autocast each micro-batch casts every fp32 `nn.Linear` weight (and the MoE experts' grouped weights) to
bf16 in its forward, and autograd casts each bf16 weight gradient back to fp32 before adding it to `.grad`. With many
micro-batches per optimizer step these casts and adds are a fixed tax per micro-batch: ~8% of the step at 1b on an
H100 (bench/results/throughput-1b-H100.md).

With this switch the weights are cast once per optimizer step (`refresh`) into persistent bf16 leaf tensors, which
each micro-batch's forward *and* backward use in place of the fp32 parameters (`swapped`: the backward too, so an
activation-checkpointed block recomputes with the same weights), and after each backward the bf16 gradients are added
into the fp32 `.grad` in one pass each (`accumulate`). The arithmetic is autocast's: the same bf16 operands, the same
bf16 weight gradients, the same fp32 sums, so the training run is the same (tested bit for bit on CPU). Everything
else (clipping, optimizer, monitors, checkpoints) sees the fp32 parameters and gradients as before.

Scope: one process (plain tensors, trainer's single engine). Left out: the lm_head (the fused cross-entropy casts it
itself and keeps its gradient in fp32) and the MoE router (its logits are computed in fp32).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from diffv2.moe import GroupedExperts

KEEP_FP32 = ("lm_head", "router")  # module names whose weights are not replaced (see the module doc)


class ComputeWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
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
        self.copies = [p.detach().to(dtype).requires_grad_() for p in self.params]

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the current fp32 weights into the bf16 copies (after each optimizer step, before the next forward)."""
        torch._foreach_copy_(self.copies, [p.detach() for p in self.params])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the model's Linear weights are the bf16 copies (wrap a micro-batch's forward and backward)."""
        with _reparametrize_module(self.model, dict(zip(self.names, self.copies))):
            yield

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add each copy's bf16 gradient into its parameter's fp32 `.grad` (after each micro-batch's backward)."""
        for param, copy in zip(self.params, self.copies):
            if copy.grad is None:
                continue
            if param.grad is None:
                param.grad = copy.grad.to(param.dtype)
            else:
                param.grad.add_(copy.grad)
            copy.grad = None
