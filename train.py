"""Train a DIFF V2 (or baseline) language model. `python train.py --help` lists every config group.

    python train.py                                  # tiny DIFF V2 on the shipped sample, CPU, minutes
    python train.py attention=baseline               # the same with standard attention
    python train.py -m attention=diffv2,baseline seed=0,1,2

Exit codes: 0 done; 2 refused at start-up (one `error:` line; an existing run directory is left as it was);
3 stopped mid-run (non-finite steps, a full disk; the line says which checkpoint holds the last good state);
4 another rank died or stalled (a collective timed out after parallel.timeout_s; trainer.resume=auto restarts
from the last checkpoint); 75 stopped by SIGUSR1/SIGTERM after saving a checkpoint (preemption; rerunning, or
SLURM's requeue, resumes). Under torchrun or srun each rank prints its own line, prefixed with its rank.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

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
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
HYDRA_BOILERPLATE = ("full_key:", "reference_type=", "object_type=", "See https://", "Config search path", "provider=")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(dcfg: DictConfig) -> dict:
    from diffv2.trainer import RunStopped, Trainer

    from diffv2 import preempt
    from diffv2.parallel import dist as pdist

    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        env = pdist.detect()
        validate(cfg, world_size=env.world_size)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        summary = Trainer(cfg, run_dir, record_yaml=OmegaConf.to_yaml(dcfg, resolve=True), env=env).run()
    except ValueError as e:  # user errors: one line, no traceback
        _fail(f"error: {e}", 2)
    except OSError as e:
        _fail(f"error: {e} (check the path, its permissions and the free space)", 2)
    except RunStopped as e:
        _fail(f"error: {e}", 3)
    except RuntimeError as e:
        if not pdist.is_peer_failure(e):
            raise
        _fail(f"error: {pdist.explain_timeout(e)}", 4)
    pdist.shutdown()
    if (code := preempt.exit_code()) is not None:  # stopped with a checkpoint by SIGUSR1/SIGTERM: run again to resume
        sys.exit(code)
    log.info(
        "done: train loss %.4f, validation loss %.4f | run dir %s | checkpoint %s | metrics %s",
        summary.get("train/loss", float("nan")), summary.get("train/val_loss", float("nan")),
        summary["run_dir"], summary.get("checkpoint"), summary["metrics"],
    )
    return summary


def _fail(message: str, code: int) -> None:
    """One line on stderr and exit. With a process group up, the group is left to die with the process: a
    clean shutdown would wait on the ranks that are still running."""
    from diffv2.parallel import dist as pdist

    if pdist.world_size() == 1:
        print(message, file=sys.stderr)
        sys.exit(code)
    print(f"[rank {pdist.rank()}] {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def compose_error(overrides: list[str]) -> Optional[str]:
    """Hydra reports a mistyped key, a wrong type or an unknown option over several lines; composing the same
    overrides here first reports them in one. Hydra flags (-m, --cfg, --help, ...) are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if any(arg.startswith("-") for arg in overrides):
        return None
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    except MissingConfigException as e:
        options = ", ".join(o for o in e.options or [] if o != "schema")
        return f"{str(e).splitlines()[0]} (options: {options})"
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
        lines = [ln.strip().rstrip(".") for ln in text.splitlines() if ln.strip()]
        message = "; ".join(ln for ln in lines if not ln.startswith(HYDRA_BOILERPLATE))
        key = getattr(e.__cause__ or e, "full_key", None)
        return message if not key or key in message else f"{key}: {message}"
    return None


if __name__ == "__main__":
    if problem := compose_error(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
