"""The README's generated results: each block between `<!-- results: NAME -->` and `<!-- end results -->` in
README.md is rendered from the results file it reports (benchmarks/results/NAME.json; NAME.VIEW: another view of
the same file), with that file's commit and config digest, so a README number is always the one the file holds
(tests/test_readme.py checks).

    python benchmarks/readme_tables.py          # rewrite the blocks from the results files
    python benchmarks/readme_tables.py --check  # exit 1, naming the blocks, when README.md disagrees with them
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from hnet.report_probes import SEGMENTS
from hnet.report_ranking import (
    agreement_markdown,
    cheapest_at_target,
    halving_rungs_markdown,
    pair_grid_markdown,
    search_series,
    share_text,
    truth_resolution_markdown,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def _stamp(p: dict) -> str:
    dirty = " (with uncommitted changes)" if p.get("dirty") else ""
    return f"commit `{p.get('commit', 'unknown')[:12]}`{dirty}, config digest `{p.get('config_digest', '?')}`"


def _source(name: str, r: dict) -> str:
    """The results file's stamp; a file of several stamped entries (search_cost.json: one per zoo) names each."""
    if "provenance" in r:
        return f"_Rendered from `benchmarks/results/{name}.json`: {_stamp(r['provenance'])}._"
    entries = "; ".join(f"{key}: {_stamp(v['provenance'])}" for key, v in r.items()
                        if isinstance(v, dict) and "provenance" in v)
    return f"_Rendered from `benchmarks/results/{name}.json`: {entries or 'commit `unknown`'}._"


def render_demo(r: dict) -> str:
    d = r["datasets"]["demo"]
    lines = ["| zero-shot top-1 (%), mean over the pairs both runs trained | hypernet | separate (APE) | "
             "shuffled-caption control | chance |", "|---|---:|---:|---:|---:|",
             f"| demo (480 held-out images, 24 classes) | {d['hypernet']:.1f} | {d['separate']:.1f} | "
             f"{d['shuffled_control']:.1f} | {d['chance']:.1f} |", "",
             "Pair ranking, hypernetwork against the grid search (separate connectors from seeds no run above "
             f"uses, mean of {r['ranking']['halves']['truth_seeds']}):", "",
             *agreement_markdown(r["ranking"], "hypernet", "separate")]
    held = r.get("held_out")
    if held and "validated" in held:
        v = held["validated"]
        a, b = v["autodecode"], v["separate_best"]
        pct = lambda x: "n/a" if x is None else f"{x:.1f}"
        lines += ["", f"Auto-decoding the held-out image encoder `{held['encoder']}` (both its pairs; points chosen on "
                      "validation images, evaluation half A, and scored on test images, half B):", "",
                  "| | test top-1 (%) | training FLOPs |", "|---|---:|---:|",
                  f"| auto-decoded (step {a['step']}) | {a['top1_test']:.1f} | {a['flops']:.3g} |",
                  f"| separate from scratch, best stopping point | {b['top1_test']:.1f} | {b['flops']:.3g} |",
                  f"| separate at the auto-decoding's FLOPs | {pct(v['separate_test_top1_at_autodecode_flops'])} | "
                  f"{a['flops']:.3g} |",
                  f"| auto-decoding, its last point within the separate connector's best FLOPs | "
                  f"{pct(v['autodecode_test_top1_at_separate_best_flops'])} | {b['flops']:.3g} |"]
        reach = v["separate_flops_to_autodecode_accuracy"]
        lines += ["", "The separate connector reached the auto-decoded validation accuracy after "
                      + ("never" if reach is None else f"{reach:.3g} FLOPs (x{v['flops_ratio_at_equal_accuracy']:.2f} "
                                                       "of the auto-decoding's)")
                      + f"; against its whole run (secondary): x{held['flops_ratio'] or 0:.1f} training FLOPs, "
                        f"x{held['flops_ratio_with_embed']:.1f} with each side's encoder forwards."]
    for name, pair in r.get("held_out_pairs", {}).items():
        lines += ["", f"The pair the hypernetwork never trained, `{name}` (generated from its encoders' vectors, each "
                      f"trained in other pairs): {pair['hypernet_untrained']:.1f}% top-1, against "
                      f"{pair['separate']:.1f}% for its separate connector."]
    search = r.get("search")
    if search and "agreement" in search:
        ratio = search["ratio"]
        lines += ["", f"The search at `configs/demo.yaml`'s budget ({search['flops']['steps']} hypernetwork steps over "
                      f"{search['flops']['samples_embedded']} pairs) against the grid search: the grid search costs "
                      f"x{ratio['total_with_embed']:.2f} the search's FLOPs with every embedding pass, "
                      f"x{ratio['train']:.2f} in training alone.", "",
                  *agreement_markdown(search["agreement"], "search", "grid search")]
    return "\n".join(lines)


def _gap(g: dict, what: str) -> str:
    value = g.get("mean", g.get("gap"))
    return f"{what}: {value:+.1f} points (95% CI [{g['ci'][0]:+.1f}, {g['ci'][1]:+.1f}])"


def render_real_zoo(r: dict) -> str:
    e = r["embedding"]
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    lines = ["| pair (image + text) | APE top-1 (mean +- sd over seeds) | hypernet top-1 | APE text->image R@5 | "
             "hypernet text->image R@5 | APE first caption only, R@5 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['pair']} | {p['ape_top1']:.1f} +- {p['ape_top1_sd']:.1f} | {fmt(p['hypernet_top1'])} | "
              f"{p['ape_r5']:.1f} +- {p['ape_r5_sd']:.1f} | {fmt(p['hypernet_r5'])} | "
              f"{fmt(p['ape_first_caption_r5'])} |"
              for p in r["pairs"]]
    c = r["control"]
    lines += ["", f"Top-1: CIFAR-10 zero-shot ({r['ranking']['halves']['method'] * 2} class-balanced test images); "
                  f"R@5: Flickr8k val, 1,000 images x 5 captions. APE: {len(r['ape_seeds'])} seeds. Chance "
                  f"{c['chance']:.0f}%; the shuffled-caption control (hypernetwork) {c['shuffled_control']:.1f}%.", "",
              "- " + _gap(r["all_captions_minus_first_r5"], "Training on all 5 captions instead of the first, APE, "
                                                            "text->image R@5 (interval over the pairs)"),
              "- " + _gap(r["hypernet_minus_ape_r5"], "Hypernetwork minus APE, text->image R@5, pairs it trained "
                                                      "(interval over the pairs)"),
              "- " + _gap(r["hypernet_minus_ape_top1"], "Hypernetwork minus APE, zero-shot top-1 (interval over "
                                                        "images and APE seeds)"), "",
              "N x M grid, zero-shot top-1 (hypernet / APE mean over seeds):", "", *pair_grid_markdown(**r["grid"]),
              "", "Pair ranking, hypernetwork against APE from seeds it never used:", "",
              *agreement_markdown(r["ranking"], "hypernet", "APE")]
    held = r.get("held_out_image")
    if held and "validated" in held:
        a, b = held["validated"]["autodecode"], held["validated"]["separate_best"]
        lines += ["", f"Auto-decoding the held-out image encoder `{held['encoder']}` (points chosen on validation "
                      f"images, scored on test images): {a['top1_test']:.1f}% top-1 at {a['flops']:.3g} training "
                      f"FLOPs; "
                      f"its separate connector at its best stopping point {b['top1_test']:.1f}% at {b['flops']:.3g}; "
                      f"with each side's encoder forwards the separate connector costs "
                      f"x{held['flops_ratio_with_embed']:.2f} the auto-decoding."]
    t = r["held_out_text"]
    lines += ["", f"Auto-decoding the text encoder `{t['text_encoder']}` into a hypernetwork trained without it: "
                  f"{t['decoded_top1']:.1f}% top-1 (mean over its {len(t['decoded_pairs_top1'])} pairs) against "
                  f"{t['ape_top1_same_pairs']:.1f}% for APE's connectors of the same pairs; {t['decode_flops']:.3g} "
                  f"decoding FLOPs, {t['embed_flops']:.3g} for its forwards over {t['embed_captions']} captions "
                  f"(APE: {t['ape_train_flops_per_pair']['train']:.3g} training FLOPs per pair).",
              "", f"Embedding pass (this 2-core CPU, once): {e['train_images']} training images x 7 image encoders and "
                  f"{e['train_captions']} captions x 3 text encoders in {e['train_seconds'] / 60:.0f} min; the "
                  f"evaluation sets in {e['eval_seconds'] / 60:.0f} min."]
    return "\n".join(lines)


def _search_cost_zoo(r: dict) -> list[str]:
    """Per method: the cheapest budget meeting the target, else its best point within a tenth of the cost."""
    target = r["target"]
    cheapest = cheapest_at_target(r["points"], target)
    expected_only = cheapest_at_target(r["points"], target, upper_bound=False)
    iv = lambda p, k, f: f"{p[k]:{f}} [{p['ci'][k][0]:{f}}, {p['ci'][k][1]:{f}}]"
    lines = [f"| method | cheapest budget with regret <= {target['regret']:g} (upper 95% <= "
             f"{target['regret_upper']:g}) | its share of grid search's FLOPs | regret (points) | Kendall | "
             f"best pair found | cheapest share at expected regret <= {target['regret']:g}, upper bound aside |",
             "|---|---|---:|---:|---:|---|---:|"]
    for method in dict.fromkeys(map(search_series, r["points"])):
        points = [p for p in r["points"] if search_series(p) == method]
        share = cheapest.get(method)
        if share is not None:
            p = min((q for q in points if q["share"] == share), key=lambda q: q["regret"])
            budget = p["budget"]
        else:
            within = [q for q in points if q["share"] <= target["share"]] or points
            p = min(within, key=lambda q: (q["regret"], q["share"]))
            budget = f"never; best within {target['share']:g}: {p['budget']}" if p["share"] <= target["share"] \
                else f"never; best: {p['budget']}"
        lines.append(f"| {method} | {budget} | {p['share']:.4f} | {iv(p, 'regret', '.1f')} | {iv(p, 'kendall', '.2f')} "
                     f"| {', '.join(p['predicted_best'][:2]) or '-'} | {share_text(expected_only[method])} |")
    c = r["ceiling"]
    lines += ["", f"{r['pairs']} pairs; truth: {r['truth_seeds']} grid searches from seeds no method uses, scored on "
                  f"{r['truth_images']} evaluation images no method saw"
                  + (f" (methods that evaluate decide on {r['decision_images']} others)" if "decision_images" in r
                     else "") + "; its split-half ceiling Kendall "
                  f"{c['kendall']:.2f} [{c['ci']['kendall'][0]:.2f}, {c['ci']['kendall'][1]:.2f}]; true best pair "
                  f"{', '.join(r['true_best'])}. Share 0 = a method that computes nothing (prior, random)."
                  + truth_resolution_markdown(r)]
    return lines + halving_rungs_markdown(r)


def render_search_cost(r: dict) -> str:
    lines = []
    for zoo, title in (("real", "Real zoo (Flickr8k, 7 x 3 pretrained encoders, CIFAR-10 truth)"),
                       ("demo", "Demo zoo (built-in data, 10 x 2 random-init encoders)")):
        if zoo in r:
            lines += [f"**{title}** (`benchmarks/results/search_cost_{zoo}.md`, commit "
                      f"`{r[zoo].get('provenance', {}).get('commit', 'unknown')[:12]}`):", "",
                      *_search_cost_zoo(r[zoo]), ""]
    return "\n".join(lines).rstrip()


def render_longtail_real(r: dict) -> str:
    b, segs = r["boundaries"], r["segments"]
    cell = lambda row, s: ("-" if r["rows"][row][s] is None else
                           f"{r['rows'][row][s]:+.1f} [{r['ci'][row][s][0]:+.1f}, {r['ci'][row][s][1]:+.1f}]"
                           if "minus" in row else
                           f"{r['rows'][row][s]:.1f} [{r['ci'][row][s][0]:.1f}, {r['ci'][row][s][1]:.1f}]")
    named = lambda s: ", ".join(c for c, g in zip(r["classes"], segs) if g == s) or "none"
    lines = ["| zero-shot top-1 (%), mean over pairs (95% CI) | " +
             " | ".join(f"{s} ({b[s]} captions: {named(s)})" for s in SEGMENTS) + " |",
             "|---|" + "---:|" * len(SEGMENTS)]
    lines += [f"| {row} | " + " | ".join(cell(row, s) for s in SEGMENTS) + " |" for row in r["rows"]]
    counts = ", ".join(f"{c} {n}" for c, n in zip(r["classes"], r["counts"]))
    lines += ["", f"{r['dataset']}, {r['images']} images, {len(r['pairs'])} pairs; APE: {len(r['ape_seeds'])} seeds. "
                  f"Training-caption counts ({r['matching']}): {counts}. Intervals: {r['bootstrap']} bootstrap "
                  "resamples of the images within each class and of APE's seeds."]
    return "\n".join(lines)


GRID_PARTS = {"embed": "embedding the training data (every image and caption, every encoder)",
              "train": "training the connectors", "eval_embed": "embedding the evaluation images, every encoder",
              "eval_heads": "zero-shot heads (class-name prompts) and logits"}


def render_grid_cost(r: dict) -> str:
    """Where the real zoo's grid search (APE over every pair) spends its FLOPs, by the ledger's parts."""
    cost = r["real"]["grid_cost"]
    total = cost["total_with_embed"]
    lines = ["| part of the grid search on the real zoo | FLOPs | share |", "|---|---:|---:|"]
    share = lambda x: f"{x:.1%}" if x >= 0.01 else f"{x:.2%}"
    lines += [f"| {label} | {cost[key]:.3g} | {share(cost[key] / total)} |" for key, label in GRID_PARTS.items()]
    lines += [f"| total | {total:.3g} | 100% |", "", f"{r['real']['pairs']} pairs; forward + backward, 1 multiply-add "
              "= 2 FLOPs (docs/flops.md)."]
    return "\n".join(lines)


def _connector_label(name: str, c: dict) -> str:
    if c["kind"] == "moe":
        return f"moe: {c['experts']} x mlp(hidden {c['hidden']}), top-{c['top_k']}"
    if c["kind"] == "mlp":
        return f"dense mlp, hidden {c['hidden']}" + (" (matched FLOPs)" if name == "dense_flops" else "")
    return "linear (the real zoo's connector)"


def render_moe_real(r: dict) -> str:
    iv = lambda x, f="+.2f": f"{x['gap']:{f}} [{x['ci'][0]:{f}}, {x['ci'][1]:{f}}]"
    lines = [f"| connector (APE, {len(r['pairs'])} pairs, {r['seeds']} seeds) | active params per pair | params per "
             f"pair | training FLOPs (ledger, per run) | {r['dataset']} zero-shot top-1 (95% CI) | per seed |",
             "|---|---:|---:|---:|---:|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {_connector_label(name, v['connector'])} | {v['active_params_per_pair']:,.0f} | "
                     f"{v['params_per_pair']:,.0f} | {v['ledger_train_flops']:.3g} | {v['top1']:.2f} "
                     f"[{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] | {', '.join(f'{x:.1f}' for x in v['per_seed'])} |")
    lines += ["", "| comparison | moe minus dense, points (95% CI) | pairs higher / lower | FLOPs ratio | "
                  "active params ratio | verdict |", "|---|---:|---:|---:|---:|---|"]
    for label, c in r["comparisons"].items():
        lines.append(f"| {label} (vs {_connector_label(c['dense'], r['variants'][c['dense']]['connector'])}) | "
                     f"{iv(c)} | {c['pairs_higher']} / {c['pairs_lower']} | {c['flops_ratio']:.3f} | "
                     f"{c['active_params_ratio']:.3f} | {c['verdict']} |")
    lines += ["", "Intervals: bootstrap over the evaluation images and the seeds, drawn once for both sides of a "
                  "comparison; a winner is named only where the interval excludes 0."]
    return "\n".join(lines)


RENDER = {"demo": render_demo, "moe_real": render_moe_real, "real_zoo": render_real_zoo,
          "search_cost": render_search_cost, "longtail_real": render_longtail_real,
          "search_cost.grid_cost": render_grid_cost}


def rendered(name: str) -> str:
    file = name.split(".")[0]
    result = json.loads((RESULTS / f"{file}.json").read_text())
    return RENDER[name](result) + "\n\n" + _source(file, result) + "\n"


def update(text: str) -> tuple[str, list[str]]:
    """README text with every block rendered again, and the names of the blocks that changed."""
    changed = []

    def block(m: re.Match) -> str:
        body = rendered(m["name"])
        if body != m["body"]:
            changed.append(m["name"])
        return m.group(1) + body + m.group(4)
    return BLOCK.sub(block, text), changed


def main(argv: list[str]) -> int:
    text = README.read_text()
    new, changed = update(text)
    if "--check" in argv:
        if changed:
            print(f"README.md: results block(s) {changed} differ from benchmarks/results; run "
                  f"python benchmarks/readme_tables.py")
        return 1 if changed else 0
    README.write_text(new)
    print(f"README.md: rewrote {changed or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
