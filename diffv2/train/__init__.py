"""The training runtime: the loop (trainer.py) and its components, callbacks, checkpoints, optimizer, signals and
preemption, the non-finite guard, fault points, the metric sink and the run record."""
