"""Ranking quality against search FLOPs: the hypernetwork, truncated grid search (APE), training-free proxies and a
random ranking, each at several budgets, against the ground truth of full APE (every connector trained to the
config's full schedule), on one zoo.

Zoos: `real` (5 pretrained encoders from ../shared/data/weights and resolution/depth/pooling variants, 13
encoders; trained on the 1,000 captioned ImageNet images; scored on a fixed class-balanced subset of the CIFAR-10
test set) and `demo` (the built-in data and its 9 random-init encoders). The evaluation set is split in two halves
(even / odd positions): methods that evaluate (hypernetwork, APE) predict from the first half, the ground truth is
full APE on the second, so no method is scored on the images it was chosen by.

Costs per point: training FLOPs (ledger), and FLOPs with embedding = training + embedding the pairs the method
used with every encoder and the text encoder (the dominant cost). The evaluation-set embedding is the same for
every method that evaluates and is reported apart. Prints one JSON line last; writes
benchmarks/results/search_cost.json (one entry per zoo), search_cost_<zoo>.md and a plot.

    python benchmarks/search_cost.py --data ../shared/data            # the real zoo
    python benchmarks/search_cost.py --zoo demo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hnet import files  # noqa: E402
from hnet.config import Config, load_config  # noqa: E402
from hnet.data.cache import CachedFeatures, caption_offsets, write_cache  # noqa: E402
from hnet.distributed import make_accelerator  # noqa: E402
from hnet.eval.ranking import agreement  # noqa: E402
from hnet.eval.zeroshot import ZeroShotProbe, zero_shot_logits, zero_shot_top1  # noqa: E402
from hnet.experiments.proxies import PROXIES, score  # noqa: E402
from hnet.experiments.train_run import embed_training_data  # noqa: E402
from hnet.files import MANIFEST  # noqa: E402
from hnet.flops import proxy_flops  # noqa: E402
from hnet.models.encoders import (
    read_encoder_list,  # noqa: E402
    text_key,  # noqa: E402
)
from hnet.provenance import stamp  # noqa: E402
from hnet.runs import load_model  # noqa: E402
from hnet.train.loop import train  # noqa: E402

RESULTS = Path(__file__).parent / "results"
W = "{data}/weights/{file}.safetensors"
REAL_ZOO = [  # (encoder name, weights file stem)
    ("deit_tiny_patch16_224", "deit_tiny_patch16_224"), ("deit_tiny_patch16_224@img_size=160", "deit_tiny_patch16_224"),
    ("deit_tiny_patch16_224@depth=8", "deit_tiny_patch16_224"),
    ("deit_tiny_patch16_224@pool=avg", "deit_tiny_patch16_224"),
    ("vit_tiny_patch16_224", "vit_tiny_patch16_224"), ("vit_tiny_patch16_224@img_size=160", "vit_tiny_patch16_224"),
    ("vit_tiny_patch16_224@depth=8", "vit_tiny_patch16_224"),
    ("mobilenetv1_100@mean=0.5,std=0.5,pad=same", "mobilenetv1_100"),
    ("mobilenetv1_100@img_size=160,mean=0.5,std=0.5,pad=same", "mobilenetv1_100"),
    ("mobilenetv2_100", "mobilenetv2_100"), ("mobilenetv2_100@img_size=160", "mobilenetv2_100"),
    ("tf_efficientnet_lite0", "tf_efficientnet_lite0"), ("tf_efficientnet_lite0@img_size=160", "tf_efficientnet_lite0"),
]
# (steps, samples); the hypernetwork adds k. Log-spaced; the full schedule is the ground truth.
# A budget below the batch size trains on batches of all its pairs.
APE_BUDGETS = [(10, 64), (20, 125), (40, 250), (80, 500), (160, 1000), (320, 1000)]
HYPER_BUDGETS = [(10, 3, 64), (20, 4, 125), (40, 4, 250), (80, 6, 500), (160, 0, 1000), (320, 0, 1000)]
PROXY_SAMPLES = [32, 64, 125, 250, 500, 1000]


def zoo_config(zoo: str, data: Path, out: Path, extra: tuple[str, ...] = ()) -> Config:
    common = [f"out_root={out / zoo}", f"name={zoo}", "train.log_every=1000", "train.ckpt_every=100000",
              "eval.batch_size=250", "data.embed_batch_size=50", *extra]
    if zoo == "demo":
        # the measured demo zoo: its 10 image encoders with the one text encoder the benchmark's results were run with
        return load_config("configs/demo.yaml", common + ["held_out=", "train.eval_every=0", "text_encoders=[]",
                                                          "held_out_pairs=[]", "text_encoder=all-MiniLM-L6-v2"])
    cfg = load_config(None, common + [
        "text_encoder=all-MiniLM-L6-v2", "data.source=cc595k", "data.shard_size=250",
        f"data.metadata={data / 'imagenet-sample-595k-format' / 'metadata.json'}",
        f"data.images={data / 'imagenet-sample-595k-format' / 'images'}",
        f"eval.cifar10={data / 'cifar10-test'}", "eval.datasets=[cifar10]", "eval.templates=cifar",
        "eval.max_images=2000", "train.batch_size=250", "train.epochs=150", "train.lr=2e-3",
        "train.warmup_steps=20", "train.weight_decay=1.0"])
    return dataclasses.replace(cfg, encoders=[{"name": n, "weights": W.format(data=data, file=f)} for n, f in REAL_ZOO])


class Zoo:
    """A zoo's caches: training features of every encoder, and the evaluation set split in two halves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        accelerator = make_accelerator(cfg)
        embed_training_data(cfg, accelerator)
        specs = read_encoder_list(cfg.encoders, cfg.image_weights)
        self.names = [s.name for s in specs]
        self.text = text_key(cfg.text_encoder)
        self.cache = CachedFeatures(cfg.cache_path, self.names + [self.text])
        self.per_sample = self.cache.manifest["flops_per_sample"]
        self.probe = ZeroShotProbe(cfg, cfg.eval.datasets[0], self.names, {s.name: s.weights for s in specs},
                                   accelerator)
        n = len(self.probe.labels)
        self.halves = {"search": torch.arange(0, n, 2), "truth": torch.arange(1, n, 2)}
        self.eval_embed_flops = self.probe.embed_flops

    def embed_flops(self, samples: int) -> float:
        """Embedding `samples` training images with every encoder and their captions with the text encoder."""
        captions = int(self.cache.caption_counts()[:samples].sum())
        return samples * sum(self.per_sample[n] for n in self.names) + captions * self.per_sample[self.text]

    def prefix(self, samples: int) -> None:
        """The training cache of the first `samples` pairs (data.samples_per_encoder), cut from the full one."""
        root = self.cfg.cache_root / f"first_{samples}"
        if samples >= self.cache.count or (root / MANIFEST).exists():
            return
        counts = self.cache.caption_counts()[:samples]  # the text arrays hold every caption of those images
        arrays = {n: np.asarray(self.cache[n][:samples]) for n in self.names}
        arrays[self.text] = np.asarray(self.cache[self.text][:int(counts.sum())])
        manifest = write_cache(root, self.cache.keys()[:samples], arrays, caption_counts=counts)
        files.write_json(root / MANIFEST, manifest | {"flops_per_sample": self.per_sample})

    def top1(self, run_dir: Path, half: str) -> dict[str, float]:
        model, names = load_model(run_dir)
        index = self.halves[half]
        labels = self.probe.labels.cpu()[index]
        out = {}
        for i, name in enumerate(names):
            classifier = self.probe.classifiers[self.cfg.text_encoder].cpu()
            logits = zero_shot_logits(model, i, self.probe.features[name].cpu()[index], classifier)
            out[name] = zero_shot_top1(logits, labels)
        return out


def trained_point(zoo: Zoo, name: str, method: str, steps: int | None, samples: int, k: int = 0,
                  **train_kw) -> dict:
    """Train one run at a budget, return its ranking scores on the search half and its costs."""
    samples = min(samples, zoo.cache.count)
    zoo.prefix(samples)
    cfg = zoo.cfg
    train_cfg = dataclasses.replace(cfg.train, encoders_per_step=k, batch_size=min(cfg.train.batch_size, samples),
                                    **train_kw)
    if steps:
        train_cfg = dataclasses.replace(train_cfg, max_steps=steps, epochs=max(cfg.train.epochs, float(steps)))
    run_cfg = dataclasses.replace(cfg, name=name, method=method, train=train_cfg,
                                  data=dataclasses.replace(cfg.data, samples_per_encoder=0 if samples >= zoo.cache.count
                                                           else samples))
    if not (run_cfg.run_dir / "model.json").exists():
        train(run_cfg)
    ledger = files.read_json(run_cfg.run_dir / "flops.json")["phases"]["train"]
    return {"scores": zoo.top1(run_cfg.run_dir, "search"), "run": run_cfg.run_dir, "steps": ledger["steps"],
            "k": k or len(zoo.names), "samples": samples, "train_flops": ledger["flops"],
            "flops_with_embed": ledger["flops"] + zoo.embed_flops(samples)}


def proxy_point(zoo: Zoo, proxy: str, samples: int) -> dict:
    samples = min(samples, zoo.cache.count)
    first = caption_offsets(zoo.cache.caption_counts())[:samples]  # each image's first caption
    text = torch.from_numpy(np.asarray(zoo.cache[zoo.text][first], np.float32))
    scores, flops = {}, 0.0
    for name in zoo.names:
        x = torch.from_numpy(np.asarray(zoo.cache[name][:samples], np.float32))
        scores[name] = score(proxy, x, text)
        flops += proxy_flops(proxy, samples, x.shape[1], text.shape[1])
    return {"scores": scores, "samples": samples, "train_flops": flops,
            "flops_with_embed": flops + zoo.embed_flops(samples)}


def random_point(truth: dict[str, float], draws: int = 2000) -> dict:
    """Expected agreement of a uniformly random ranking (the floor), at zero cost."""
    rng = np.random.default_rng(0)
    names = list(truth)
    runs = [agreement(dict(zip(names, rng.permutation(len(names)).astype(float))), truth) for _ in range(draws)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("spearman", "kendall", "regret", "top3_recall")}
    return mean | {"top1_hit": float(np.mean([r["top1_hit"] for r in runs])), "train_flops": 0.0,
                   "flops_with_embed": 0.0}


def _scored(point: dict, truth: dict[str, float]) -> dict:
    a = agreement(point.pop("scores"), truth)
    point.pop("run", None)
    return point | {k: a[k] for k in ("spearman", "kendall", "regret", "top1_hit", "top3_recall", "predicted_best")}


def fraction_at(points: list[dict], full: float, kendall: float = 0.8, regret: float = 1.0) -> float | None:
    """Smallest share of full APE's FLOPs with embedding at which a method's Kendall >= 0.8 and regret <= 1 point."""
    good = [p["flops_with_embed"] / full for p in points if p["kendall"] >= kendall and p["regret"] <= regret]
    return min(good) if good else None


def run(zoo_name: str, data: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    zoo = Zoo(zoo_config(zoo_name, data, out, extra))
    full = trained_point(zoo, "full_ape", "separate", None, zoo.cache.count)
    truth = zoo.top1(full["run"], "truth")
    full = _scored(full, truth)
    lr = zoo.cfg.search.lr or zoo.cfg.train.lr  # the search's learning rate (tuned on the demo: --tune)
    methods = {"hypernet": [_scored(trained_point(zoo, f"hyper_lr{lr:g}_s{s}_k{k}_m{m}", "hypernet", s, m, k, lr=lr),
                                    truth) for s, k, m in HYPER_BUDGETS],
               "truncated_ape": [_scored(trained_point(zoo, f"ape_s{s}_m{m}", "separate", s, m), truth)
                                 for s, m in APE_BUDGETS]}
    for proxy in PROXIES:
        methods[proxy] = [_scored(proxy_point(zoo, proxy, m), truth) for m in PROXY_SAMPLES]
    methods["random"] = [random_point(truth)]
    full_cost = full["flops_with_embed"]
    result = {"zoo": zoo_name, "hypernet_lr": lr, "encoders": zoo.names, "train_pairs": zoo.cache.count,
              "eval_images": {h: len(i) for h, i in zoo.halves.items()}, "eval_set": zoo.probe.dataset.name,
              "truth_top1": truth, "full_ape": full, "eval_embed_flops": zoo.eval_embed_flops, "methods": methods,
              "hypernet_fraction_at_kendall_0.8": fraction_at(methods["hypernet"], full_cost),
              "truncated_ape_fraction_at_kendall_0.8": fraction_at(methods["truncated_ape"], full_cost),
              "proxy_fraction_at_kendall_0.8": {p: fraction_at(methods[p], full_cost) for p in PROXIES},
              "seconds": time.perf_counter() - start}
    return result


def tune(out: Path) -> dict:
    """The hypernetwork's search learning rate, chosen on the demo zoo only (never on the CIFAR test images): Kendall
    and regret against the demo's full APE at three of the budgets, per learning rate."""
    zoo = Zoo(zoo_config("demo", Path(), out))
    truth = zoo.top1(trained_point(zoo, "full_ape", "separate", None, zoo.cache.count)["run"], "truth")
    rows = []
    for lr in (3e-3, 1e-2, 3e-2, 1e-1):
        for steps, k, m in HYPER_BUDGETS[1:4]:
            point = _scored(trained_point(zoo, f"tune_lr{lr:g}_s{steps}_k{k}_m{m}", "hypernet", steps, m, k, lr=lr),
                            truth)
            rows.append({"lr": lr, "steps": steps, "k": k, "samples": m, "kendall": point["kendall"],
                         "regret": point["regret"]})
    by_lr = {lr: float(np.mean([r["kendall"] for r in rows if r["lr"] == lr])) for lr in {r["lr"] for r in rows}}
    return {"zoo": "demo", "rows": rows, "mean_kendall_by_lr": by_lr, "best_lr": max(by_lr, key=by_lr.get)}


def markdown(r: dict) -> str:
    full = r["full_ape"]["flops_with_embed"]
    lines = [f"### Search cost on the {r['zoo']} zoo ({len(r['encoders'])} encoders, {r['train_pairs']} training "
             f"pairs, {r['eval_set']}: {r['eval_images']['search']} images to search, {r['eval_images']['truth']} "
             f"for the truth)", "",
             "| method | budget | train FLOPs | FLOPs with embedding | of full APE | Spearman | Kendall | top-1 hit | "
             "regret (points) | top-3 recall |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for method, points in r["methods"].items():
        for p in points:
            budget = (f"{p['steps']} steps, k={p['k']}, {p['samples']} pairs" if "steps" in p else
                      f"{p['samples']} pairs" if "samples" in p else "expected")
            lines.append(f"| {method} | {budget} | {p['train_flops']:.3g} | {p['flops_with_embed']:.3g} | "
                         f"{p['flops_with_embed'] / full:.3f} | {p['spearman']:.2f} | {p['kendall']:.2f} | "
                         f"{p['top1_hit'] if isinstance(p['top1_hit'], bool) else round(p['top1_hit'], 2)} | "
                         f"{p['regret']:.1f} | {p['top3_recall']:.2f} |")
    f = r["full_ape"]
    lines += [f"| full APE (truth) | {f['steps']} steps, {f['samples']} pairs | {f['train_flops']:.3g} | {full:.3g} | "
              f"1.000 | {f['spearman']:.2f} | {f['kendall']:.2f} | {f['top1_hit']} | {f['regret']:.1f} | "
              f"{f['top3_recall']:.2f} |", "",
              f"Evaluation-set embedding (paid by every method that evaluates): {r['eval_embed_flops']:.3g} FLOPs. "
              f"Kendall >= 0.8 with regret <= 1 point first reached at: hypernetwork "
              f"{_share(r['hypernet_fraction_at_kendall_0.8'])}, truncated APE "
              f"{_share(r['truncated_ape_fraction_at_kendall_0.8'])} of full APE's FLOPs with embedding; proxies: "
              + ", ".join(f"{k} {_share(v)}" for k, v in r["proxy_fraction_at_kendall_0.8"].items()) + "."]
    return "\n".join(lines) + "\n"


def _share(x: float | None) -> str:
    return "never" if x is None else f"{x:.3f}"


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    full = r["full_ape"]
    for ax, metric in zip(axes, ("kendall", "regret")):
        for method, points in r["methods"].items():
            if method == "random":
                ax.axhline(points[0][metric], color="grey", ls=":", label="random (expected)")
                continue
            pts = sorted(points, key=lambda p: p["flops_with_embed"])
            ax.plot([p["flops_with_embed"] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=method)
        ax.plot([full["flops_with_embed"]], [full[metric]], marker="*", ms=14, color="k", ls="", label="full APE")
        ax.set_xscale("log")
        ax.set(xlabel="FLOPs with embedding", ylabel=metric if metric == "kendall" else "regret (points)",
               title=f"{r['zoo']} zoo: {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = files.write_figure(path, fig, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="folder described by ../shared/data/README.md")
    parser.add_argument("--zoo", choices=["real", "demo"], default="real")
    parser.add_argument("--out", default="runs/search_cost", help="where runs and caches go")
    parser.add_argument("--tune", action="store_true", help="sweep the hypernetwork's learning rate on the demo zoo")
    parser.add_argument("overrides", nargs="*", help="config overrides for the zoo, e.g. search.lr=3e-2")
    args = parser.parse_args(argv)
    if args.tune:
        result = tune(Path(args.out))
        files.write_json(RESULTS / "search_tune_demo.json", stamp(result, vars(args)))
        print(json.dumps(result))
        return result
    data = Path(args.data)
    if args.zoo == "real" and not (data / "weights").exists():
        print(json.dumps({"skipped": f"no real data under {data}"}))
        return None
    result = run(args.zoo, data.resolve(), Path(args.out), tuple(args.overrides))
    table = markdown(result)
    print(table)
    result["plot"] = str(plot(result, RESULTS / f"search_cost_{args.zoo}.png"))
    files.write_text(RESULTS / f"search_cost_{args.zoo}.md", table)
    path = RESULTS / "search_cost.json"
    everything = files.read_json(path) if path.exists() else {}
    files.write_json(path, everything | {args.zoo: stamp(result, vars(args))})
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
