"""Offline report tools over finished runs' records (metrics.jsonl): the comparison report
(`python -m analysis.compare`), the DIFF V2 claims (`python -m analysis.claims`) and the W&B report
(`python -m analysis.wandb_report`). Nothing in training imports this package."""
