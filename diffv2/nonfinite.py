"""Non-finite steps: a NaN/Inf loss or grad norm is caught on the device and its optimizer step undone.

No host synchronisation: the flag, the run of consecutive bad steps and the skipped-step total live on the
device and are read with the other metrics at logging steps (`train/skipped_steps`, `train/nonfinite_streak`),
which is also when the trainer decides to stop. The undo is the spike monitor's (monitoring/skip_step.py):
parameters *and* optimizer state come back bit-identical, so when a stop saves a checkpoint, it holds the last
good state. Cost: one copy of the local parameters and optimizer state per step (~3x the parameter memory for
AdamW) and a few small kernels; trainer.nonfinite=ignore turns all of it off.
"""

from __future__ import annotations

from typing import Optional

import torch

from monitoring.skip_step import StepUndo


class NonFiniteGuard:
    def __init__(self, mode: str, max_bad_steps: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, undo: bool = True, engine_skips: bool = False):
        """`undo=False`: an engine whose optimizer state the undo cannot reach. Either it skips non-finite steps
        itself (`engine_skips`, DeepSpeed: a non-finite grad norm leaves parameters and state as they were), or we
        detect and count only: mode must then be stop, and the stop saves no checkpoint (the previous one holds the
        good state)."""
        self.mode = mode  # skip: stop after max_bad_steps in a row | stop: stop at the first
        self.limit = 1 if mode == "stop" else max_bad_steps
        assert undo or engine_skips or mode == "stop", "skipping a step needs the undo"
        self.undo = StepUndo(model, optimizer) if undo else None
        self.engine_skips = engine_skips
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.streak = torch.zeros_like(self.skipped)  # consecutive bad steps up to now
        self.longest = torch.zeros_like(self.skipped)  # longest streak since the last read

    def before_step(self) -> None:
        if self.undo is not None:
            self.undo.snapshot()

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Undo the optimizer step just taken if the loss or grad norm is not finite; return that flag (0-d bool)."""
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.undo is not None:
            bad = self.undo.restore_if(bad)
        self.skipped = self.skipped + bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        return bad

    def poisoned(self) -> bool:
        """Without the undo: did any step apply a non-finite update? (a host read; checkpoint steps only)"""
        return not self.engine_skips and bool(self.skipped.item() > 0)

    def metrics(self) -> dict:
        """Device values for this logging step; the next window's longest streak starts from the current one."""
        out = {"train/skipped_steps": self.skipped, "train/nonfinite_streak": self.longest}
        self.longest = self.streak
        return out

    def stop_reason(self, host_metrics: dict, step: int) -> Optional[str]:
        streak = int(host_metrics["train/nonfinite_streak"])
        if streak < self.limit:
            return None
        if self.mode == "stop":
            what, rule, fix = "a step", "trainer.nonfinite=stop", "set trainer.nonfinite=skip"
        else:
            what, rule, fix = f"{streak} steps in a row", f"trainer.max_bad_steps={self.limit}", "raise it"
        return (f"{what} up to step {step} had a non-finite loss or grad norm ({rule}); skipped, so the checkpoint "
                f"holds the last good parameters and optimizer state (lower optim.lr, check the data, or {fix})")

    def state_dict(self) -> dict:
        return {"skipped": int(self.skipped), "streak": int(self.streak)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped.fill_(state["skipped"])
        self.streak.fill_(state["streak"])
        self.longest.fill_(state["streak"])
