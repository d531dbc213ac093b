"""Secrets in the environment never reach anything a run writes: logs, configs, metrics, checkpoints, W&B files.

A real train.py run (W&B offline, so W&B writes its run files into the run directory) gets a fake W&B key, a
fake Hugging Face token and other secret-looking variables, and runs from a copy of the source tree whose git
remote carries a token (W&B records the remote URL); afterwards every byte of every file it could have
written (run directory, `.hydra/`, W&B's offline files including the binary .wandb log, the data cache, a private
HOME and TMPDIR, W&B's config/cache directories) and its console output are searched for each value. A non-secret
marker passed as a W&B tag is searched the same way and must be found, config.yaml and the binary .wandb file
included, so the search cannot pass by reading nothing.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from cli_runs import ROOT, train

SECRET_NAMES = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                "MY_SECRET", "DB_PASSWORD", "DIFFV2_SERVICE_KEY")


def source_copy(dest: Path, remote: str) -> Path:
    """The working tree (tracked and untracked, not ignored) as a fresh one-commit repository with `remote`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((ROOT / name).read_bytes())
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"], ["remote", "add", "origin", remote]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def every_file(roots: list[Path]) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def where(value: str, files: list[Path], outputs: dict[str, str]) -> list[str]:
    needle = value.encode()
    hits = [str(p) for p in files if needle in p.read_bytes()]
    return hits + [name for name, text in outputs.items() if value in text]


def test_no_secret_from_the_environment_is_written(tmp_path):
    fake = {name: secrets.token_hex(20) for name in SECRET_NAMES}  # 40 hex digits: a well-formed W&B key
    fake["HF_TOKEN"] = "hf_" + secrets.token_urlsafe(24)
    fake["git remote token"] = "ghp_" + secrets.token_hex(18)
    marker = "tagmarker" + secrets.token_hex(8)
    repo_marker = "repomarker" + secrets.token_hex(8)
    remote = f"https://x-access-token:{fake['git remote token']}@github.com/o/{repo_marker}"
    src = source_copy(tmp_path / "src", remote)  # the input: not scanned (its .git/config holds the token)
    home, tmp, wandb_home = tmp_path / "home", tmp_path / "tmp", tmp_path / "wandb-home"
    for d in (home, tmp, wandb_home):
        d.mkdir()
    env = {**{k: v for k, v in fake.items() if k in SECRET_NAMES}, "WANDB_MODE": "offline", "HOME": str(home),
           "TMPDIR": str(tmp), **{f"WANDB_{d.upper()}_DIR": str(wandb_home / d)
                                  for d in ("config", "cache", "data", "artifact")}}
    run, cache = tmp_path / "run", tmp_path / "cache"
    overrides = ("trainer.max_steps=4", "trainer.ckpt_interval=2", "trainer.log_interval=1", "trainer.eval_interval=2",
                 f"logging.wandb.tags=[{marker}]", "hydra.output_subdir=.hydra")
    first = train(run, cache, *overrides, env=env, cwd=src)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(run, cache, *overrides, env=env, cwd=src)  # resumes: loads the checkpoint, reopens the W&B run
    assert again.returncode == 0, again.stderr[-3000:]

    files = every_file([run, cache, home, tmp, wandb_home])
    names = {p.name for p in files}
    assert {"config.yaml", "train.log", "metrics.jsonl", "trainer.pt", "meta.json", ".metadata"} <= names
    assert any(n.endswith(".wandb") for n in names) and any(n.endswith(".distcp") for n in names)
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    outputs = {f"{label} {stream}": getattr(proc, stream) for label, proc in (("first", first), ("resume", again))
               for stream in ("stdout", "stderr")}

    found = where(marker, files, outputs)  # the search sees what a run does write, binary W&B files included
    assert str(run / "config.yaml") in found and str(run / ".hydra" / "config.yaml") in found, found
    assert any(f.endswith(".wandb") for f in found), found
    assert any(f.endswith(".wandb") for f in where(repo_marker, files, outputs))  # W&B did record the remote

    leaks = {name: where(value, files, outputs) for name, value in fake.items()}
    assert not any(leaks.values()), {k: v for k, v in leaks.items() if v}
