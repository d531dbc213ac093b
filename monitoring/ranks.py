"""Per-head training-forward statistics over every rank, equal to what one process computes over the global batch.

Used by the context-RMS and lambda monitors. Each rank keeps, on the device, per-head token-weighted sums (and
its token counts) and optionally sample rows; on interval steps one all-gather, which every rank enters on the
same steps and which is queued without a host wait, collects them. Ranks are tp-innermost: rank d * tp + j holds
the contiguous head shard j of data-parallel group d, and a group's tp ranks saw the same tokens. Head shards of a
group are concatenated in order into the full head dimension; data-parallel groups are summed (sums, counts,
each group's tokens counted once) or stacked (sample rows).

Legend: G data-parallel groups, H local heads, K sample rows.
"""

from __future__ import annotations

import torch

from diffv2.parallel import dist as pdist


def _distributed() -> bool:
    return pdist.world_size() > 1


def gather_heads(tensors: list[torch.Tensor], tp: int = 1) -> list[torch.Tensor]:
    """Every rank's copy of each tensor (..., H), the last dim this rank's heads: (G, ..., tp * H) per tensor.

    One all-gather of the flattened tensors (same shapes and dtype on every rank); without a process group of
    more than one rank, `t[None]`."""
    import torch.distributed as dist

    if not _distributed():
        return [t[None] for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    world = pdist.world_size()
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    per_rank_GTF = torch.stack(gathered).view(world // tp, tp, -1)  # (dp groups, tp shards, flat)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        block = per_rank_GTF[:, :, offset : offset + n].reshape(world // tp, tp, *t.shape)  # (G, tp, ..., H)
        out.append(block.movedim(1, -2).reshape(world // tp, *t.shape[:-1], tp * t.shape[-1]))  # shards in order
        offset += n
    return out


def over_ranks(sums: list[torch.Tensor], counts: list[int], tp: int = 1,
               samples: list[torch.Tensor] = ()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-head means over every data-parallel rank's tokens, and the ranks' pooled sample rows.

    `sums[i]` (H_i local heads) are token-weighted sums over `counts[i]` tokens; `samples[j]` (K_j, H_j) are rows
    of per-head values (same K_j on every rank). Returns the full-head means (tp * H_i,) and the samples of all
    data-parallel groups stacked, (G * K_j, tp * H_j), in one all-gather."""
    if not _distributed():
        return [s / c for s, c in zip(sums, counts)], list(samples)
    if not sums and not samples:
        return [], []
    counts_T = [s.new_full((1,), float(c)) for s, c in zip(sums, counts)]  # filled on the device: no copy, no sync
    n = len(sums)
    gathered = gather_heads([*sums, *counts_T, *samples], tp)
    means = [s_GH.sum(0) / c_GT[:, 0].sum() for s_GH, c_GT in zip(gathered[:n], gathered[n : 2 * n])]
    pooled = [x.reshape(-1, x.shape[-1]) for x in gathered[2 * n :]]
    return means, pooled
