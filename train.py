"""Train a DIFF V2 (or baseline) language model. `python train.py --help` lists every config group.

    python train.py                                  # tiny DIFF V2 on the shipped sample, CPU, minutes
    python train.py attention=baseline               # the same with standard attention
    python train.py -m attention=diffv2,baseline seed=0,1,2
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffv2.config import Config, register_configs, validate

# megatron-core announces at import that optional NVIDIA extensions are absent; nothing here uses them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
register_configs()
log = logging.getLogger("train")
logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index step


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(dcfg: DictConfig) -> dict:
    from diffv2.record import write_record
    from diffv2.trainer import Trainer

    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        validate(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        trainer = Trainer(cfg, run_dir)
        write_record(run_dir, OmegaConf.to_yaml(dcfg, resolve=True))
        summary = trainer.run()
    except ValueError as e:  # user errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info(
        "done: train loss %.4f, validation loss %.4f | run dir %s | checkpoint %s | metrics %s",
        summary.get("train/loss", float("nan")), summary.get("train/val_loss", float("nan")),
        summary["run_dir"], summary.get("checkpoint"), summary["metrics"],
    )
    return summary


if __name__ == "__main__":
    main()
