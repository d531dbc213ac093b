"""Non-finite steps: a NaN/Inf loss or grad norm is caught on the device and its optimizer step undone.

No host synchronisation: the flag, the run of consecutive bad steps and the skipped-step total live on the
device and are read with the other metrics at logging steps (`train/skipped_steps`, `train/nonfinite_streak`),
which is also when the trainer decides to stop. Parameters *and* optimizer state stay bit-identical across a
skipped step, so when a stop saves a checkpoint, it holds the last good state. Two ways, picked at construction:
- **fused** (fused Adam/AdamW on plain tensors: the single-device GPU default): the optimizer's own `found_inf`
  flag, set from the loss and the grad norm between clipping and the step (`gate`). The fused kernel then returns
  before touching anything. Cost: a few scalar kernels per step, no copies.
- **undo** (any other optimizer, sharded parameters): the spike monitor's snapshot (diffv2/train/step_undo.py):
  one copy of the local parameters and optimizer state per step (~3x the parameter memory for AdamW), written
  back where the flag is set.
trainer.nonfinite=ignore turns all of it off.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from diffv2.train.step_undo import StepUndo, agree, fused_skip_works


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
        self.optimizer = optimizer
        self.fused = undo and fused_skip_works(model, optimizer)
        self.undo = StepUndo(model, optimizer) if undo and not self.fused else None
        self._bad: Optional[torch.Tensor] = None  # the fused path's agreed flag, from gate() to after_step()
        self.engine_skips = engine_skips
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.streak = torch.zeros_like(self.skipped)  # consecutive bad steps up to now
        self.longest = torch.zeros_like(self.skipped)  # longest streak since the last read

    def before_step(self) -> None:
        if self.undo is not None:
            self.undo.snapshot()

    def gate(self, loss: torch.Tensor) -> Optional[Callable[[torch.Tensor], None]]:
        """The fused path's hook, for the engine to call with the grad norm between clipping and optimizer.step
        (None on the undo path): it arms the optimizer's found_inf flag when this step must be skipped."""
        if not self.fused:
            return None

        def arm(grad_norm: torch.Tensor) -> None:
            self._bad = agree(~(torch.isfinite(loss) & torch.isfinite(grad_norm)))
            self.optimizer.found_inf = self._bad.float()  # exactly 1.0 skips, as the fused kernels test it

        return arm

    def after_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Undo the optimizer step just taken if the loss or grad norm is not finite; return that flag (0-d bool)."""
        if self.fused:
            assert self._bad is not None, "NonFiniteGuard: the fused skip needs gate(loss) called before the step"
            bad, self._bad = self._bad, None
            del self.optimizer.found_inf  # a later step outside the guard must not see this one's flag
        else:
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.undo is not None:
            bad = self.undo.restore_if(bad)
        self.skipped = self.skipped + bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        return bad

    @property
    def skips(self) -> bool:
        """Does a bad step leave the state as it was (our undo or fused skip, or the engine's own skip)?"""
        return self.fused or self.undo is not None or self.engine_skips

    def poisoned(self) -> bool:
        """Without a skip: did any step apply a non-finite update? (a host read; checkpoint steps only)"""
        return not self.skips and bool(self.skipped.item() > 0)

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
