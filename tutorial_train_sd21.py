"""Train a ControlNet on SD 2.1: tutorial_train.py with the SD 2.1 config and initial checkpoint.

    python tool_add_control_sd21.py ./models/v2-1_512-ema-pruned.ckpt ./models/control_sd21_ini.ckpt
    python tutorial_train_sd21.py
"""

import sys
from functools import partial

import share  # noqa: F401  (quiet logs; sliced attention when config.save_memory)
from cldm.cli import run_tool
from cldm.train_command import main

if __name__ == "__main__":
    sys.exit(run_tool(partial(main, config="./models/cldm_v21.yaml", resume_path="./models/control_sd21_ini.ckpt")))
