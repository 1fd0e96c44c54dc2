"""Training checkpoints: accelerate `save_state` written to a temp folder, checksummed, then renamed.

A kill mid-write leaves only a `.tmp` folder (cleaned at the next start) and the previous checkpoint intact; a
checkpoint whose bytes changed afterwards is refused at resume, naming the file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from hnet import files, runs
from hnet.config import Config, ConfigError, dump_yaml, to_dict
from hnet.flops import FlopsLedger

PREFIX = "step_"
STATE = "trainer_state.json"  # written last: its presence marks a finished checkpoint


class CheckpointError(ValueError):
    """A corrupted or unfinished checkpoint; the message names the file."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / runs.CHECKPOINTS
    if not folder.exists():
        return []
    done = [p for p in folder.glob(f"{PREFIX}*") if p.suffix != files.TMP_SUFFIX and (p / STATE).exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def remove_unfinished(run_dir: Path) -> list[Path]:
    folder = run_dir / runs.CHECKPOINTS
    stale = list(folder.glob(f"*{files.TMP_SUFFIX}")) if folder.exists() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int = 2) -> Path:
    final = run_dir / runs.CHECKPOINTS / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + files.TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if (run_dir / runs.FLOPS).exists():
            shutil.copy2(run_dir / runs.FLOPS, tmp / runs.FLOPS)
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


def start_or_resume(cfg: Config, accelerator: Accelerator) -> int:
    """The step a run starts at: 0 for a fresh run (whose stale files are removed), or its checkpoint's, with the
    accelerator's state, metrics and ledger put back as they were then. Call after `accelerator.prepare`."""
    run_dir = cfg.run_dir
    resume = resolve_resume(cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.remove_stale_temps(run_dir)
        remove_unfinished(run_dir)
        files.write_text(run_dir / runs.CONFIG, dump_yaml(cfg))
    if cfg.train.tracker:
        accelerator.init_trackers(cfg.name, config=_flat(to_dict(cfg)))
    if resume is None:
        if accelerator.is_main_process:
            for stale in (runs.METRICS, runs.FLOPS):
                (run_dir / stale).unlink(missing_ok=True)
            shutil.rmtree(run_dir / runs.CHECKPOINTS, ignore_errors=True)
        accelerator.wait_for_everyone()
        return 0
    step = verify_checkpoint(resume)
    accelerator.load_state(str(resume))
    if accelerator.is_main_process:  # drop metrics logged after the checkpoint: they will be logged again
        rows = [r for r in files.read_jsonl(run_dir / runs.METRICS) if r.get("step", 0) <= step]
        files.write_text(run_dir / runs.METRICS, "".join(f"{json.dumps(r)}\n" for r in rows))
        FlopsLedger.rewind(run_dir, resume)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {resume} at step {step}")
    return step


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
