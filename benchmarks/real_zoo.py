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
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hnet import files, runs  # noqa: E402
from hnet.config import Config, dataset_name, load_config  # noqa: E402
from hnet.data.cache import CachedFeatures  # noqa: E402
from hnet.distributed import make_accelerator  # noqa: E402
from hnet.eval.evaluate import embed_eval_sets  # noqa: E402
from hnet.experiments.autodecode import autodecode  # noqa: E402
from hnet.experiments.pipeline import grid_config, run_pipeline, variant  # noqa: E402
from hnet.experiments.search import truth_configs  # noqa: E402
from hnet.experiments.train_run import embed_training_data, train_run, trained_and_evaluated  # noqa: E402
from hnet.models.encoders import read_encoder_list  # noqa: E402
from hnet.provenance import stamp  # noqa: E402
from hnet.report_ranking import pair_grid_markdown  # noqa: E402
from hnet.text_folders import text_entry_name  # noqa: E402

CONFIG = Path(__file__).parents[1] / "configs" / "flickr8k_real.yaml"
RESULTS = Path(__file__).parent / "results" / "real_zoo.json"
DEFAULT_ENCODERS = "~/.cache/hnet-real-encoders"
SHARED_DATA = "../shared/data"
HELD_OUT_TEXT = "paraphrase-MiniLM-L3-v2"  # left out of a second hypernetwork, then auto-decoded
BOOTSTRAP = 2000


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
    train = embed_training_data(cfg, make_accelerator(cfg))
    middle = time.perf_counter()
    embed_eval_sets(cfg)
    end = time.perf_counter()
    cache = CachedFeatures(cfg.cache_path)
    return {"train_seconds": round(middle - start, 1), "eval_seconds": round(end - middle, 1),
            "train_images": cache.count, "train_captions": cache.caption_rows,
            "embedded_now": train.get("embedded", []), "train_pass_seconds": round(train.get("seconds", 0.0), 1)}


def _train_eval(cfg: Config) -> dict:
    trained_and_evaluated(cfg, cfg.eval.datasets)
    return files.read_json(cfg.run_dir / runs.EVAL)


def _recall(result: dict, direction: str = "text_to_image", k: int = 5) -> dict[str, float]:
    return {pair: r[direction][f"R@{k}"] for pair, r in result.get("retrieval", {}).items()}


def _mean_ci(values: np.ndarray, seed: int = 0) -> dict:
    """Mean of per-pair values with a 95% bootstrap interval over the pairs."""
    rng = np.random.default_rng(seed)
    draws = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(BOOTSTRAP)]
    return {"mean": float(values.mean()), "ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "n_pairs": int(len(values))}


def zero_shot_gap(hyper_dir: Path, ape_dirs: list[Path], dataset: str, pairs: list[str], seed: int = 0) -> dict:
    """Hypernetwork minus APE, mean zero-shot top-1 over `pairs` (APE: mean over its seeds), with a 95% bootstrap
    interval over evaluation images and APE seeds."""
    hyper = runs.read_hits(hyper_dir, dataset, pairs)  # [pairs, images]
    ape = np.stack([runs.read_hits(d, dataset, pairs) for d in ape_dirs])  # [seeds, pairs, images]
    rng = np.random.default_rng(seed)
    gap = lambda img, sd: (hyper[:, img].mean() - ape[sd][:, :, img].mean()) * 100
    n, s = hyper.shape[1], len(ape)
    draws = [gap(rng.integers(0, n, n), rng.integers(0, s, s)) for _ in range(BOOTSTRAP)]
    return {"hypernet": float(hyper.mean() * 100), "ape": float(ape.mean() * 100),
            "gap": float(gap(np.arange(n), np.arange(s))),
            "ci": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))], "n_pairs": len(pairs)}


def pair_table(evals: dict, ape_runs: list[dict], dataset: str) -> list[dict]:
    """Per pair: APE mean and spread (sd) over seeds, the hypernetwork, zero-shot top-1 and text->image R@5."""
    rows = []
    hyper_top1, hyper_r5 = runs.pair_top1(evals["hypernet"], dataset), _recall(evals["hypernet"])
    for pair in runs.pair_top1(ape_runs[0], dataset):
        top1 = np.array([runs.pair_top1(r, dataset)[pair] for r in ape_runs])
        r5 = np.array([_recall(r)[pair] for r in ape_runs])
        rows.append({"pair": pair, "ape_top1": float(top1.mean()), "ape_top1_sd": float(top1.std(ddof=1)),
                     "ape_r5": float(r5.mean()), "ape_r5_sd": float(r5.std(ddof=1)),
                     "ape_first_caption_r5": _recall(evals["first_caption"]).get(pair),
                     "hypernet_top1": hyper_top1.get(pair), "hypernet_r5": hyper_r5.get(pair)})
    return rows


def held_out_text(cfg: Config, text: str, ape: dict, dataset: str) -> dict:
    """A hypernetwork trained without text encoder `text` (and without the held-out image encoder), then `text`
    auto-decoded against it; compared with APE's connectors of the same pairs."""
    seen = [{"name": s.name, "weights": s.weights} for s in read_encoder_list(cfg.encoders, cfg.image_weights)
            if s.name != cfg.held_out]
    others = [t for t in cfg.text_encoders if text_entry_name(t) != text]
    hyper = variant(cfg, f"_no_{text}", "hypernet", encoders=seen, text_encoders=others, held_out_pairs=[],
                     held_out="")
    if not (hyper.run_dir / runs.MODEL).exists():
        train_run(hyper)
    out = hyper.run_dir / runs.AUTODECODE / f"{files.slug(text)}.json"
    decoded = files.read_json(out) if out.exists() else autodecode(hyper, hyper.run_dir, text, text=True)
    pairs = decoded["pairs_top1"]
    ape_top1 = runs.pair_top1(ape, dataset)
    ape_pairs = {p: ape_top1[p] for p in ape_top1 if p.endswith(f" + {text}") and p.split(" + ")[0] in
                 [s["name"] for s in seen]}
    return {"text_encoder": text, "decoded_top1": decoded["top1"], "decoded_pairs_top1": pairs,
            "ape_top1_same_pairs": float(np.mean(list(ape_pairs.values()))), "decode_steps": decoded["steps"],
            "decode_flops": decoded["flops"], "embed_flops": decoded["embed"]["flops"],
            "embed_captions": decoded["embed"].get("captions"), "embed_samples": decoded["embed"]["samples"],
            "ape_train_flops_per_pair": _ape_flops_per_pair(grid_config(cfg).run_dir, text)}


def _ape_flops_per_pair(run_dir: Path, text: str) -> dict:
    """APE's cost of the pairs of one text encoder: its share of the grid's training and the text forwards over
    the whole training set."""
    phases = files.read_json(run_dir / runs.FLOPS)["phases"]
    pairs = len(files.read_json(run_dir / runs.MODEL)["pairs"])
    return {"train": phases["train"]["flops"] / pairs, "text_embed": phases["embed"]["parts"].get(f"text:{text}")}


def zoo_phase(cfg: Config) -> dict:
    dataset = dataset_name(cfg.eval.datasets[0])
    summary = run_pipeline(cfg)
    truth_dirs = [t.run_dir for t in truth_configs(cfg)]
    ape_dirs = [grid_config(cfg).run_dir, *truth_dirs]
    ape_runs = [files.read_json(d / runs.EVAL) for d in ape_dirs]
    hyper_dir = Path(summary["runs"]["hypernet"])
    evals = {"hypernet": files.read_json(hyper_dir / runs.EVAL), "separate": ape_runs[0],
             "first_caption": _train_eval(variant(cfg, "_first_caption", "separate", held_out_pairs=[],
                                                   data=dataclasses.replace(cfg.data, captions="first")))}
    trained = runs.trained_pairs(files.read_json(hyper_dir / runs.MODEL))
    all_r5, first_r5 = _recall(evals["separate"]), _recall(evals["first_caption"])
    captions_gain = _mean_ci(np.array([all_r5[p] - first_r5[p] for p in all_r5]))
    hyper_r5, ape_r5 = _recall(evals["hypernet"]), [_recall(r) for r in ape_runs]
    retrieval_gap = _mean_ci(np.array([hyper_r5[p] - np.mean([r[p] for r in ape_r5]) for p in trained]))
    return {"dataset": dataset, "pairs": pair_table(evals, ape_runs, dataset),
            "ape_seeds": [str(d) for d in ape_dirs], "hypernet_run": str(hyper_dir),
            "all_captions_minus_first_r5": captions_gain,
            "hypernet_minus_ape_r5": retrieval_gap | {"hypernet": float(np.mean([hyper_r5[p] for p in trained])),
                                                      "ape": float(np.mean([np.mean([r[p] for r in ape_r5])
                                                                            for p in trained]))},
            "hypernet_minus_ape_top1": zero_shot_gap(hyper_dir, ape_dirs, dataset, trained),
            "grid": {"pairs": evals["hypernet"]["pairs"],
                     "scores": {"hypernet": runs.pair_top1(evals["hypernet"], dataset),
                                "APE": {p: float(np.mean([runs.pair_top1(r, dataset)[p] for r in ape_runs]))
                                        for p in evals["hypernet"]["pairs"]}}},
            "ranking": summary["ranking"], "held_out_image": summary.get("held_out"),
            "held_out_pairs": summary.get("held_out_pairs"), "control": summary["datasets"][dataset],
            "held_out_text": held_out_text(cfg, HELD_OUT_TEXT, ape_runs[0], dataset)}


def print_tables(result: dict) -> None:
    print("\n== per pair (APE: mean +- sd over seeds) ==")
    print("| pair | APE top-1 | hypernet top-1 | APE t->i R@5 | hypernet t->i R@5 | APE first-caption R@5 |")
    print("|---|---:|---:|---:|---:|---:|")
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    for r in result["pairs"]:
        print(f"| {r['pair']} | {r['ape_top1']:.1f} +- {r['ape_top1_sd']:.1f} | {fmt(r['hypernet_top1'])} | "
              f"{r['ape_r5']:.1f} +- {r['ape_r5_sd']:.1f} | {fmt(r['hypernet_r5'])} | "
              f"{fmt(r['ape_first_caption_r5'])} |")
    print("\n== N x M grid, zero-shot top-1 ==\n" + "\n".join(pair_grid_markdown(**result["grid"])))
    for key, what in (("all_captions_minus_first_r5", "APE all captions - first caption only, t->i R@5"),
                      ("hypernet_minus_ape_r5", "hypernet - APE, t->i R@5"),
                      ("hypernet_minus_ape_top1", "hypernet - APE, zero-shot top-1")):
        g = result[key]
        value = g.get("mean", g.get("gap"))
        print(f"{what}: {value:+.2f} points, 95% CI [{g['ci'][0]:+.2f}, {g['ci'][1]:+.2f}]")
    t = result["held_out_text"]
    print(f"auto-decoded text encoder {t['text_encoder']}: {t['decoded_top1']:.1f}% top-1 vs APE "
          f"{t['ape_top1_same_pairs']:.1f}% on the same pairs; {t['decode_flops']:.3g} decoding FLOPs + "
          f"{t['embed_flops']:.3g} for its forwards over {t['embed_captions']} captions")


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
    timing = embed_phase(cfg)  # the first, complete pass's times are kept: a later one finds everything cached
    if not timing_file.exists():
        files.write_json(timing_file, timing)
    timing = files.read_json(timing_file)
    print(json.dumps({"embedding": timing}))
    if args.phase == "embed":
        return {"embedding": timing}
    result = {"embedding": timing, **zoo_phase(cfg)}
    print_tables(result)
    files.write_json(RESULTS, stamp(result, cfg))
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
