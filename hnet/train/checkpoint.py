"""Training checkpoints: accelerate `save_state` written to a temp folder, checksummed, then renamed.

A kill mid-write leaves only a `.tmp` folder (cleaned at the next start) and the previous checkpoint intact; a
checkpoint whose bytes changed afterwards is refused at resume, naming the file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from hnet import files
from hnet.config import Config, ConfigError

PREFIX = "step_"
STATE = "trainer_state.json"  # written last: its presence marks a finished checkpoint


class CheckpointError(ValueError):
    """A corrupted or unfinished checkpoint; the message names the file."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.exists():
        return []
    done = [p for p in folder.glob(f"{PREFIX}*") if p.suffix != files.TMP_SUFFIX and (p / STATE).exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def remove_unfinished(run_dir: Path) -> list[Path]:
    stale = list((run_dir / "checkpoints").glob(f"*{files.TMP_SUFFIX}")) if (run_dir / "checkpoints").exists() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int = 2) -> Path:
    final = run_dir / "checkpoints" / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + files.TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (run_dir / "flops.json").exists():
            shutil.copy2(run_dir / "flops.json", tmp / "flops.json")
        sums = {p.name: files.sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        files.write_json(tmp / STATE, {"step": step, "sha256": sums})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(path: Path) -> int:
    """Check every file against the checksums recorded at save time; return the checkpoint's step."""
    state = files.read_json(path / STATE)
    if (path / "scheduler.bin").exists():  # hnet now checkpoints its scheduler itself (custom_checkpoint_0.pkl)
        raise CheckpointError(f"{path}: written by an earlier hnet whose scheduler stepped once per rank; it cannot "
                              f"be resumed, start the run again (train.resume=)")
    for name, digest in state.get("sha256", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing from the checkpoint")
        if files.sha256_file(file) != digest:
            raise CheckpointError(f"{file}: checksum mismatch, the checkpoint is corrupted "
                                  f"(resume from an older one with train.resume=PATH)")
    return int(state["step"])


def resolve_resume(cfg: Config) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "latest":
        found = checkpoint_dirs(cfg.run_dir)
        return found[-1] if found else None
    path = Path(cfg.train.resume)
    if not (path / STATE).exists():
        raise ConfigError(f"train.resume: not a finished checkpoint folder: {path}")
    return path
