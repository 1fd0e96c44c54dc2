"""benchmarks/longtail_real.py's table: segment means over pairs, APE averaged over its seeds, the gap, intervals."""
import numpy as np

from tests.conftest import load_benchmark


def test_segment_means_gap_and_intervals_on_a_hand_made_case():
    bench = load_benchmark("longtail_real")
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])  # classes 0, 1: many; class 2: few
    segments = ["many", "many", "few"]
    # APE: 2 seeds x 2 pairs; seed 0 gets every many-image right, seed 1 half of them; both miss every few-image
    ape = np.zeros((2, 2, 8))
    ape[0, :, :4] = 1
    ape[1, :, [0, 2]] = 1
    hyper = np.zeros((2, 8))
    hyper[0, 4:] = 1  # pair 0: every few-image right; pair 1: nothing
    table = bench.longtail_table(ape, {"h": hyper}, labels, segments, boot=300)
    rows, ci = table["rows"], table["ci"]
    assert rows["APE"] == {"many": 75.0, "medium": None, "few": 0.0}
    assert rows["h"] == {"many": 0.0, "medium": None, "few": 50.0}
    assert rows["h minus APE"] == {"many": -75.0, "medium": None, "few": 50.0}
    assert ci["APE"]["medium"] is None
    # the few segment's hits do not vary within class 2 for APE: resampling images inside it keeps 0 exactly;
    # the many segment's APE varies with the seeds and images drawn
    assert ci["APE"]["few"] == [0.0, 0.0]
    lo, hi = ci["APE"]["many"]
    assert lo < 75.0 < hi <= 100.0
    lo, hi = ci["h minus APE"]["few"]
    assert lo <= 50.0 <= hi


def test_runs_scored_on_other_images_are_refused_or_left_out(tmp_path, capsys):
    from hnet import files, runs

    bench = load_benchmark("longtail_real")

    def run(name: str, key: str):
        files.write_json(tmp_path / name / runs.EVAL, {"datasets": {"cifar10": {"key": key}}})
        return tmp_path / name

    ape = [run("ape0", "all"), run("ape1", "all")]
    hypernets = {"same": run("h_same", "all"), "other": run("h_other", "first_2000")}
    skip, kept = bench.on_the_same_images(ape, hypernets, "cifar10")
    assert skip == "" and kept == {"same": hypernets["same"]}
    assert "leaving out other" in capsys.readouterr().out
    skip, kept = bench.on_the_same_images([*ape, run("ape2", "first_2000")], hypernets, "cifar10")
    assert "ape2" in skip and kept == {}
