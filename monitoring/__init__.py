"""Training-health monitoring: metric sinks (metrics.jsonl, W&B) and the callbacks the trainer drives."""
