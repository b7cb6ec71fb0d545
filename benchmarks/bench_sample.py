"""Sampling speed: a sampler with classifier-free guidance and the VAE decode, ours against diffusers, one process.

    python benchmarks/bench_sample.py                                  # tiny config, 128 px, batch 1
    python benchmarks/bench_sample.py --config models/cldm_v15.yaml --resolution 512 --precision bf16 \\
        --compile reduce-overhead --device cuda
    python benchmarks/bench_sample.py --smoke                          # seconds; what the tests run
    python benchmarks/bench_sample.py --sampler dpmpp_2m_karras

What is measured, and how: cldm/bench/sampling.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cldm.bench.sampling import main  # noqa: E402
from cldm.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
