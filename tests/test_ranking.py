"""Ranking figures a decision can rest on: tie-aware, method and truth on disjoint evaluation images, intervals."""
import numpy as np
import pytest

from hnet.eval.ranking import agreement, in_top_k, split_agreement, split_halves
from hnet.report_ranking import agreement_markdown


def test_ties_are_expected_values_whatever_the_order():
    """Two pairs tie as the predicted best: one is the true best, the other the true worst. Regret is the mean of
    taking either (5 points), the top-1 hit a coin flip, in any key order."""
    truth = {"a": 0.0, "b": 10.0, "c": 5.0}
    orders = [{"a": 1.0, "b": 1.0, "c": 0.0}, {"b": 1.0, "a": 1.0, "c": 0.0}, {"c": 0.0, "b": 1.0, "a": 1.0}]
    results = [agreement(p, dict(reversed(list(truth.items())))) for p in orders]
    for r in results:
        assert r["regret"] == 5.0 and r["top1_hit"] == 0.5
        assert sorted(r["predicted_best"]) == ["a", "b"] and r["true_best"] == ["b"]
    assert len({r["kendall"] for r in results}) == 1


def test_top_k_membership_under_ties():
    # scores 3, 2, 2, 2, 1: the best is in any top-2; each of the three tied is in it one time in three
    assert in_top_k(np.array([3, 2, 2, 2, 1.0]), 2).tolist() == pytest.approx([1, 1 / 3, 1 / 3, 1 / 3, 0])
    recall = agreement({"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0}, {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0})
    assert recall["top3_recall"] == pytest.approx(1.0)  # the three tied are exactly the true top 3


def test_halves_are_disjoint_seeded_and_cover_every_image():
    a, b = split_halves(101)
    assert len(np.intersect1d(a, b)) == 0 and sorted(np.concatenate([a, b]).tolist()) == list(range(101))
    assert np.array_equal(split_halves(101)[0], a) and not np.array_equal(split_halves(101, seed=1)[0], a)


def test_a_method_can_decide_on_a_random_part_of_half_a_and_only_that_part_counts():
    """Evaluation images stored class by class: the method's part of half A is drawn at random from A, never from B,
    and its hits elsewhere do not move its figures; the ceiling is the truth deciding on the same part."""
    names = [f"p{i}" for i in range(6)]
    truth = _noisy_hits(6, 2000, seed=5)
    method = _noisy_hits(6, 2000, seed=6)
    a, b = split_halves(2000)
    part = split_halves(2000, method_images=300)[0]
    assert len(part) == 300 and set(part) <= set(a) and split_halves(2000, method_images=300)[1].tolist() == b.tolist()
    assert part.max() > 1500 and part.min() < 500  # spread over the stored order, not its first images
    got = split_agreement(method, truth, names, boot=50, method_images=300)
    changed = method.copy()
    changed[:, np.setdiff1d(a, part)] = 1 - changed[:, np.setdiff1d(a, part)]
    again = split_agreement(changed, truth, names, boot=50, method_images=300)
    assert again["kendall"] == got["kendall"] and again["ci"] == got["ci"]
    assert got["halves"]["method"] == 300 and got["halves"]["truth"] == 1000
    itself = split_agreement(truth, truth, names, boot=50, method_images=300)
    assert itself["kendall"] == itself["ceiling"]["kendall"] == got["ceiling"]["kendall"]
    assert got["ceiling"]["ci"] != split_agreement(method, truth, names, boot=50)["ceiling"]["ci"]  # not all of A
    changed[:, part] = 1 - changed[:, part]
    assert split_agreement(changed, truth, names, boot=50, method_images=300)["kendall"] != got["kendall"]
    with pytest.raises(ValueError, match="method_images: 1001 exceed half"):
        split_halves(2000, method_images=1001)


def _noisy_hits(pairs: int, images: int, seed: int) -> np.ndarray:
    """Pairs whose true accuracies are close (30..40%), each image a coin flip: rankings on few images are noisy."""
    rng = np.random.default_rng(seed)
    accuracy = np.linspace(0.30, 0.40, pairs)[:, None]
    return (rng.random((pairs, images)) < accuracy).astype(float)


def test_a_method_never_sees_the_truths_images():
    """A 'method' that is the truth itself agrees with it exactly as much as the truth's two halves agree with each
    other (the ceiling), not perfectly: it is scored on half A, the truth on half B."""
    truth = _noisy_hits(8, 200, seed=0)
    names = [f"p{i}" for i in range(8)]
    out = split_agreement(truth, truth, names, boot=50)
    assert out["kendall"] == out["ceiling"]["kendall"] < 1.0
    assert out["halves"] == {"method": 100, "truth": 100, "seed": 0, "bootstrap": 50, "truth_seeds": 1}


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_images():
    names = [f"p{i}" for i in range(6)]
    small = split_agreement(_noisy_hits(6, 200, 1), _noisy_hits(6, 200, 2), names, boot=200)
    large = split_agreement(_noisy_hits(6, 20000, 1), _noisy_hits(6, 20000, 2), names, boot=200)
    for r in (small, large):
        for key in ("kendall", "spearman", "regret"):
            low, high = r["ci"][key]
            assert low <= r[key] <= high, (key, r[key], r["ci"][key])
    width = lambda r: r["ci"]["kendall"][1] - r["ci"]["kendall"][0]
    assert width(large) < width(small)
    assert large["ci"]["kendall"][0] > 0.5  # 20,000 images separate pairs 2 points apart


def test_truth_seeds_are_averaged_and_resampled():
    """Two truth seeds that order the pairs oppositely: the truth is their mean, and resampling the seeds widens the
    intervals beyond what one seed's images give."""
    names = [f"p{i}" for i in range(5)]
    one = _noisy_hits(5, 4000, 3)
    reversed_seed = one[::-1].copy()
    single = split_agreement(one, one, names, boot=200)
    both = split_agreement(one, np.stack([one, reversed_seed]), names, boot=200)
    assert both["halves"]["truth_seeds"] == 2 and single["halves"]["truth_seeds"] == 1
    width = lambda r: r["ci"]["kendall"][1] - r["ci"]["kendall"][0]
    assert width(both) > width(single)


def test_truth_runs_use_seeds_no_method_uses(tiny_cfg):
    from hnet.experiments.search import truth_configs

    truths = truth_configs(tiny_cfg)
    seeds = [t.train.seed for t in truths]
    assert len(truths) == tiny_cfg.search.truth_seeds == 3 and len(set(seeds)) == 3
    assert tiny_cfg.train.seed not in seeds and len({t.run_dir for t in truths}) == 3
    assert all(t.method == "separate" and not t.held_out_pairs for t in truths)


def test_agreement_text_says_when_a_method_decided_without_evaluation_images():
    figure = {k: 0.5 for k in ("kendall", "spearman", "regret", "top1_hit", "top3_recall")}
    figure["ci"] = {k: (0.0, 1.0) for k in figure}
    a = figure | {"ceiling": figure, "predicted_best": ["a + t"], "true_best": ["b + t"],
                  "halves": {"method": 0, "truth": 500, "bootstrap": 10, "truth_seeds": 3}}
    text = "\n".join(agreement_markdown(a, "halving", "grid search"))
    assert "halving decided on held-out search samples (no evaluation image)" in text
    assert "0 evaluation images" not in text and "the other 500" not in text
    a["halves"]["method"] = 500
    assert "halving scored on 500 evaluation images, grid search (3 seeds no method uses) on the other 500" in \
        "\n".join(agreement_markdown(a, "halving", "grid search"))
