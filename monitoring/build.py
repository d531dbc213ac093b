"""Config -> the list of monitors the trainer drives, in hook order.

The spike monitor comes first so that a skipped step is undone before any other monitor reads parameters;
the throughput monitor comes last so that its step time includes the work of the monitors before it.
`instrumentation()` is what train.py (the composition root) hands the trainer: these monitors and the W&B heatmap
renderer (the core never imports monitoring/).
"""

from __future__ import annotations

from diffv2.train.callbacks import Callback, Instrumentation
from diffv2.config import MonitoringConfig
from monitoring.activations import ActivationMonitor
from monitoring.attention_logits import AttentionLogitMonitor
from monitoring.attention_sinks import AttentionSinkMonitor
from monitoring.context_rms import ContextRMSMonitor
from monitoring.grad_norms import GradNormMonitor
from monitoring.lambda_stats import LambdaMonitor
from monitoring.moe import MoEMonitor
from monitoring.perf import PerfMonitor
from monitoring.spikes import SpikeMonitor


def build_monitors(cfg: MonitoringConfig, log_interval: int = 10) -> list[Callback]:
    """The enabled monitors; `monitoring.enabled=false` leaves only the throughput monitor (if enabled)."""
    s, c = cfg.spikes, cfg.context_rms
    candidates = [
        (s.enabled, lambda: SpikeMonitor(s.interval, s.k, s.window, s.warmup_steps, s.score_window, s.skip_step,
                                         s.stop)),
        (cfg.grad_norms.enabled, lambda: GradNormMonitor(cfg.grad_norms.interval, cfg.grad_norms.param_norms,
                                                           cfg.grad_norms.update_sample)),
        (cfg.activations.enabled, lambda: ActivationMonitor(cfg.activations.interval, cfg.activations.top_k)),
        (c.enabled, lambda: ContextRMSMonitor(c.interval, c.heatmap_interval)),
        (cfg.lambdas.enabled, lambda: LambdaMonitor(cfg.lambdas.interval, cfg.lambdas.heatmap_interval)),
        (cfg.attention_logits.enabled, lambda: AttentionLogitMonitor(cfg.attention_logits.interval)),
        (cfg.attention_sinks.enabled, lambda: AttentionSinkMonitor(cfg.attention_sinks.interval)),
        (cfg.moe.enabled, lambda: MoEMonitor(cfg.moe.interval)),
    ]
    monitors = [make() for enabled, make in candidates if enabled and cfg.enabled]
    if cfg.perf.enabled:
        monitors.append(PerfMonitor(cfg.perf.interval or log_interval))
    return monitors


def instrumentation() -> Instrumentation:
    """The monitors of cfg.monitoring and the W&B heatmap renderer, for Trainer(instrumentation=...)."""
    return Instrumentation(build_monitors=build_monitors, render_matrix=_heatmap)


def _heatmap(rows, key):
    from monitoring.plots import heatmap_image  # matplotlib only once W&B receives a matrix (as today)

    return heatmap_image(rows, key)
