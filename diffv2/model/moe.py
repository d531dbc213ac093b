"""Mixture-of-experts FFN: token-choice top-k router, fine-grained SwiGLU experts, load balancing.

Single-device PyTorch: parallelism is applied from outside (diffv2/parallel/parallelize.py) through two seams:
`MoE.dispatch`, which runs expert-sorted tokens through the experts (`LocalDispatch` here; expert parallelism swaps
in an all-to-all dispatcher, diffv2/parallel/expert.py), and `MoE.count_reducer`, which sums the load-balancing token
counts over the data-parallel ranks.

Legend: T tokens, M d_model, E experts (local experts under EP), K top_k, A = T*K routing slots,
S slots kept after the capacity limit (sorted by expert), F expert hidden.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffv2.config import MoEConfig
from diffv2.model.ffn import SwiGLU

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as (E, in, out) stacks: one grouped GEMM per projection instead of E small ones."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # down (a residual output projection)

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.impl == "auto":
            # CPU grouped_mm has no fast kernel and its bf16 backward fails on zero-stride grads.
            return x.is_cuda and _grouped_mm is not None
        return self.impl == "grouped_mm"

    def forward(self, x_SM: torch.Tensor, tokens_E: torch.Tensor) -> torch.Tensor:
        if self.use_grouped_mm(x_SM):
            return self._grouped(x_SM, tokens_E)
        return self._loop(x_SM, tokens_E)

    def _grouped(self, x_SM, tokens_E):
        if _grouped_mm is None:
            raise ValueError("model.moe.experts_impl=grouped_mm needs torch.nn.functional.grouped_mm "
                             "(torch >= 2.8); use model.moe.experts_impl=loop")
        offs_E = tokens_E.cumsum(0).to(torch.int32)  # end row of each expert's group, stays on device
        dtype = torch.get_autocast_dtype(x_SM.device.type) if torch.is_autocast_enabled(x_SM.device.type) else None
        w1, w3, w2 = (w if dtype is None else w.to(dtype) for w in (self.w1, self.w3, self.w2))
        x_SM = x_SM if dtype is None else x_SM.to(dtype)  # grouped_mm is not on autocast's cast lists
        h_SF = F.silu(_grouped_mm(x_SM, w1, offs=offs_E)) * _grouped_mm(x_SM, w3, offs=offs_E)
        return _grouped_mm(h_SF, w2, offs=offs_E)

    def _loop(self, x_SM, tokens_E):
        """Reference path (and the CPU one): one SwiGLU per expert over its contiguous rows."""
        outs = [
            (F.silu(x_sM @ self.w1[e]) * (x_sM @ self.w3[e])) @ self.w2[e]
            for e, x_sM in enumerate(x_SM.split(tokens_E.tolist()))
        ]
        return torch.cat(outs) if outs else x_SM.new_zeros(0, self.w2.shape[-1])


class LocalDispatch:
    """The `MoE.dispatch` seam on one device. `plan` gets the counts per expert before the slots are gathered, so
    that a dispatcher can start what needs only them (expert parallelism: the count exchange and the copy of the
    split sizes to the host) while the gather and the shared expert are queued; here the plan is the counts."""

    def plan(self, tokens_E: torch.Tensor) -> torch.Tensor:
        return tokens_E

    def __call__(self, experts: GroupedExperts, x_SM: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        return experts(x_SM, plan)


def route(logits_TE: torch.Tensor, k: int, score: str, bias_E: Optional[torch.Tensor] = None):
    """(scores_TE, experts_TK, weights_TK): top-k of scores (+ bias, for selection only), weights renormalised."""
    scores_TE = logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E  # arXiv 2408.15664: bias never weights outputs
    experts_TK = select_TE.topk(k, dim=-1, sorted=False).indices
    weights_TK = scores_TE.gather(-1, experts_TK)
    return scores_TE, experts_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


def balanced_route(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts_TK, weights_TK) of forced balance (model.moe.force_balance, benchmarks only): slot a = t*k + j goes
    to expert a mod E, so every expert gets T*K/E slots (distinct experts per token when k <= E); the weights are the
    router's scores of those experts, renormalised, so the router still gets a gradient. Throughput then compares
    with peers that report forced-balance numbers (Megatron-Bridge); it is not a routing to train with."""
    t, n_experts = scores_TE.shape
    experts_TK = (torch.arange(t * k, device=scores_TE.device) % n_experts).view(t, k)
    weights_TK = scores_TE.gather(-1, experts_TK)
    return experts_TK, weights_TK / weights_TK.sum(-1, keepdim=True)


def load_balance_loss(scores_TE: torch.Tensor, tokens_E: torch.Tensor, k: int) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e = share of the T*K slots routed to e (no grad), P_e = mean normalised score of e.

    Equals 1 under perfect balance. tokens_E may be summed over the data-parallel ranks (global batch, Qwen3).
    """
    n_experts = scores_TE.shape[-1]
    f_E = tokens_E / tokens_E.sum().clamp_min(1)
    p_E = (scores_TE / scores_TE.sum(-1, keepdim=True)).mean(0)  # sigmoid scores do not sum to 1
    return n_experts * (f_E * p_E).sum()


class MoE(nn.Module):
    """Router + routed experts (+ shared experts); exposes `moe_stats` for monitoring/moe.py."""

    def __init__(self, d_model: int, cfg: MoEConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.n_experts, d_model, cfg.expert_hidden, cfg.experts_impl)
        hidden = cfg.n_shared_experts * cfg.expert_hidden  # n shared experts = one SwiGLU n times as wide
        self.shared_expert = SwiGLU(d_model, hidden) if hidden else None
        # Persistent: the bias is routing state that an exact resume must restore.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)  # monitor window
        self.register_buffer("load_since_update", torch.zeros(cfg.n_experts), persistent=False)  # bias update
        self.dispatch = LocalDispatch()
        self.expert_slice: Optional[tuple[int, int]] = None  # under expert parallelism: this rank's experts [lo, hi)
        # Sums a count tensor over the data-parallel ranks in place (global-batch balance, as Qwen3); None: this
        # rank's counts only. Set from outside when there are several ranks (diffv2/parallel/parallelize.py).
        self.count_reducer: Optional[Callable[[torch.Tensor], None]] = None
        self.router_loss: Optional[torch.Tensor] = None  # weighted aux + z loss of the last forward
        self.last_aux_loss = self.last_z_loss = None

    def reset_buffers(self) -> None:
        """Routing state back to its start (zeros), also after a meta-device build is materialised."""
        for buf in (self.expert_bias, self.tokens_per_expert, self.load_since_update):
            if not buf.is_meta:
                buf.zero_()

    @property
    def moe_stats(self) -> dict:
        """The monitoring contract (monitoring/moe.py); built on read so it follows .to(device)."""
        return {"tokens_per_expert": self.tokens_per_expert, "aux_loss": self.last_aux_loss,
                "z_loss": self.last_z_loss, "expert_bias": self.expert_bias}

    def forward(self, x_BNM: torch.Tensor) -> torch.Tensor:
        """Three stages: `front` (routing, the expert-sorted slots, the shared expert), `dispatch` (the slots through
        the experts), `back` (the weighted sum). Compiled as a whole block they trace as one graph; when the experts
        are an FSDP2 unit of their own, whose hooks no graph may hold, `front`, `back` and the experts' forward are
        compiled apart (diffv2/parallel/compile.py)."""
        x_TM, order_A, weights_TK, x_SM, plan, shared_TM = self.front(x_BNM)
        y_SM = self.dispatch(self.experts, x_SM, plan)
        return self.back(y_SM, order_A, weights_TK, shared_TM, x_TM).view_as(x_BNM)

    def front(self, x_BNM: torch.Tensor):
        """(x_TM, order_A, weights_TK, x_SM, plan, shared_TM): routing and its statistics, the slots sorted by
        expert and capped at the capacity, the dispatcher's plan, the shared expert's output (or None)."""
        x_TM = x_BNM.reshape(-1, x_BNM.shape[-1])
        dtype = torch.promote_types(x_TM.dtype, torch.float32)  # routing in fp32 (fp64 in gradient checks)
        with torch.autocast(x_TM.device.type, enabled=False):
            logits_TE = F.linear(x_TM.to(dtype), self.router.weight.to(dtype))
        bias_E = self.expert_bias if self.cfg.balance == "aux_free" else None
        scores_TE, experts_TK, weights_TK = route(logits_TE, self.top_k, self.cfg.router, bias_E)
        if self.cfg.force_balance:
            experts_TK, weights_TK = balanced_route(scores_TE, self.top_k)
        # Tokens per expert with a static shape (bincount's depends on the data: a graph break under compile);
        # integer counts, so the order of the additions cannot change them.
        experts_A = experts_TK.flatten()
        routed_E = torch.zeros(self.n_experts, dtype=torch.long, device=experts_A.device).scatter_add_(
            0, experts_A, torch.ones_like(experts_A)).float()
        self._account(logits_TE, scores_TE, routed_E)

        t = x_TM.shape[0]
        order_A = experts_A.argsort(stable=True)  # slots grouped by expert, token order within an expert
        tokens_E = routed_E.long()
        if self.cfg.capacity_factor > 0:
            capacity = math.ceil(self.cfg.capacity_factor * t * self.top_k / self.n_experts)
            first_E = tokens_E.cumsum(0) - tokens_E
            rank_A = torch.arange(order_A.numel(), device=x_TM.device) - first_E[experts_A[order_A]]
            order_A = order_A[rank_A < capacity]  # later tokens of an over-full expert are dropped
            tokens_E = tokens_E.clamp(max=capacity)
        plan = self.dispatch.plan(tokens_E)  # under EP: counts exchanged and split sizes copied while the rest queues
        x_SM = x_TM[order_A // self.top_k]
        shared_TM = self.shared_expert(x_TM) if self.shared_expert is not None else None
        return x_TM, order_A, weights_TK, x_SM, plan, shared_TM

    def back(self, y_SM, order_A, weights_TK, shared_TM, x_TM) -> torch.Tensor:
        """The experts' outputs un-sorted into (T, K) slots (dropped slots stay 0), weighted and summed: no atomics,
        deterministic; plus the shared expert's."""
        t, m = x_TM.shape
        y_AM = y_SM.new_zeros(t * self.top_k, m).index_copy(0, order_A, y_SM)
        y_TKM = y_AM.view(t, self.top_k, m)
        y_TM = (y_TKM * weights_TK.unsqueeze(-1).to(y_TKM.dtype)).sum(1).to(x_TM.dtype)
        return y_TM if shared_TM is None else y_TM + shared_TM

    def _account(self, logits_TE, scores_TE, routed_E) -> None:
        """Statistics and the router losses; the global-batch token counts come from every rank."""
        global_E = routed_E.clone()
        if self.count_reducer is not None:
            self.count_reducer(global_E)  # counts carry no gradient: a plain collective is enough
        aux = load_balance_loss(scores_TE, global_E, self.top_k)
        z = torch.logsumexp(logits_TE, dim=-1).square().mean()
        loss = self.cfg.z_loss_coef * z if self.cfg.z_loss_coef else z.new_zeros(())
        if self.cfg.balance == "aux_loss":
            loss = loss + self.cfg.aux_loss_coef * aux
        self._record(loss, aux, z, routed_E)

    def _record(self, loss, aux, z, routed_E) -> None:
        """Keep the router loss and statistics of the forward. Traced like the rest (a compiled block has one graph,
        fullgraph=True holds): a second run of the forward, activation checkpointing's recomputation, writes them
        again, and `forward_state_kept` undoes that."""
        self.last_aux_loss, self.last_z_loss = aux.detach(), z.detach()
        self.router_loss = loss
        if self.training:
            self.tokens_per_expert += routed_E
            self.load_since_update += routed_E

    @contextlib.contextmanager
    def forward_state_kept(self) -> Iterator[None]:
        """Whatever a forward inside writes is undone on exit. Activation checkpointing runs its recomputation in it
        (diffv2/parallel/activation_checkpoint.py): the recomputation runs the same ops as the forward, so that it
        saves the same tensors, but that router loss was already taken and those tokens already counted; keeping the
        recomputed loss would hold the recomputed block's graph alive until the next forward (~20 GiB per GPU on 30A3
        with 4 GPUs)."""
        kept = self.router_loss, self.last_aux_loss, self.last_z_loss
        counts = self.tokens_per_expert.clone(), self.load_since_update.clone()
        try:
            yield
        finally:
            self.router_loss, self.last_aux_loss, self.last_z_loss = kept
            with torch.no_grad():
                self.tokens_per_expert.copy_(counts[0])
                self.load_since_update.copy_(counts[1])

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing (arXiv 2408.15664): nudge under-loaded experts up, over-loaded ones down.

        Called after each optimizer step with the loads of every forward since the last call.
        """
        if self.cfg.balance == "aux_free":
            load_E = self.load_since_update
            if self.count_reducer is not None:
                self.count_reducer(load_E)  # every rank applies the same update
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()
