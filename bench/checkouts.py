"""Measuring an older version beside this checkout in the same run: a temporary git worktree of a ref, and a
script run in a fresh child process with a checkout first on ``sys.path``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def worktree(ref: str, where: Path) -> Iterator[Path]:
    """A detached worktree of ``ref`` at ``where``, removed afterwards."""
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], capture_output=True
        )


def run_in_checkout(
    script: str, checkout: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``script`` in a fresh Python with ``checkout`` first on its path; the JSON object it printed last."""
    import os

    child_env = (env if env is not None else dict(os.environ)) | {"PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=checkout,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise SystemExit(f"the run in {checkout} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))
