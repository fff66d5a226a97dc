"""Which code produced a result: the git commit of the checkout, and whether its tracked files differ from it
(`draw verify --json` and the benchmarks record both)."""

import pathlib
import subprocess

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _git(where: pathlib.Path, *args: str) -> str | None:
    """git's output in the checkout holding `where`, or None (not a repository, no commit, no git)."""
    try:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(where: pathlib.Path = PACKAGE_DIR) -> str:
    """Short commit hash of the checkout holding `where`, or "unknown"."""
    return (_git(where, "rev-parse", "--short", "HEAD") or "").strip() or "unknown"


def git_dirty(where: pathlib.Path = PACKAGE_DIR) -> bool | None:
    """Whether the checkout's tracked files differ from its commit (a result then measures uncommitted code),
    or None where git cannot tell."""
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())
