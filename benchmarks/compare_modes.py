"""Every control mode trained on the same task, compared in one table and one plot (docs/modes.md).

    python benchmarks/compare_modes.py --threads 1                  # the demo's circles and base, on a CPU
    python benchmarks/compare_modes.py --fast --modes sd_locked t2i --out /tmp/smoke --work_dir /tmp/smoke_work
    python benchmarks/compare_modes.py --base_config models/cldm_v15.yaml --base models/v1-5-pruned.ckpt \\
        --resolution 512 --batch_size 8 --precision bf16-mixed --device cuda     # SD1.5 at 512 px on a GPU

Each mode is measured (trainable parameters, control file, peak training memory, seconds per step), trained with
tutorial_train.py's code with --val_data (the held-out fill IoU while it trains), and evaluated as
tool_eval_control.py does; the results folder (default docs/modes/<base config stem>) gets comparison.md,
fidelity.png and results.json. `--help` lists the options; cldm/bench/comparison.py is the library.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import share  # noqa: E402,F401  (quiet logs, as tutorial_train.py)
from cldm.bench.comparison import main  # noqa: E402
from cldm.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(main))
