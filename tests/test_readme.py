"""The README's results are the results files' numbers, not copies that drift from them."""
from pathlib import Path

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    return load_benchmark("readme_tables")


def test_readme_results_blocks_equal_what_the_results_files_render():
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    names = [m["name"] for m in tables.BLOCK.finditer(text)]
    assert "demo" in names
    _, changed = tables.update(text)
    assert changed == [], f"README.md blocks {changed} differ from benchmarks/results: run benchmarks/readme_tables.py"


def test_every_results_file_carries_commit_and_config_digest():
    import json

    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        result = json.loads(path.read_text())
        stamps = [result["provenance"]] if "provenance" in result else \
            [v["provenance"] for v in result.values() if isinstance(v, dict) and "provenance" in v]
        assert stamps, f"{path}: no provenance (run the benchmark that writes it again)"
        for p in stamps:
            assert len(p["commit"]) == 40 and p["config_digest"], f"{path}: incomplete provenance {p}"


def test_readme_seed_setting_table_is_what_the_tool_computes():
    from hnet.report import render, seed_setting_table

    assert render(seed_setting_table(), "md").strip() in (ROOT / "README.md").read_text(), \
        "README.md's research-setting FLOPs table differs from python scripts/flops_report.py --seed-table"


def test_a_hand_edited_number_is_caught():
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- results: demo -->")
    digit = next(i for i in range(start, len(text)) if text[i].isdigit())
    edited = text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:]
    assert tables.update(edited)[1] == ["demo"]


def test_results_carry_commit_and_config_digest():
    from hnet.config import load_config
    from hnet.provenance import config_digest, stamp

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    stamped = stamp({"x": 1}, cfg)["provenance"]
    assert len(stamped["commit"]) == 40 and stamped["config_digest"] == config_digest(cfg)
    other = load_config(ROOT / "configs" / "demo.yaml", ["train.lr=0.5"])
    assert config_digest(other) != config_digest(cfg)


def test_results_carry_the_commit_their_process_started_at(tmp_path):
    """A commit made while a benchmark runs must not be stamped on its results: the code that ran is the start's."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    (repo / "copied").mkdir(parents=True)  # not `hnet`: the editable install would shadow it
    (repo / "copied" / "provenance.py").write_text((ROOT / "hnet" / "provenance.py").read_text())
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    start = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    script = ("import subprocess, sys; sys.path.insert(0, sys.argv[1]); from copied import provenance\n"
              "open(sys.argv[1] + '/later.txt', 'w').write('x')\n"
              "subprocess.run(sys.argv[2:] + ['add', '.'], check=True)\n"
              "subprocess.run(sys.argv[2:] + ['commit', '-qm', 'later'], check=True)\n"
              "print(provenance.stamp({}, {'a': 1})['provenance']['commit'])")
    out = subprocess.run([sys.executable, "-c", script, str(repo), *git], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == start


def test_a_results_file_left_uncommitted_is_not_a_code_change(tmp_path):
    """A chain of benchmarks leaves the first one's results uncommitted when the next starts: listed, not dirty."""
    import subprocess

    from hnet.provenance import git_state

    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(tmp_path)]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    assert git_state(tmp_path) | {"commit": ""} == {"commit": "", "dirty": False, "uncommitted": []}
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"new": 1}')
    state = git_state(tmp_path)
    assert state["dirty"] is False and state["uncommitted"] == ["benchmarks/results/a.json"]
    (tmp_path / "code.py").write_text("x = 2\n")
    state = git_state(tmp_path)
    assert state["dirty"] is True and state["uncommitted"] == ["benchmarks/results/a.json", "code.py"]
