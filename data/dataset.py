"""Training/validation datasets over Megatron indexed data, read through megatron-core's GPTDataset.

Sample order is a pure function of (data files, tokenizer, seq_len, split, weights, seed, num_samples): megatron
shuffles documents and samples with `seed` and caches the resulting indices under `cfg.cache_dir/index`.
Data parallelism interleaves that global order: rank r of W reads global samples r, r+W, r+2W, ..., so each
micro-batch step of all ranks together consumes one contiguous block of the global order and a resumed run
continues exactly where the previous one stopped, whatever W was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Callable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from data.checks import check_index_cache, check_prefix, check_splits, check_weights, parse_split
from data.prepare import prepare
from data.tokenizer import Tokenizer, check_vocab  # noqa: F401  (re-exported: part of this module's API)

if TYPE_CHECKING:
    from diffv2.config import DataConfig

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "python_docs.jsonl.gz")


def ensure_sample(cache_dir: str, tokenizer: Tokenizer) -> str:
    """Prepare the shipped sample corpus for `tokenizer` under `cache_dir` once; return its prefix.

    The directory is keyed by the tokenizer and the corpus contents, built under a temporary name and renamed
    into place, so it is either complete or absent; concurrent callers (ranks) may race, and the loser's copy
    is discarded.
    """
    with open(SAMPLE_CORPUS, "rb") as f:
        corpus_digest = hashlib.sha256(f.read()).hexdigest()[:12]
    parent = os.path.join(cache_dir, "sample")
    final = os.path.join(parent, f"python_docs-{tokenizer.name}-{corpus_digest}")
    prefix = os.path.join(final, "python_docs")
    if os.path.isdir(final):
        return prefix
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared between users
    try:
        # In-process (workers=1): a spawned pool would re-import the caller's __main__ (the trainer); the sample
        # is small enough that this takes seconds.
        prepare([SAMPLE_CORPUS], os.path.join(tmp, "python_docs"), tokenizer.spec, workers=1, progress=False)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # anything but "another process finished first" is a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prefix


def resolve_prefixes(cfg: "DataConfig", tokenizer: Tokenizer) -> List[str]:
    """cfg.prefixes as absolute paths, or the shipped sample (prepared on first use) when none are given."""
    if cfg.prefixes:
        return [os.path.abspath(os.path.expanduser(p)) for p in cfg.prefixes]
    return [ensure_sample(cfg.cache_dir, tokenizer)]


class TokenDataset(Dataset):
    """One data-parallel rank's view of a megatron dataset; item i is global sample i*size + rank.

    Items are int64 token tensors [seq_len + 1]: inputs are tokens[:-1], labels tokens[1:].
    """

    def __init__(self, dataset: Dataset, data_parallel_rank: int = 0, data_parallel_size: int = 1) -> None:
        self.dataset = dataset
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return len(self.dataset) // self.data_parallel_size

    def global_view(self) -> "TokenDataset":
        """All samples in the global order (probe batches that must be the same on every rank)."""
        return TokenDataset(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        item = self.dataset[i * self.data_parallel_size + self.data_parallel_rank]
        # megatron splits the seq_len+1 tokens it read into shifted tokens/labels; undo that.
        return torch.cat((item["tokens"], item["labels"][-1:]))


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Run megatron's builder with a process group even in single-process runs.

    megatron-core 0.16's BlendedDataset calls torch.distributed.get_rank() on a cache miss without checking for
    a process group (0.19 checks). A private 1-rank gloo group on an in-memory store (no network, no ports)
    makes both versions take their rank-0 path; it is destroyed again before returning.
    """
    if dist.is_initialized():
        yield
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise ValueError(
            f"WORLD_SIZE={world_size} but torch.distributed is not initialized "
            "(call torch.distributed.init_process_group before build_datasets so ranks share the index cache)"
        )
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(
    cfg: "DataConfig",
    seed: int,
    tokenizer: Tokenizer,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    *,
    num_samples: Mapping[str, int],
) -> Tuple[TokenDataset, Optional[TokenDataset]]:
    """(train, valid) views for this rank; valid is None when cfg.split gives it weight 0.

    `num_samples` = {"train": n, "valid": m} counts samples over all ranks together; megatron draws as many
    epochs as needed to supply them. Every check that can fail runs before megatron builds anything.
    """
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be >= 1")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(
            f"data_parallel_rank={data_parallel_rank} is outside [0, data_parallel_size={data_parallel_size})"
        )
    sizes = [int(num_samples.get("train", 0)), int(num_samples.get("valid", 0)), 0]
    if min(sizes) < 0:
        raise ValueError(f"num_samples {dict(num_samples)} must be >= 0")
    parse_split(cfg.split)  # a bad split fails before the sample corpus is prepared
    prefixes = resolve_prefixes(cfg, tokenizer)
    check_weights(prefixes, cfg.weights)
    tokens_per_prefix = []
    for prefix in prefixes:
        lengths = check_prefix(prefix, tokenizer)
        check_splits(prefix, lengths, cfg.split, cfg.seq_len)
        tokens_per_prefix.append(float(lengths.sum()))
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    weights: Optional[List[float]] = None
    if len(prefixes) > 1:
        # Default weights = token counts; megatron's own "None" caps a blend at one epoch of its parts.
        weights = [float(w) for w in cfg.weights] if cfg.weights is not None else tokens_per_prefix

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=cfg.seq_len,
        blend=(prefixes, weights),
        split=cfg.split,
        path_to_cache=os.path.join(cfg.cache_dir, "index"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its own causal/document masks
    )
    quiet = logging.getLogger("megatron.core.datasets")
    if quiet.level == logging.NOTSET:  # its per-file INFO lines would flood the trainer's log; explicit levels win
        quiet.setLevel(logging.WARNING)
    check_index_cache(config.path_to_cache)  # megatron unpickles what is there (allow_pickle=True)
    with _process_group():
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return (
        TokenDataset(train, data_parallel_rank, data_parallel_size),
        None if valid is None else TokenDataset(valid, data_parallel_rank, data_parallel_size),
    )


def make_loader(
    ds: Dataset, micro_batch_size: int, start_sample: int = 0, num_workers: int = 0, seed: int = 0,
    worker_init_fn: Optional[Callable[[int], None]] = None,
) -> DataLoader:
    """Batches of int64 tokens [micro_batch_size, seq_len + 1] in a fixed order, starting at `start_sample`.

    `start_sample` is the number of samples already consumed, summed over data-parallel ranks (for a
    TokenDataset of W ranks it must be a multiple of W); the loader then yields exactly the tail of a full pass.
    A last partial batch is dropped so every step sees the same shape. `seed` seeds the loader's generator,
    which fixes worker seeds should a transform ever draw random numbers. `worker_init_fn` runs first in each
    worker (the trainer's makes workers ignore stop signals meant for the training process).
    """
    ranks = ds.data_parallel_size if isinstance(ds, TokenDataset) else 1
    if start_sample < 0 or start_sample % ranks:
        raise ValueError(
            f"start_sample={start_sample} must be a non-negative multiple of the data-parallel size {ranks}"
        )
    local_start = start_sample // ranks
    if local_start > len(ds):
        raise ValueError(
            f"start_sample={start_sample} is past the end of the dataset ({len(ds) * ranks} samples; "
            "build it with more num_samples)"
        )
    return DataLoader(
        ds,
        batch_size=micro_batch_size,
        sampler=range(local_start, len(ds)),  # fixed order: megatron already shuffled by seed
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
    )
