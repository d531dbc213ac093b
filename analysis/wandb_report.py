"""Build the "DIFF V2 vs baseline" W&B report (and optionally a saved workspace view) through W&B's public API.

    python -m analysis.wandb_report --project diffv2 [--entity TEAM] [--variants diffv2 baseline] [--workspace]

Runs are selected by the attention-variant tag the trainer sets on every run (`diffv2`, `baseline`, `diffv1`);
each variant becomes one run set, so every panel overlays the arms. Sections: loss, grad-norm spikes,
activation outliers, context RMS (with the spec §6 reference), lambda. Needs the `wandb-workspaces` package
(`pip install 'wandb[workspaces]'`) and a logged-in online W&B (offline runs: `wandb sync RUN_DIR/wandb` first).
`--dry-run` builds the report objects without network access and prints their outline.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

SECTIONS = [  # (section, [(panel title, y keys or regex, log y)])
    ("Loss", [("training loss", ["train/loss"], False), ("validation loss", ["train/val_loss"], False)]),
    ("Grad-norm spikes", [("grad norm (pre-clip)", ["grad/norm"], True), ("spike steps", ["spike/count"], False),
                          ("spike score", ["spike/score"], False), ("clip coefficient", ["grad/clip_coef"], False)]),
    ("Activation outliers", [("max |h| per layer", "act/max_abs/.*", True),
                             ("max |q.k/sqrt(d)| per layer", "attn/logit_max_abs/.*", False),
                             ("kurtosis per layer", "act/kurtosis/.*", True)]),
    ("Context RMS", [("context RMS, mean over heads, per layer", "attn/context_rms_mean/.*", False),
                     ("uniform-softmax reference mean 1/sqrt(t+1)", ["attn/context_rms_uniform_ref"], False),
                     ("DIFF V2 floor |1-sigma|/sqrt(t+1)", "attn/context_rms_floor/.*", False)]),
    ("Lambda and sinks", [("sigmoid(lambda) mean per layer", "attn/lambda_sigmoid_mean/.*", False),
                          ("first-token attention mass per layer", "attn/sink_mass/.*", False)]),
]
HEATMAPS = ["attn/context_rms_heads", "attn/lambda_sigmoid_heads", "attn/sink_mass_heads"]


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _require_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError as e:
        _fail(f"analysis.wandb_report needs the wandb-workspaces package ({e}); install it with "
              f"`pip install 'wandb[workspaces]'`")
    return wr, ws, expr


def _require_online() -> None:
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        _fail(f"WANDB_MODE={mode}: building a report needs online W&B; unset WANDB_MODE (and sync offline runs "
              f"with `wandb sync RUN_DIR/wandb`) or use --dry-run")
    import wandb

    try:
        wandb.Api(timeout=20).viewer  # noqa: B018  (authenticates and reaches the server)
    except Exception as e:  # no key, no network, wrong host: one line, no traceback
        _fail(f"cannot reach W&B ({type(e).__name__}: {e}); run `wandb login` on a machine with network access, "
              f"or use --dry-run")


def panels(wr) -> list[tuple[str, list]]:
    out = []
    for section, specs in SECTIONS:
        plots = []
        for title, y, log_y in specs:
            if isinstance(y, str):
                plots.append(wr.LinePlot(title=title, metric_regex=y, log_y=log_y or None, smoothing_factor=0.6))
            else:
                plots.append(wr.LinePlot(title=title, y=y, log_y=log_y or None, smoothing_factor=0.6))
        out.append((section, plots))
    out.append(("Layer x head heatmaps", [wr.MediaBrowser(title=k, media_keys=[k]) for k in HEATMAPS]))
    return out


def build_report(project: str, entity: str, variants: list[str], wr, expr):
    runsets = [wr.Runset(entity=entity, project=project, name=v, filters=[expr.Tags().isin([v])]) for v in variants]
    blocks = [wr.H1("DIFF V2 vs baseline"),
              wr.P("Run sets are selected by the attention-variant tag. Metric keys and their meaning: "
                   "monitoring/README.md. Context RMS references follow spec §6.")]
    for section, plots in panels(wr):
        blocks += [wr.H2(section), wr.PanelGrid(runsets=runsets, panels=plots)]
    return wr.Report(project=project, entity=entity, title="DIFF V2 vs baseline",
                     description=f"Training health of {' vs '.join(variants)}: loss, grad-norm spikes, activation "
                                 f"outliers, context RMS, lambda.", blocks=blocks)


def build_workspace(project: str, entity: str, ws, wr, expr):
    sections = [ws.Section(name=name, panels=plots, is_open=True) for name, plots in panels(wr)]
    return ws.Workspace(entity=entity, project=project, name="DIFF V2 vs baseline", sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[expr.Config("model.attention.variant")]))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True, help="W&B project the runs were logged to")
    parser.add_argument("--entity", default=None, help="W&B entity (default: your default entity)")
    parser.add_argument("--variants", nargs="+", default=["diffv2", "baseline"], help="variant tags to compare")
    parser.add_argument("--workspace", action="store_true", help="also save a workspace view with the same panels")
    parser.add_argument("--dry-run", action="store_true", help="build without network access; print the outline")
    args = parser.parse_args(argv)
    wr, ws, expr = _require_workspaces()
    if not args.dry_run:
        _require_online()
    entity = args.entity or ("dry-run" if args.dry_run else None)
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    report = build_report(args.project, entity, args.variants, wr, expr)
    workspace = build_workspace(args.project, entity, ws, wr, expr) if args.workspace else None
    if args.dry_run:
        print(f"report '{report.title}' for {entity}/{args.project}: run sets {args.variants}")
        for section, plots in panels(wr):
            print(f"  {section}: " + "; ".join(p.title for p in plots))
        return 0
    report.save()
    print(f"report: {report.url}")
    if workspace is not None:
        workspace.save()
        print(f"workspace: {workspace.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
