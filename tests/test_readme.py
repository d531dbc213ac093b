"""Every command in the README works exactly as written, in order, on a fresh copy of the repository.

The rule for which commands run (the README's "This README is tested" section says the same):
- the lines of every ```bash block, except a block whose fence follows a `<!-- readme-test: skip (REASON) -->`
  comment line (blank lines between allowed): GPU, cluster, Docker, downloads, uploads. Inline commands in the text
  are not run;
- each line is a command (`#` comment lines aside, `\\` continuations joined); it must start with one of COMMANDS,
  else the test fails, so that a new kind of command gets a decision (run it, or mark its block);
- the commands run in the venv that runs this test, which has the `test` extra (a superset of `hf`): the parts of an
  `&&` chain that create a venv (`-m venv`) or install (`pip install`) are dropped, and so is `python -m pytest`
  (the suite this test belongs to). `python`, `python3` and `.venv/bin/python` are this interpreter, `wandb` is its
  venv's;
- every `train.py` command gets `trainer.max_steps=20` appended: the README says after its quick start that any
  `train.py` command may, and that everything after it works the same on the shorter run.

They run in order, each with `bash -c` in one copy of the working tree (the files `git ls-files --cached --others
--exclude-standard` lists: committed or not, without ignored files, as a clone of the next commit would have them),
with a fresh DIFFV2_CACHE, no W&B key (so runs log offline, as on a new machine) and the Hugging Face Hub offline.
A command fails the test when it exits non-zero or prints a line starting with `error:`; the message names it.
`pytest -s` prints a table of each command's wall time.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from watched import run_watched

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMANDS = ("python", "python3", ".venv/bin/python", "pip", ".venv/bin/pip", "wandb", "bash")
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
TRAIN_OVERRIDE = "trainer.max_steps=20"  # the README sanctions it for every train.py command
ERROR_LINE = re.compile(r"^error:", re.IGNORECASE | re.MULTILINE)


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    commands: List[str]  # one per command line, continuations joined, as written
    skip: Optional[str]  # the marker's reason


def readme_blocks(text: str) -> List[Block]:
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = SKIP.match(lines[j].strip()) if j >= 0 else None
        start, body, i = i + 1, [], i + 1
        while lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        commands, pending = [], ""
        for raw in body:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            commands.append(pending + line)
            pending = ""
        assert not pending, f"README.md:{start}: a block ends in a line continuation"
        blocks.append(Block(start, commands, marker.group("reason") if marker else None))
        i += 1
    return blocks


def strip_comment(part: str) -> str:
    """`cmd args  # note` -> `cmd args` (a `#` after whitespace, outside quotes: the README has none inside)."""
    return re.split(r"\s+#\s", part, maxsplit=1)[0].strip()


def runnable(command: str) -> Optional[str]:
    """The shell line this test runs for a README command, or None when nothing of it runs here."""
    parts = [strip_comment(p) for p in re.split(r"\s+&&\s+", strip_comment(command))]
    kept = []
    for part in parts:
        words = shlex.split(part)
        if "venv" in words and "-m" in words and words.index("venv") == words.index("-m") + 1:
            continue  # creates the venv: the test runs in its own
        if "pip" in Path(words[0]).name and words[1:2] == ["install"]:
            continue  # installs: the test's venv has the test extra (network-free at test time)
        if words[1:3] == ["-m", "pytest"]:
            continue  # the suite this test belongs to
        if "train.py" in words:
            part = f"{part} {TRAIN_OVERRIDE}"
        kept.append(part)
    return " && ".join(kept) if kept else None


def command_kind(command: str) -> str:
    return shlex.split(strip_comment(command))[0]


def test_readme_blocks_are_classified():
    """Every command of a block that runs is of a known kind; every skip says why; the README sanctions the
    override this test appends. Fast: runs nothing."""
    text = README.read_text()
    blocks = readme_blocks(text)
    assert blocks, "no ```bash blocks in README.md"
    for block in blocks:
        if block.skip is not None:
            assert block.skip.strip(), f"README.md:{block.line}: a skip marker needs a reason"
            continue
        for command in block.commands:
            assert command_kind(command) in COMMANDS, (
                f"README.md:{block.line}: `{command}` starts with none of {COMMANDS}: run it in the test (extend "
                f"COMMANDS in tests/test_readme.py) or put `<!-- readme-test: skip (REASON) -->` before its block")
    assert f"`{TRAIN_OVERRIDE}`" in text, f"README.md must say that train.py commands may run with {TRAIN_OVERRIDE}"
    runs = [runnable(c) for b in blocks if b.skip is None for c in b.commands]
    assert any(r and "train.py" in r for r in runs)


def test_runnable_rewrites_only_what_the_rule_says():
    assert runnable("python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && "
                    ".venv/bin/python train.py") == ".venv/bin/python train.py trainer.max_steps=20"
    assert runnable("python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
                    ".venv/bin/python -m pytest -q") is None
    assert runnable("pip install -q -c constraints.txt -e '.[hf]'   # transformers") is None
    assert runnable("python train.py -m attention=diffv2,baseline seed=0,1,2    # 6 runs") == \
        "python train.py -m attention=diffv2,baseline seed=0,1,2 trainer.max_steps=20"
    assert runnable("python train.py attention=diffv2 && python train.py attention=baseline") == \
        "python train.py attention=diffv2 trainer.max_steps=20 && python train.py attention=baseline " \
        "trainer.max_steps=20"
    assert runnable("python -m diffv2.infer.evaluate --checkpoint runs/a") == "python -m diffv2.infer.evaluate --checkpoint runs/a"


def copy_tree(dest: Path) -> None:
    """The working tree as the next commit would hold it: tracked and untracked files, not ignored ones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() or src.is_symlink():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def shims(tree: Path, bin_dir: Path) -> None:
    """`python`, `python3`, `.venv/bin/python`: this interpreter; `wandb`: its venv's."""
    venv_bin = Path(sys.executable).parent
    targets = {"python": sys.executable, "python3": sys.executable, "wandb": str(venv_bin / "wandb")}
    (tree / ".venv" / "bin").mkdir(parents=True)
    for path, target in [*((bin_dir / n, t) for n, t in targets.items()), (tree / ".venv/bin/python", sys.executable)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/sh\nexec {shlex.quote(target)} "$@"\n')
        path.chmod(0o755)


def fresh_env(tmp: Path, bin_dir: Path, tree: Path) -> dict:
    drop = ("WANDB_", "DIFFV2_", "HF_", "TRANSFORMERS_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_",
            "PYTEST_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(tree),
            "PYTHONUNBUFFERED": "1", "DIFFV2_CACHE": str(tmp / "cache"), "NETRC": str(tmp / "no-netrc"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home")}


def test_readme_commands_work_in_order(tmp_path):
    tree, bin_dir = tmp_path / "repo", tmp_path / "bin"
    copy_tree(tree)
    shims(tree, bin_dir)
    env = fresh_env(tmp_path, bin_dir, tree)
    blocks = readme_blocks(README.read_text())
    timings, skipped = [], []
    t_all = time.monotonic()
    try:
        for block in blocks:
            for command in block.commands:
                if block.skip is not None:
                    skipped.append((block.line, command, block.skip))
                    continue
                line = runnable(command)
                if line is None:
                    skipped.append((block.line, command, "installs / the test suite: see the module docstring"))
                    continue
                t0 = time.monotonic()
                proc = run_watched(["bash", "-c", f"set -o pipefail; {line}"], env=env, cwd=tree)
                seconds = time.monotonic() - t0
                timings.append((line, seconds))
                output = proc.stdout + proc.stderr
                bad = ERROR_LINE.search(output)
                if proc.returncode != 0 or bad:
                    why = (f"exit code {proc.returncode}" if proc.returncode != 0 else
                           f"an error line: {output[bad.start():].splitlines()[0]}")
                    pytest.fail(f"README.md:{block.line}: `{command}` (run as `{line}`) failed after {seconds:.0f} s "
                                f"with {why}; output tail:\n{output[-4000:]}", pytrace=False)
    finally:
        total = time.monotonic() - t_all
        width = max([len(c) for c, _ in timings] + [7])
        print(f"\nREADME commands (run in {tree}):\n{'command':<{width}}  seconds")
        for line, seconds in timings:
            print(f"{line:<{width}}  {seconds:7.1f}")
        print(f"{'total':<{width}}  {total:7.1f}\nnot run: {len(skipped)} commands")
        for reason in sorted({r for _, _, r in skipped}):
            print(f"  {sum(r == reason for _, _, r in skipped)} x {reason}")
