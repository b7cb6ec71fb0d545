"""Imported first by the tutorials (and scripts written against the original): quiet logs, and memory-saving
attention when config.py asks. The apps take --low-vram instead and read neither."""

import config
from cldm.hack import disable_verbosity, enable_sliced_attention

disable_verbosity()

if config.save_memory:
    enable_sliced_attention()
