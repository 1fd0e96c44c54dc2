"""GPU smoke test: the demo pipeline on CUDA (bf16) against the same pipeline on the CPU.

Compares zero-shot top-1 per encoder (hypernetwork and separate runs; max absolute difference in points, within
--tol), reports the device every phase ran on (eval.json and the auto-decoding json record it) and training
throughput (steps/s from metrics.jsonl). Prints one JSON line last and writes benchmarks/results/gpu_smoke.json.
Exits with a message when CUDA is unavailable.

    python benchmarks/gpu_smoke.py [--cpu-summary runs/gpu_smoke_cpu/summary.json] [--epochs 20] [--tol 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hnet import files  # noqa: E402
from hnet.config import load_config  # noqa: E402
from hnet.experiments.pipeline import run_pipeline  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu_smoke.json"


def run(device: str, out: Path, epochs: int, extra: list[str]) -> dict:
    """The demo pipeline on one device; the summary plus per-phase devices and train throughput."""
    overrides = [f"out_root={out}", f"device={device}", f"train.epochs={epochs}", *extra]
    if device == "cuda":
        overrides.append("train.mixed_precision=bf16")
    cfg = load_config("configs/demo.yaml", overrides)
    start = time.perf_counter()
    summary = run_pipeline(cfg, control=False)
    summary["seconds"] = time.perf_counter() - start
    summary["phase_devices"] = phase_devices(summary)
    summary["train_steps_per_s"] = {m: steps_per_s(Path(d)) for m, d in summary["runs"].items()}
    files.write_json(out / "summary.json", summary)
    return summary


def phase_devices(summary: dict) -> dict:
    devices = {}
    for method, run_dir in summary["runs"].items():
        run_dir = Path(run_dir)
        evals = files.read_json(run_dir / "eval.json")
        devices[f"{method}/train"] = files.read_json(run_dir / "flops.json")["phases"]["train"]["parts"]["device"]
        devices[f"{method}/eval_model"] = evals["device"]
        devices.update({f"{method}/eval_features/{d}": r["features_device"] for d, r in evals["datasets"].items()})
        for path in sorted((run_dir / "autodecode").glob("*.json")):
            decoded = files.read_json(path)
            devices[f"{method}/autodecode/{decoded['encoder']}"] = decoded["device"]
    return devices


def steps_per_s(run_dir: Path) -> float | None:
    """Mean of the logged samples/s over the run, divided by the batch size."""
    import yaml

    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]
    rates = [r["samples_per_s"] for r in files.read_jsonl(run_dir / "metrics.jsonl") if "samples_per_s" in r]
    return sum(rates) / len(rates) / batch if rates else None


def compare(gpu: dict, cpu: dict, tol: float) -> dict:
    diffs = {m: {n: abs(gpu["by_encoder"][m][n] - cpu["by_encoder"][m][n]) for n in cpu["by_encoder"][m]}
             for m in cpu["by_encoder"]}
    worst = max(max(d.values()) for d in diffs.values())
    return {"abs_diff_points": diffs, "max_abs_diff_points": worst, "tolerance_points": tol, "within": worst <= tol}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_smoke")
    parser.add_argument("--cpu-summary", help="summary.json of an earlier CPU run (skips the CPU pipeline)")
    parser.add_argument("--epochs", type=int, default=20, help="train.epochs for both runs (demo.yaml: 60)")
    parser.add_argument("--tol", type=float, default=2.0, help="max |GPU - CPU| zero-shot top-1, in points")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke: CUDA is not available on this machine; run it where a GPU is")
    gpu = run("cuda", Path(args.out + "_cuda"), args.epochs, args.overrides)
    cpu = (files.read_json(args.cpu_summary) if args.cpu_summary
           else run("cpu", Path(args.out + "_cpu"), args.epochs, args.overrides))
    off_gpu = {k: v for k, v in gpu["phase_devices"].items() if not v.startswith("cuda")}
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "epochs": args.epochs,
              **compare(gpu, cpu, args.tol), "phase_devices": gpu["phase_devices"], "phases_not_on_cuda": off_gpu,
              "train_steps_per_s": {"cuda": gpu["train_steps_per_s"], "cpu": cpu["train_steps_per_s"]},
              "seconds": {"cuda": gpu["seconds"], "cpu": cpu.get("seconds")},
              "held_out": {"cuda": gpu.get("held_out"), "cpu": cpu.get("held_out")}}
    files.write_json(RESULTS, stamp(result, vars(args)))
    print(json.dumps(result))
    if off_gpu or not result["within"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
