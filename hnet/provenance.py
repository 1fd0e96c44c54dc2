"""Where a number comes from: the git commit it was measured at (and whether the tree had uncommitted changes) and
a digest of the resolved config. Every results file carries both (`stamp`), so a number in the README can be traced
to the code and settings that produced it, and a stale one is visible. The git state is read when this module is
first imported, i.e. when the measuring process starts and loads its code: a commit made while a long benchmark runs
is not the code it ran."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ("benchmarks/results/",)  # what benchmarks write, not code: a chain of benchmarks leaves them uncommitted


def git_state(root: Path = ROOT) -> dict:
    """{"commit": HEAD's sha (or "unknown" outside a git checkout), "dirty": uncommitted changes to tracked files
    other than results (OUTPUTS), "uncommitted": the paths of all uncommitted tracked changes}."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    try:
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
        return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": changed,
                "dirty": any(not path.startswith(OUTPUTS) for path in changed)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


AT_START = git_state()


def config_digest(config: Any) -> str:
    """sha256 (16 hex digits) of a resolved config: a dataclass (hnet's Config) or a JSON-able mapping."""
    tree = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamp(result: dict, config: Any) -> dict:
    """`result` with its provenance: git commit and dirty flag at the process's start, the config's digest and the
    config itself."""
    tree = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return result | {"provenance": AT_START | {"config_digest": config_digest(tree), "config": tree}}
