"""Train a ControlNet on Fill50K (or any data set in its format), as in the original tutorial.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt
    python tutorial_train.py                      # the original's settings
    python tutorial_train.py --devices 2 --strategy ddp --precision bf16-mixed --drop_prompt_rate 0.5
    python tool_cache_latents.py --ckpt ./models/control_sd15_ini.ckpt --out ./training/fill50k_cache
    python tutorial_train.py --cached_latents ./training/fill50k_cache --precision bf16-mixed \\
        --gradient_checkpointing False                  # fast; benchmarks/RESULTS.md has the low-memory recipes

Writes image_log/ (ImageLogger grids), checkpoints/ (Lightning checkpoints every --checkpoint_every
steps and at the end, last.ckpt kept; continue with --resume checkpoints/last.ckpt) and a control-only
export (`control_model.*` in safetensors, like the ControlNet 1.1 files) under --output_dir.
"""

import sys

import share  # noqa: F401  (quiet logs; sliced attention when config.save_memory)
from cldm.cli import run_tool
from cldm.train_command import main

if __name__ == "__main__":
    sys.exit(run_tool(main))
