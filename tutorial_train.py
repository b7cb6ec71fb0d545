"""Train a ControlNet on Fill50K (or any data set in its formats), as in the original tutorial.

`python tutorial_train.py --help` gives the usage and every option; the command is cldm/train_command.py.
"""

import sys

import share  # noqa: F401  (quiet logs; sliced attention when config.save_memory)
from cldm.cli import run_tool
from cldm.train_command import main

if __name__ == "__main__":
    sys.exit(run_tool(main))
