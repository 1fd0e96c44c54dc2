"""`make demo`'s job, recorded: the demo pipeline on configs/demo.yaml, its summary stamped with the git commit and
the config's digest in benchmarks/results/demo.json. The README's demo results are rendered from that file
(benchmarks/readme_tables.py).

    python benchmarks/demo_results.py [key=value ...]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hnet import files  # noqa: E402
from hnet.cli import quiet_libraries  # noqa: E402
from hnet.config import load_config  # noqa: E402
from hnet.experiments.pipeline import run_pipeline  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "demo.json"
CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"


def main(overrides: list[str]) -> dict:
    quiet_libraries()
    cfg = load_config(CONFIG, overrides)
    start = time.perf_counter()
    summary = run_pipeline(cfg, control=True)
    summary["seconds"] = time.perf_counter() - start
    result = stamp(summary, cfg)
    files.write_json(RESULTS, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    print(f"wrote {RESULTS}")
