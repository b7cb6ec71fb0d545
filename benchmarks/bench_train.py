"""Training-step throughput and peak memory: our ControlLDM against diffusers on the same weights, one process.

    python benchmarks/bench_train.py                                   # tiny config, 128 px, CPU or GPU
    python benchmarks/bench_train.py --config models/cldm_v15.yaml --resolution 512 --batch 4 \\
        --precision bf16-mixed --cached --device cuda
    python benchmarks/bench_train.py --smoke                           # seconds; what the tests run

What is measured, and how: cldm/bench/training.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.bench.training import main  # noqa: E402
from cldm.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
