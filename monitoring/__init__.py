"""Training-health monitoring: monitors (callbacks the trainer drives, defined in diffv2/train/callbacks.py)."""
