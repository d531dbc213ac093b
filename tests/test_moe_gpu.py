"""GPU checks of the MoE grouped-GEMM path (`pytest -m gpu`): the CPU tests force grouped_mm in fp32; here it runs
where it is used, in bf16 under autocast, against the per-expert loop in fp32.

Legend: S slots sorted by expert, M d_model, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffv2.config import MoEConfig
from diffv2.model.moe import GroupedExperts, MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
M, F_HIDDEN = 256, 128  # multiples of 16 bytes in bf16, as grouped_mm requires


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_auto_picks_grouped_mm_on_cuda():
    assert GroupedExperts(2, M, F_HIDDEN).use_grouped_mm(torch.zeros(1, M, device="cuda"))


def test_grouped_mm_bf16_matches_the_fp32_loop_forward_and_backward():
    torch.manual_seed(0)
    loop = GroupedExperts(8, M, F_HIDDEN, impl="loop").cuda()
    for p in loop.parameters():
        torch.nn.init.normal_(p, std=0.05)
    grouped = copy.deepcopy(loop)
    grouped.impl = "grouped_mm"
    tokens_E = torch.tensor([100, 0, 37, 64, 1, 200, 30, 80], device="cuda")
    x_SM = torch.randn(int(tokens_E.sum()), M, device="cuda")
    grad_SM = torch.randn_like(x_SM)
    x_ref, x_bf = x_SM.clone().requires_grad_(), x_SM.clone().requires_grad_()
    y_ref = loop(x_ref, tokens_E)
    (y_ref * grad_SM).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_bf = grouped(x_bf, tokens_E)
    (y_bf.float() * grad_SM).sum().backward()
    assert y_bf.dtype == torch.bfloat16 and rel_err(y_bf, y_ref) < 2e-2
    assert rel_err(x_bf.grad, x_ref.grad) < 2e-2
    for name in ("w1", "w2", "w3"):
        assert rel_err(getattr(grouped, name).grad, getattr(loop, name).grad) < 2e-2, name


def test_moe_layer_bf16_on_cuda_matches_fp32_loop():
    torch.manual_seed(0)
    ref = MoE(M, MoEConfig(n_experts=8, top_k=2, expert_hidden=F_HIDDEN, experts_impl="loop"), 0).cuda()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fast = copy.deepcopy(ref)
    fast.experts.impl = "auto"
    x_BNM = torch.randn(2, 64, M, device="cuda")
    y_ref = ref(x_BNM)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_fast = fast(x_BNM)
    assert fast.last_z_loss.dtype == torch.float32  # the router stays fp32 under autocast
    assert rel_err(y_fast, y_ref) < 3e-2
