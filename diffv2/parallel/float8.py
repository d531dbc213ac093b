"""`trainer.fp8`: the large dense matmuls in FP8 through torchao's `Float8Linear`, applied to the single-device model
from outside (step 0 of diffv2/parallel/parallelize.py, before any parallelism, as torchao documents: convert, then
tensor parallelism, then FSDP2).

Which layers: `fp8_filter(recipe)`, a pure function of (module, name) (no torchao needed to test it). A layer is
converted when it is an `nn.Linear` the model calls as a module, both its sizes are multiples of 16 (the FP8 GEMM's
requirement), and it is large enough to gain (torchao's H100 thresholds, `fp8_gains`). Never converted:
- `lambda_proj` (DIFF V2, D -> h): tiny, and lambda weighs the subtraction (spec §2.2), which A5 keeps in fp32;
- `lm_head`: the fused chunked cross-entropy (diffv2/model/loss.py) multiplies by its weight directly, so a
  Float8Linear there would never run; its gradient stays fp32 as it is;
- the MoE `router`: its logits are computed in fp32 from the weight (diffv2/model/moe.py).
The MoE routed experts stay bf16: torchao 0.18's FP8 grouped GEMM (prototype/moe_training) needs the expert weights
stored column-major per expert, (E, out, in) used transposed, where GroupedExperts stores (E, in, out); changing that
layout changes the checkpoints. Shared experts are plain SwiGLU layers and convert like the dense FFN.

Checkpoints do not change: a Float8Linear keeps the high-precision `weight` under the same name, dtype and shape, and
casts it to FP8 in each forward, so a run resumes with trainer.fp8 switched on or off.

FSDP2 with `tensorwise`: the weights are all-gathered in FP8 (`enable_fsdp_float8_all_gather`, half the bytes of
bf16). Each weight's scale then needs its global amax; `precompute_float8_dynamic_scale_for_fsdp` computes all of
them with one all-reduce. torchtitan calls it after the optimizer step; here a step can be undone after it
(trainer.nonfinite=skip restores the weights, diffv2/train/step_undo.py), which would leave scales computed from the
discarded (possibly non-finite) weights. So it runs where the scales are used: at the start of every forward (a
pre-hook on the embedding, the first module the model calls, before any block gathers its weights), from the weights
that forward gathers. Without it torchao would all-reduce each weight's amax separately at every gather.

Tensor parallelism: the FP8 layers are sharded by the usual plan (diffv2/parallel/tensor.py). A tensorwise scale is
the amax of the whole DTensor (a one-number all-reduce over the TP ranks), a rowwise scale covers rows the shard
holds whole, so every cast equals one rank's (tests/test_fp8.py, 2 gloo ranks, emulated). FSDP2 then gathers the TP
shards in bf16: the FP8 all-gather is used without TP only (torchao's 2-D FP8 all-gather is not tested here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections import Counter
from typing import Callable

import torch
from torch import nn

from diffv2.model.moe import MoE

log = logging.getLogger(__name__)

KEEP_BF16 = ("lambda_proj", "lm_head", "router")  # module names never converted (see the module doc)


def fp8_compatible(module: nn.Module, fqn: str) -> bool:
    """May this layer run in FP8 at all: a module-called nn.Linear, not one of KEEP_BF16, sizes multiples of 16."""
    if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] in KEEP_BF16:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def fp8_gains(recipe: str, in_features: int, out_features: int) -> bool:
    """Is a (tokens x in) @ (in x out) GEMM large enough for FP8 to beat bf16 once the casts are paid: torchao 0.18's
    thresholds from H100 benchmarks (torchao/float8/float8_linear_utils.py, `_auto_filter_for_<recipe>`)."""
    k, n = in_features, out_features
    if recipe == "tensorwise":
        return k > 4096 or n > 1024
    return n > 2048 and k > 1024 and not (n <= 4096 and k <= 2048)  # rowwise


def fp8_filter(recipe: str) -> Callable[[nn.Module, str], bool]:
    """The `module_filter_fn(module, fqn)` of `convert_to_float8_training` for trainer.fp8=`recipe`."""
    def wanted(module: nn.Module, fqn: str) -> bool:
        return fp8_compatible(module, fqn) and fp8_gains(recipe, module.in_features, module.out_features)

    return wanted


def check_fp8(recipe: str, device: torch.device) -> None:
    """What the config cannot show (diffv2/train/validate.py checks the rest): torchao is installed and `device` is
    an SM89+ GPU (FP8 tensor cores: Ada, Hopper and later). Nothing to check with trainer.fp8=off."""
    if recipe == "off":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"trainer.fp8={recipe} needs torchao: install the fp8 extra: pip install -e '.[fp8]'")
    if device.type != "cuda":
        raise ValueError(f"trainer.fp8 needs an H100-class GPU (SM89+); this run is on {device.type}: set "
                         f"trainer.fp8=off")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"trainer.fp8 needs an H100-class GPU (SM89+); {torch.cuda.get_device_name(device)} is "
                         f"SM{major}{minor}: set trainer.fp8=off")


def float8_config(recipe: str, fsdp: bool):
    """torchao's Float8LinearConfig for `recipe`; with FSDP2, tensorwise weights are all-gathered in FP8 (torchao
    supports that for tensorwise scales only)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")


def convert(model: nn.Module, config, module_filter: Callable[[nn.Module, str], bool]) -> list[str]:
    """Swap the Linear layers `module_filter` picks for Float8Linear (in place); returns their names."""
    from torchao.float8 import convert_to_float8_training

    chosen = [fqn for fqn, module in model.named_modules() if module_filter(module, fqn)]
    convert_to_float8_training(model, module_filter_fn=module_filter, config=config)
    return chosen


def apply_float8(model: nn.Module, recipe: str, device: torch.device, fsdp: bool, compiled: bool) -> None:
    """Step 0 of parallelize: convert `model`'s large dense layers for trainer.fp8=`recipe` (see the module doc).
    `fsdp`: FSDP2 will shard the model (tensorwise weights are then gathered in FP8)."""
    check_fp8(recipe, device)
    config = float8_config(recipe, fsdp)
    chosen = convert(model, config, fp8_filter(recipe))
    _log_conversion(model, recipe, set(chosen))
    if not compiled:
        log.warning("trainer.fp8=%s without trainer.compile: the FP8 casts run as separate kernels and are usually "
                    "slower than bf16; set trainer.compile=true", recipe)
    if config.enable_fsdp_float8_all_gather:
        model.embed.register_forward_pre_hook(lambda module, args: refresh_scales(model))


def refresh_scales(model: nn.Module) -> None:
    """The FP8 all-gather scales of every converted weight from its current values, one all-reduce for all."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)


def _log_conversion(model: nn.Module, recipe: str, chosen: set[str]) -> None:
    """One line: which kinds of Linear run in FP8 and which stay bf16 (by module name, counted over the blocks)."""
    converted, kept = Counter(), Counter()
    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (converted if fqn in chosen else kept)[fqn.rsplit(".", 1)[-1]] += 1
    log.info("trainer.fp8=%s: %d Linear layers in FP8 (%s); bf16: %s", recipe, len(chosen), _counts(converted),
             _counts(kept))
    if any(isinstance(module, MoE) for module in model.modules()):
        log.info("trainer.fp8=%s: the MoE routed experts' grouped GEMMs stay bf16 (torchao 0.18's FP8 grouped GEMM "
                 "needs per-expert column-major weights)", recipe)


def _counts(names: Counter) -> str:
    return ", ".join(f"{name} x{n}" for name, n in names.items()) or "none"
