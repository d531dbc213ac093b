"""Launchers: SLURM batch scripts (python -m launch.slurm) and torchrun command lines (python -m launch.torchrun)."""
