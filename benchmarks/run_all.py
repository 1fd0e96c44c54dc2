"""`make bench`: every benchmark, one after the other; each prints its JSON line and writes results/NAME.json."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# real_zoo.py and search_cost.py --zoo real are left out: their first run embeds Flickr8k with 10 encoders (~69 min)
BENCHMARKS = [["bench_train_step.py"], ["bench_embed.py"], ["flops_zoo.py"], ["fault_matrix.py"]]

if __name__ == "__main__":
    failed = [b[0] for b in BENCHMARKS if subprocess.run([sys.executable, str(HERE / b[0]), *b[1:]]).returncode]
    sys.exit(f"failed: {failed}" if failed else 0)
