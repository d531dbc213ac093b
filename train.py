"""Train a DIFF V2 (or baseline) language model. `python train.py --help` lists every config group.

    python train.py                                  # tiny DIFF V2 on the shipped sample, CPU, minutes
    python train.py attention=baseline               # the same with standard attention
    python train.py -m attention=diffv2,baseline seed=0,1,2

Exit codes: 0 done (or already finished); 2 refused at start-up (one `error:` line; an existing run directory is
left as it was, a new one is not left behind); 3 stopped mid-run (non-finite steps, a full disk; the line says
which checkpoint holds the last good state); 4 another rank died or stalled (a collective timed out after
parallel.timeout_s; trainer.resume=auto restarts from the last checkpoint); 75 stopped by SIGUSR1/SIGTERM
(preemption; rerunning, or SLURM's requeue, resumes); 130 stopped by Ctrl-C (SIGINT), or aborted by a second
one. After 75 and 130 the newest checkpoint holds the step the run stopped at (a signal during start-up stops
before the first step, with nothing written). Under torchrun or srun each rank prints its own line, prefixed
with its rank; every rank exits with the same code.
"""

from __future__ import annotations

import os
import sys

from diffv2.train.signals import SignalLatch

# First, before the imports below (seconds of start-up): a SIGUSR1/SIGTERM/Ctrl-C from now on is recorded, and
# the run stops cleanly at its first step boundary instead of dying half-started.
SIGNALS = SignalLatch().install() if __name__ == "__main__" else None

import logging  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from diffv2.config import Config, register_configs, run_name_problem, unknown_keys  # noqa: E402
from diffv2.train.validate import validate  # noqa: E402
from monitoring.build import schema  # noqa: E402 - each monitor's config keys (monitoring/<name>.py)

# megatron-core announces at import that optional NVIDIA extensions are absent; nothing here uses them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
CONFIG = register_configs(monitoring=schema())  # the Config class a composed config becomes
log = logging.getLogger("train")
logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index step
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
HYDRA_BOILERPLATE = ("full_key:", "reference_type=", "object_type=", "See https://", "Config search path", "provider=")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(dcfg: DictConfig) -> dict:
    from diffv2.train.trainer import RunStopped, Trainer

    from diffv2.parallel import dist as pdist
    from diffv2.train.sink import wandb_problem
    from monitoring.build import instrumentation  # the composition root: the core never imports monitoring/

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not any(run_dir.iterdir())  # Hydra has just created it (or it was empty): a refused start removes it
    if SIGNALS is not None:  # what the abort line of a second Ctrl-C says
        SIGNALS.abort_note = lambda: _newest_checkpoint(run_dir)
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        env = pdist.detect()
        validate(cfg, world_size=env.world_size)
        if problem := wandb_problem(cfg.logging.wandb):
            raise ValueError(problem)
        summary = Trainer(cfg, run_dir, record_yaml=OmegaConf.to_yaml(dcfg, resolve=True), env=env,
                          signals=SIGNALS, instrumentation=instrumentation()).run()
    except ValueError as e:  # user errors: one line, no traceback
        _fail(f"error: {e}", 2, run_dir if fresh else None)
    except OSError as e:
        _fail(f"error: {e} (check the path, its permissions and the free space)", 2, run_dir if fresh else None)
    except RunStopped as e:
        _fail(f"error: {e}", 3)
    except RuntimeError as e:
        if not pdist.is_peer_failure(e):
            raise
        _fail(f"error: {pdist.explain_timeout(e, dcfg.parallel.timeout_s)}", 4)
    pdist.shutdown()
    if summary.get("started") is False and fresh:
        _remove_fresh(run_dir)  # stopped by a signal before the first step: leave nothing behind
    if (code := summary.get("exit_code")) is not None:  # stopped by a signal: run again to resume
        sys.exit(code)
    if "already_finished" in summary:
        losses = ", ".join(f"{name} {summary[key]:.4f}" for key, name in (("train/loss", "train loss"),
                           ("train/val_loss", "validation loss")) if key in summary) or "no losses logged"
        log.info("already finished at step %d: %s | run dir %s | checkpoint %s | metrics %s (raise trainer.max_steps "
                 "to train longer)", summary["already_finished"], losses, summary["run_dir"], summary.get("checkpoint"),
                 summary["metrics"])
        return summary
    log.info(
        "done: train loss %.4f, validation loss %.4f | run dir %s | checkpoint %s | metrics %s",
        summary.get("train/loss", float("nan")), summary.get("train/val_loss", float("nan")),
        summary["run_dir"], summary.get("checkpoint"), summary["metrics"],
    )
    return summary


def _newest_checkpoint(run_dir: Path) -> str:
    from diffv2.train import checkpoint

    found = checkpoint.list_checkpoints(run_dir / "checkpoints")
    return (f"the newest checkpoint {found[-1]} is intact (checkpoints are renamed into place only when complete); "
            f"rerun to resume" if found else "no checkpoint had been saved yet")


def _remove_fresh(run_dir: Path) -> None:
    """Remove a run directory this start created, if it holds nothing but a run lock that nobody holds (never
    anyone's files). Rank 0 only: the ranks share the directory."""
    from diffv2.train.run_lock import remove_unheld

    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    try:
        remove_unheld(run_dir)
        run_dir.rmdir()
    except OSError:
        pass


def _fail(message: str, code: int, remove: Optional[Path] = None) -> None:
    """One line on stderr and exit; `remove`: a run directory this start created, removed if it holds nothing but
    the lock. With a process group up, the process exits at once (os._exit): a clean shutdown would wait on the
    ranks that are still running."""
    from diffv2.parallel import dist as pdist

    if remove is not None:
        _remove_fresh(remove)
    if pdist.world_size() == 1:
        print(message, file=sys.stderr)
        sys.exit(code)
    print(f"[rank {pdist.rank()}] {message}" if pdist.world_size() > 1 else message, file=sys.stderr, flush=True)
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
    for arg in overrides:  # Hydra's lexer reports these as "LexerNoViableAltException: ...; ^"
        if not arg.isascii() and "'" not in arg and '"' not in arg:
            key = arg.split("=", 1)[0]
            return (f"{arg}: a value with non-ASCII characters must be quoted for Hydra ({key}='...')"
                    + ("; run names are limited to ASCII letters, digits and . _ + - anyway" if key == "run_name"
                       else ""))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    except MissingConfigException as e:
        options = ", ".join(o for o in e.options or [] if o not in ("schema", "suite"))
        return f"{str(e).splitlines()[0]} (options: {options})"
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        text = "\n".join(str(x) for x in (e, e.__cause__) if x is not None)
        if missing := re.search(r"Environment variable '(\w+)' not found", text):
            key = getattr(e.__cause__ or e, "full_key", None) or "a config value"
            also = " or DIFFV2_CACHE=DIR" if key == "data.cache_dir" else ""
            return (f"{key}: the environment variable {missing.group(1)} is not set and {key} defaults to a path "
                    f"under it; set {missing.group(1)}{also}, or give {key}=DIR")
        lines = [ln.strip().rstrip(".") for ln in text.splitlines() if ln.strip()]
        message = "; ".join(ln for ln in lines if not ln.startswith(HYDRA_BOILERPLATE))
        key = getattr(e.__cause__ or e, "full_key", None)
        return message if not key or key in message else f"{key}: {message}"
    if unknown := unknown_keys(composed, CONFIG):
        return (f"unknown config key {unknown[0]} (from an override with '+'; the schema in diffv2/config.py and the "
                f"monitors' in monitoring/ have no such key): check its spelling, `python train.py --cfg job` lists "
                f"every key")
    return run_name_problem(composed["run_name"])


def help_text() -> str:
    """`python train.py --help`: the training config groups and their options (the schema entries and the
    experiment-suite group, which are not training choices, left out), then where every key is documented."""
    lines = [__doc__.split("\n\n")[0], "", "Config groups (group=option; the first is the default):"]
    defaults = {k: v for d in OmegaConf.load(CONFIG_DIR / "config.yaml").defaults if isinstance(d, (dict, DictConfig))
                for k, v in d.items()}
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "suite")):
        options = sorted(p.stem for p in group.glob("*.yaml") if p.stem != "schema")
        first = defaults.get(group.name)
        options = ([first] if first in options else []) + [o for o in options if o != first]
        prefix = "+experiment" if group.name == "experiment" else group.name
        lines.append(f"  {prefix}: {', '.join(options)}")
    lines += ["", "Any key can be set too (trainer.max_steps=1000, model.attention.doc_mask=true): every key, its type,",
              "default and meaning is in diffv2/config.py; `python train.py --cfg job` prints the composed config.",
              "Sweeps: -m (Hydra multirun); suites of runs: python -m launch.suite (configs/suite/); SLURM: python -m",
              "launch.slurm; Hydra's own flags: python train.py --hydra-help.", "",
              __doc__[__doc__.index("Exit codes:"):].strip()]
    return "\n".join(lines)


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    if problem := compose_error(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
