"""Fault matrix: runs the fault tests (tests/) and prints fault | what the tool did | data lost, then one JSON line
{"faults": N, "survived": N, "data_lost": 0}. Each row is a real test; "survived" means it passed.

    python benchmarks/fault_matrix.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hnet import files  # noqa: E402
from hnet.provenance import stamp  # noqa: E402

FAULTS = [
    ("training SIGKILLed, then resume=latest", "tests/test_faults.py::test_sigkill_then_resume_equals_uninterrupted",
     "resumed at the last checkpoint; final weights and metrics bit-identical to an uninterrupted run"),
    ("SIGTERM during training", "tests/test_faults.py::test_sigterm_writes_a_checkpoint_before_exit",
     "checkpoint written at the current step, clean exit"),
    ("killed while writing a checkpoint",
     "tests/test_faults.py::test_unfinished_checkpoint_cleaned_and_previous_one_used",
     "temp folder removed; previous checkpoint used"),
    ("embedding pass killed mid-way (half-written chunk)", "tests/test_cache.py::test_resume_equals_uninterrupted",
     "partial file cleaned; resumed at the last finished shard; checksums equal an uninterrupted pass"),
    ("shard conversion killed", "tests/test_shards.py::test_make_shards_resumes_after_last_finished_shard",
     "resumed after the last finished shard; identical bytes"),
    ("truncated tar shard", "tests/test_shards.py::test_truncated_shard_keeps_what_it_can_and_warns",
     "samples before the cut kept, warning names the shard"),
    ("corrupt JPEG / missing image / empty caption", "tests/test_shards.py::test_bad_images_skipped_counted_and_named",
     "skipped, counted and named in manifest.json"),
    ("corrupt sample inside a shard, at embedding time",
     "tests/test_cache.py::test_bad_samples_in_shards_are_counted_in_the_manifest",
     "skipped with a warning, counted per shard in the cache manifest"),
    ("non-UTF-8 caption", "tests/test_shards.py::test_non_utf8_caption_skipped_by_reader",
     "sample skipped with a warning naming shard and key"),
    ("duplicated keys", "tests/test_shards.py::test_duplicate_keys_skipped", "second copy skipped and recorded"),
    ("shard pattern matching nothing", "tests/test_shards.py::test_pattern_matching_nothing_is_refused",
     "refused with the pattern named"),
    ("bad config flags / unknown encoder / missing data path",
     "tests/test_faults.py::test_bad_flags_exit_2_with_one_line_and_write_nothing",
     "exit 2, one line naming the field, run dir untouched"),
    ("cache lacks a configured encoder", "tests/test_cache.py::test_missing_encoder_named",
     "refused, naming the encoder and what is cached"),
    ("batch larger than the data", "tests/test_train.py::test_batch_larger_than_data_refused",
     "refused naming train.batch_size"),
    ("non-finite loss (stop)", "tests/test_faults.py::test_nonfinite_loss_stops_and_keeps_last_checkpoint",
     "stopped with a clear message; last good checkpoint kept"),
    ("non-finite loss (train.nonfinite=skip)", "tests/test_faults.py::test_nonfinite_skip_counts_and_stays_finite",
     "steps skipped and counted in metrics; weights stay finite"),
    ("corrupted cache (flipped bytes)", "tests/test_cache.py::test_corrupted_cache_detected_by_checksum",
     "detected by checksum at load, file named"),
    ("corrupted checkpoint (flipped bytes)", "tests/test_faults.py::test_corrupted_checkpoint_detected_with_file_named",
     "detected by checksum at resume, file named"),
]
RESULTS = Path(__file__).parent / "results" / "fault_matrix.json"


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", f"--junitxml={report}",
                        *[node for _, node, _ in FAULTS]], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       capture_output=True, text=True)
        cases = ET.parse(report).getroot().iter("testcase")
        outcome: dict[str, bool] = {}
        for case in cases:
            name = case.get("name").split("[")[0]
            ok = case.find("failure") is None and case.find("error") is None and case.find("skipped") is None
            outcome[name] = outcome.get(name, True) and ok
    rows = []
    for fault, node, behaviour in FAULTS:
        survived = outcome.get(node.split("::")[1], False)
        rows.append({"fault": fault, "test": node, "behaviour": behaviour if survived else "TEST FAILED",
                     "survived": survived, "data_lost": 0 if survived else None})
    print("| fault | what the tool did | data lost |\n|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['behaviour']} | {'none' if r['survived'] else 'see test'} |")
    summary = {"faults": len(rows), "survived": sum(r["survived"] for r in rows),
               "data_lost": sum(1 for r in rows if not r["survived"])}
    files.write_json(RESULTS, stamp({**summary, "rows": rows}, {"faults": [r[0] for r in FAULTS]}))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
