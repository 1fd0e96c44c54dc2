"""What it costs to find the best (image encoder, text encoder) pair: every search method at several budgets, as a
share of a grid search's TOTAL FLOPs (every embedding pass, training, evaluation), against the truth.

Zoos: `real` (configs/flickr8k_real.yaml: Flickr8k train, 7 pretrained image x 3 text encoders, 21 pairs; scored on
the whole CIFAR-10 test set, 5,000 images per half: on real_zoo.py's 2,000 the truth itself could not resolve the
target's 2 points, a pick of its own best pair already had an upper bound of 4; the training caches are
benchmarks/real_zoo.py's) and `demo` (configs/demo.yaml: built-in data, 10 random-init image x 2 text encoders).

Protocol:
- truth: the grid search (separate connectors, APE, every pair at the config's full schedule) from
  `search.truth_seeds` seeds that no method uses (init and data order), averaged; scored on half B of the
  evaluation images. Methods that evaluate (grid search at the config's own seed, truncated APE, the hypernetwork)
  are scored on half A (real zoo: on a random 1,000 of it, so that what a method pays to decide does not grow with
  the truth's size); halving decides on held-out training samples and proxies on training features, so they see
  no evaluation image. Every figure: 95% bootstrap interval (images of both halves, truth seeds), next to the
  truth's own split-half ceiling (the truth on the images a method decides on vs the truth on half B).
- cost: what each method computes: its embedding passes (only the samples and encoders it asks for; one caption
  per image where it uses one), its training, its scoring (for methods that evaluate: the forwards of the images they
  decide on, every encoder). The grid search's own total (its ledger: full embedding, training, evaluation of every
  pair on the images it decides on, as any method that evaluates) is the denominator.
- regret: points of true top-1 lost by taking the method's best pair (expected over ties). The truth's resolution:
  the interval of a pick of the true best pair itself (no method's upper bound can be lower).
Runs are reused only when their recorded config digest equals the current one. Writes
benchmarks/results/search_cost.json (one entry per zoo, stamped), search_cost_<zoo>.md and search_cost_<zoo>.png.

    python benchmarks/search_cost.py --zoo real --data ../shared/data --encoders ~/.cache/hnet-real-encoders
    python benchmarks/search_cost.py --zoo demo
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from hnet import files, runs  # noqa: E402
from hnet.config import Config, dataset_name, load_config  # noqa: E402
from hnet.data.cache import CachedFeatures  # noqa: E402
from hnet.eval.ranking import agreement, read_truth_hits, scores_agreement, split_agreement, split_halves  # noqa: E402
from hnet.experiments.budget import searcher_settings  # noqa: E402
from hnet.experiments.budgeted_search import run_budgeted_search  # noqa: E402
from hnet.experiments.pipeline import grid_config  # noqa: E402
from hnet.experiments.proxies import PROXIES  # noqa: E402
from hnet.experiments.search import truth_configs  # noqa: E402
from hnet.experiments.search_data import copy_range  # noqa: E402
from hnet.experiments.train_run import embed_training_data, trained_and_evaluated  # noqa: E402
from hnet.files import MANIFEST  # noqa: E402
from hnet.models.encoders import text_key  # noqa: E402
from hnet.provenance import stamp  # noqa: E402
from hnet.report_ranking import (  # noqa: E402
    cheapest_at_target,
    halving_rungs_markdown,
    search_series,
    share_text,
    truth_resolution_markdown,
)

sys.path.insert(0, str(Path(__file__).parent))
import real_zoo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"regret": 1.0, "regret_upper": 2.0, "share": 0.1}  # the goal: regret <= 1 (upper 95% <= 2) at <= 1/10
TUNED = ", lr tuned on search data"  # a halving method whose rungs pick their lr among BUDGETS' lrs (search.lrs)
FILTERED = " prefilter" + TUNED  # "halving, PROXY prefilter, ...": after PROXY on the held-out samples kept 1/eta
BUDGETS = {  # per zoo: (steps, samples) of truncated APE; (steps, k, samples) of the hypernetwork; halving rung 0
    # samples, and the learning rates a tuned halving tries at each rung; decision_images: the evaluation images a
    # method that evaluates (the grid search included) decides on and pays for, drawn from half A (absent: all of it)
    "real": {"ape": [(10, 128), (25, 256), (50, 500), (100, 1000)],
             "hypernet": [(25, 0, 256), (50, 0, 500), (100, 0, 1000), (230, 0, 6000)],
             "halving": [64, 128, 256], "proxy": [250, 500, 1000, 2000], "val": 250, "rung_steps": 20,
             "lrs": [2e-3, 6e-3, 2e-2, 6e-2], "decision_images": 1000},
    "demo": {"ape": [(10, 100), (20, 250), (40, 500)],
             "hypernet": [(20, 0, 250), (40, 0, 500), (160, 0, 1000)],
             "halving": [32, 64, 128], "proxy": [125, 250, 500], "val": 200, "rung_steps": 20,
             "lrs": [3e-3, 1e-2, 3e-2, 1e-1]},
}


def zoo_config(zoo: str, data: Path, encoders: Path, out: Path) -> Config:
    if zoo == "real":  # every method is scored by zero-shot top-1 only: the retrieval set would cost 20 idle minutes
        return real_zoo.real_config(data, encoders, out, ["eval.retrieval=", "eval.max_images=0"])
    return load_config("configs/demo.yaml", [f"out_root={out}", "held_out=", "train.eval_every=0"])


def _train_eval(cfg: Config, dataset: str) -> Path:
    trained_and_evaluated(cfg, [dataset])
    return cfg.run_dir


def _prefix(cfg: Config, samples: int) -> None:
    """The training cache of the first `samples` images cut from the full one (all their captions; identities and
    FLOPs per sample kept), so that a budgeted run finds its features without embedding them again; its ledger
    charges the embedding all the same."""
    full = CachedFeatures(cfg.cache_root)
    root = cfg.cache_root / f"first_{samples}"
    if samples >= full.count or (root / MANIFEST).exists():
        return
    copy_range(full, root, 0, samples, [n for n in full.manifest["encoders"] if n not in ("caption_counts", "labels")])


class Bench:
    def __init__(self, zoo: str, cfg: Config, budgets: dict | None = None, signal_cfg: Config | None = None):
        """`signal_cfg`: the config whose grid search at its own seed, evaluated on its retrieval set, gives halving's
        decision signal at full training (real_zoo.py's settings; None: not measured)."""
        self.zoo, self.budgets, self.signal_cfg = zoo, budgets or BUDGETS[zoo], signal_cfg
        self.cfg = dataclasses.replace(cfg, held_out="", held_out_pairs=[])
        self.dataset = dataset_name(cfg.eval.datasets[0])
        embed_training_data(self.cfg)
        self.truth_runs = [_train_eval(t, cfg.eval.datasets[0]) for t in truth_configs(self.cfg)]
        grid = dataclasses.replace(self.cfg, name=f"{cfg.name}_grid", method="separate")
        self.grid_run = _train_eval(grid, cfg.eval.datasets[0])
        self.names = files.read_json(self.grid_run / runs.MODEL)["names"]
        self.truth = read_truth_hits(self.truth_runs, self.dataset, self.names)
        _, half_b = split_halves(self.truth.shape[2])
        self.truth_b = dict(zip(self.names, self.truth.mean(axis=0)[:, half_b].mean(axis=1) * 100))
        n = self.truth.shape[2]
        self.decision_images = self.budgets.get("decision_images") or len(split_halves(n)[0])
        # what evaluating to decide costs, the same for the grid search (the denominator) and every method
        self.decision_share = self.decision_images / n
        self.full = self.cost(self.grid_run, self.decision_share)

    def cost(self, run_dir: Path, evaluated_share: float) -> dict:
        """A run's ledger: embedding, training, and evaluation on the zero-shot set (forwards of `evaluated_share` of
        its images: a method scored on half A needs only those)."""
        phases = files.read_json(run_dir / runs.FLOPS)["phases"]
        spent = runs.zero_shot_eval_flops(run_dir, self.dataset)
        eval_embed, heads = spent["embed"] * evaluated_share, spent["heads"] * evaluated_share
        total = phases["embed"]["flops"] + phases["train"]["flops"] + eval_embed + heads
        return {"embed": phases["embed"]["flops"], "train": phases["train"]["flops"], "eval_embed": eval_embed,
                "eval_heads": heads, "total_with_embed": total}

    def point(self, method: str, budget: str, figures: dict, cost: dict) -> dict:
        share = cost["total_with_embed"] / self.full["total_with_embed"]
        keep = {k: figures[k] for k in ("kendall", "spearman", "regret", "top1_hit", "top3_recall", "predicted_best")}
        return {"method": method, "budget": budget, **keep, "ci": figures["ci"], "cost": cost, "share": share,
                "share_without_eval": (cost["total_with_embed"] - cost["eval_embed"]) /
                (self.full["total_with_embed"] - self.full["eval_embed"])}

    def evaluated(self, method: str, budget: str, run_cfg: Config) -> dict:
        """A method that evaluates: its hits on half A against the truth on half B."""
        run_dir = _train_eval(run_cfg, self.cfg.eval.datasets[0])
        hits = runs.read_hits(run_dir, self.dataset, self.names)
        return self.point(method, budget, self.split(hits), self.cost(run_dir, self.decision_share))

    def split(self, hits) -> dict:
        """A method's hits on its decision images of half A against the truth on half B."""
        return split_agreement(hits, self.truth, self.names, method_images=self.decision_images)

    def budget_run(self, tag: str, method: str, steps: int, samples: int, k: int = 0, **train_kw) -> Config:
        count = CachedFeatures(self.cfg.cache_root).count
        samples = min(samples, count)
        _prefix(self.cfg, samples)
        t = dataclasses.replace(self.cfg.train, max_steps=steps, epochs=max(self.cfg.train.epochs, float(steps)),
                                encoders_per_step=k, batch_size=min(self.cfg.train.batch_size, samples),
                                warmup_steps=max(1, min(self.cfg.train.warmup_steps, steps // 10)), **train_kw)
        data = dataclasses.replace(self.cfg.data, samples_per_encoder=0 if samples >= count else samples)
        return dataclasses.replace(self.cfg, name=f"{self.cfg.name}_{tag}", method=method, train=t, data=data)

    def searched(self, method: str, budget: str, label: str = "", **search) -> dict:
        """A budgeted search (halving, hypernet-halving, proxy) scored on half B only; a halving search also says, rung
        by rung, how its scores agreed with the truth and whether it kept the true best pair."""
        cfg = dataclasses.replace(self.cfg, name=f"{self.cfg.name}_{budget.replace(' ', '').replace(',', '_')}",
                                  search=dataclasses.replace(self.cfg.search, method=method, **search))
        out = run_budgeted_search(cfg, self.truth_runs)
        f = out["flops"]
        cost = {"embed": f["embed"], "train": f["train"], "eval_embed": 0.0, "eval_heads": f["eval_heads"],
                "total_with_embed": f["total_with_embed"]}
        cut = [out["prefilter"] | {"rung": -1, "samples": b["val_samples"], "steps": 0, "lr": None}
               for b in [out["budget"]] if out.get("prefilter")]
        rungs = {"rungs": [self.rung_figures(r) for r in cut + out["rungs"]]} if cut + (out.get("rungs") or []) \
            else {}
        return self.point(label or method, budget, out["agreement"], cost) | {"best_found": out["best"]} | rungs

    def rung_figures(self, rung: dict) -> dict:
        """One halving rung against the truth on half B: Kendall of its scores over its pairs (with the interval),
        whether the true best pair was among them and whether it was kept."""
        names = list(rung["scores"])
        truth = self.truth[:, [self.names.index(n) for n in names]]
        got = scores_agreement(rung["scores"], truth, names)
        top = max(self.truth_b.values())
        best = [n for n, v in self.truth_b.items() if v == top]
        return {"rung": rung["rung"], "pairs": len(names), "samples": rung["samples"], "steps": rung["steps"],
                "lr": rung.get("lr"), "kendall": got["kendall"], "kendall_ci": got["ci"]["kendall"],
                "true_best_in": any(b in names for b in best), "true_best_kept": any(b in rung["kept"] for b in best)}

    def retrieval_signal(self) -> dict | None:
        """Halving's decision signal at full training: caption retrieval (mean of R@1/5/10 both ways) of APE's
        connectors at the config's own seed on the zoo's retrieval set (benchmarks/real_zoo.py's run, which evaluates
        retrieval, trained here when absent; this benchmark's grid run does not), against the zero-shot truth on
        half B; None without a signal config."""
        if self.signal_cfg is None:
            return None
        ape = grid_config(dataclasses.replace(self.signal_cfg, name=f"{self.signal_cfg.name}_signal"))
        trained_and_evaluated(ape, ape.eval.datasets)
        run = ape.run_dir
        result = files.read_json(run / runs.EVAL) if (run / runs.EVAL).exists() else {}
        recalls = result.get("retrieval", {})
        if not all(n in recalls for n in self.names):
            return None
        scores = {n: float(np.mean([v for d in ("image_to_text", "text_to_image") for v in recalls[n][d].values()]))
                  for n in self.names}
        got = scores_agreement(scores, self.truth, self.names)
        return {"run": str(run), "kendall": got["kendall"], "regret": got["regret"], "ci": got["ci"],
                "predicted_best": got["predicted_best"]}

    def resolution(self) -> dict:
        """The truth's resolution: the regret interval of a pick of the true best pair (on half B) itself."""
        return scores_agreement(self.truth_b, self.truth, self.names)["resolution"]

    def prior(self) -> dict:
        """A static prior: the pair whose encoders compute the most per sample is ranked best (no cost)."""
        per_sample = CachedFeatures(self.cfg.cache_root).manifest["flops_per_sample"]
        scores = {}
        for name in self.names:
            image, _, text = name.partition(" + ")
            scores[name] = per_sample[image] + per_sample[text_key(text or self.cfg.texts[0])]
        return self.point("prior: encoder FLOPs", "none", scores_agreement(scores, self.truth, self.names),
                          {"embed": 0.0, "train": 0.0, "eval_embed": 0.0, "eval_heads": 0.0, "total_with_embed": 0.0})

    def random(self, draws: int = 2000) -> dict:
        """A uniformly random ranking's expected figures against the truth on half B (no cost)."""
        rng = np.random.default_rng(0)
        got = [agreement(dict(zip(self.names, rng.permutation(len(self.names)).astype(float))), self.truth_b)
               for _ in range(draws)]
        mean = {k: float(np.mean([g[k] for g in got])) for k in ("kendall", "spearman", "regret", "top1_hit",
                                                                   "top3_recall")}
        ci = {k: [float(np.percentile([g[k] for g in got], 2.5)), float(np.percentile([g[k] for g in got], 97.5))]
              for k in mean}
        return self.point("random", "expected", mean | {"ci": ci, "predicted_best": []},
                          {"embed": 0.0, "train": 0.0, "eval_embed": 0.0, "eval_heads": 0.0, "total_with_embed": 0.0})

    def run(self) -> list[dict]:
        b, c = self.budgets, self.cfg
        lr, wd = searcher_settings(c)
        grid = self.split(runs.read_hits(self.grid_run, self.dataset, self.names))
        points = [self.point("grid search (APE, own seed)", "full", grid, self.full)]
        points += [self.evaluated("truncated APE", f"{s} steps, {m} samples", self.budget_run(f"ape_s{s}_m{m}",
                                                                                               "separate", s, m))
                   for s, m in b["ape"]]
        points += [self.evaluated("hypernet", f"{s} steps, {m} samples",
                                  self.budget_run(f"hyper_s{s}_k{k}_m{m}", "hypernet", s, m, k, lr=lr, weight_decay=wd))
                   for s, k, m in b["hypernet"]]
        rung = {"val_samples": b["val"], "rung_steps": b["rung_steps"]}
        for method in ("halving", "hypernet-halving"):
            points += [self.searched(method, f"{method} r0 {n}", rung_samples=n, lrs=[], prefilter="", **rung)
                       for n in b["halving"]]
            points += [self.searched(method, f"{method} r0 {n} lrs", method + TUNED, rung_samples=n, lrs=b["lrs"],
                                     prefilter="", **rung) for n in b["halving"] if b.get("lrs")]
        # every proxy as the prefilter (none chosen by its agreement with the truth), at the middle rung-0 size
        n = b["halving"][len(b["halving"]) // 2]
        points += [self.searched("halving", f"halving r0 {n} {proxy} lrs", f"halving, {proxy}{FILTERED}",
                                 rung_samples=n, lrs=b["lrs"], prefilter=proxy, **rung)
                   for proxy in b.get("proxies", PROXIES) if b.get("lrs")]
        for proxy in b.get("proxies", PROXIES):
            points += [self.searched("proxy", f"{proxy} {n}", proxy=proxy, proxy_samples=n, lrs=[], prefilter="")
                       for n in b["proxy"]]
        return points + [self.prior(), self.random()]


def markdown(r: dict) -> str:
    lines = [f"### Finding the best pair on the {r['zoo']} zoo ({r['pairs']} pairs; truth: {r['truth_seeds']} grid "
             f"searches from seeds no method uses, on {r['truth_images']} evaluation images{decides(r)})", "",
             "| method | budget | share of grid search's FLOPs | without evaluation | regret (points) | Kendall | "
             "top-1 hit | best pair |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for p in r["points"]:
        ci = p["ci"]
        lines.append(f"| {p['method']} | {p['budget']} | {p['share']:.4f} | {p['share_without_eval']:.4f} | "
                     f"{p['regret']:.1f} [{ci['regret'][0]:.1f}, {ci['regret'][1]:.1f}] | {p['kendall']:.2f} "
                     f"[{ci['kendall'][0]:.2f}, {ci['kendall'][1]:.2f}] | {p['top1_hit']:.2f} | "
                     f"{', '.join(p['predicted_best'][:2]) or '-'} |")
    c = r["ceiling"]
    lines += ["", f"Truth's split-half ceiling: Kendall {c['kendall']:.2f} [{c['ci']['kendall'][0]:.2f}, "
                  f"{c['ci']['kendall'][1]:.2f}]; true best pair: {', '.join(r['true_best'])}. Target: expected regret "
                  f"<= {TARGET['regret']:g} point (upper 95% <= {TARGET['regret_upper']:g}) at <= "
                  f"{TARGET['share']:g} of the grid search's FLOPs. Cheapest share meeting it: "
                  + shares(cheapest_at_target(r["points"], r["target"])) + ". Cheapest share at expected regret <= "
                  f"{TARGET['regret']:g} point, its upper bound aside: "
                  + shares(cheapest_at_target(r["points"], r["target"], upper_bound=False)) + "."
                  + truth_resolution_markdown(r)]
    return "\n".join(lines + halving_rungs_markdown(r)) + "\n"


def shares(cheapest: dict) -> str:
    return ", ".join(f"{m} {share_text(s)}" for m, s in cheapest.items())


def decides(r: dict) -> str:
    return f"; methods that evaluate decide on {r['decision_images']} others" if "decision_images" in r else ""


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = list(dict.fromkeys(map(search_series, r["points"])))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for ax, metric in zip(axes, ("regret", "kendall")):
        for i, method in enumerate(methods):
            pts = sorted((p for p in r["points"] if search_series(p) == method), key=lambda p: p["share"])
            x = [max(p["share"], 1e-5) for p in pts]
            y = [p[metric] for p in pts]
            # a point can fall outside its percentile interval (a skewed bootstrap): no negative bar
            err = [[max(0.0, p[metric] - p["ci"][metric][0]) for p in pts],
                   [max(0.0, p["ci"][metric][1] - p[metric]) for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="os^vD<>"[i % 7], ms=3, capsize=2, label=method,
                        color=colors[i % len(colors)])
        if metric == "regret":
            ax.axhline(TARGET["regret"], color="k", ls=":", lw=1)
            ax.axvline(TARGET["share"], color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set(xlabel="share of the grid search's total FLOPs (zero-cost methods at 1e-5)",
               ylabel="regret (points)" if metric == "regret" else "Kendall vs truth", title=f"{r['zoo']}: {metric}")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    out = files.write_figure(path, fig, dpi=120)
    plt.close(fig)
    return out


def in_repo(path: Path) -> str:
    """A path as the results file records it: relative to the repository where it lies inside it."""
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def render(zoo: str) -> dict:
    """The table and plot of a measured entry, drawn again from search_cost.json (e.g. after a change of layout)."""
    path = RESULTS / "search_cost.json"
    entries = files.read_json(path) if path.exists() else {}
    if zoo not in entries:
        raise SystemExit(f"{path}: no '{zoo}' entry to render; run `python benchmarks/search_cost.py --zoo {zoo}`")
    result = entries[zoo]
    files.write_text(RESULTS / f"search_cost_{zoo}.md", markdown(result))
    plot(result, RESULTS / f"search_cost_{zoo}.png")
    return result


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=["real", "demo"], default="real")
    parser.add_argument("--data", default=real_zoo.SHARED_DATA, help="folder described by ../shared/data/README.md")
    parser.add_argument("--encoders", default=real_zoo.DEFAULT_ENCODERS, help="OUT folder of real_encoders/build.sh")
    parser.add_argument("--out", default=None, help="runs and caches (default runs/real_zoo, runs/search_cost/demo)")
    parser.add_argument("--no-signal", action="store_true",
                        help="real zoo: skip halving's decision signal at full training (it embeds the Flickr8k val "
                             "images and captions: ~10 minutes on a 2-core CPU)")
    parser.add_argument("--render", action="store_true",
                        help="only redraw search_cost_<zoo>.md and .png from search_cost.json's entry (no run)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.zoo)
    data, encoders = Path(args.data).expanduser().resolve(), Path(args.encoders).expanduser().resolve()
    if args.zoo == "real" and (missing := real_zoo.missing_inputs(data, encoders)):
        print(f"SKIP search_cost --zoo real: missing {', '.join(missing)} (see ../shared/data/README.md)")
        return None
    out = Path(args.out or ("runs/real_zoo" if args.zoo == "real" else "runs/search_cost/demo"))
    start = time.perf_counter()
    cfg = zoo_config(args.zoo, data, encoders, out)
    # the signal's run: real_zoo.py's settings (its retrieval set), zero-shot on this benchmark's images (no 2nd pass)
    signal = real_zoo.real_config(data, encoders, out, ["eval.max_images=0"]) \
        if args.zoo == "real" and not args.no_signal else None
    bench = Bench(args.zoo, cfg, signal_cfg=signal)
    points = bench.run()
    top = max(bench.truth_b.values())
    result = {"zoo": args.zoo, "pairs": len(bench.names), "truth_seeds": len(bench.truth_runs),
              "truth_images": len(split_halves(bench.truth.shape[2])[1]),
              "decision_images": bench.decision_images,
              "true_best": [n for n, v in bench.truth_b.items() if v == top], "truth_top1": bench.truth_b,
              "ceiling": bench.split(bench.truth.mean(axis=0))["ceiling"],
              "resolution": bench.resolution(),
              "grid_cost": bench.full, "points": points, "cheapest": cheapest_at_target(points, TARGET),
              "target": TARGET,
              "retrieval_signal": bench.retrieval_signal(),
              "seconds": round(time.perf_counter() - start, 1)}
    table = markdown(result)
    print(table)
    result["plot"] = in_repo(plot(result, RESULTS / f"search_cost_{args.zoo}.png"))
    files.write_text(RESULTS / f"search_cost_{args.zoo}.md", table)
    path = RESULTS / "search_cost.json"
    everything = files.read_json(path) if path.exists() else {}
    files.write_json(path, everything | {args.zoo: stamp(result, cfg)})
    print(json.dumps({"zoo": args.zoo, "cheapest": result["cheapest"], "seconds": result["seconds"]}))
    return result


if __name__ == "__main__":
    main()
