"""Imported first by the tutorials and apps: quiet logs, and memory-saving attention when config asks."""

import config
from cldm.hack import disable_verbosity, enable_sliced_attention

disable_verbosity()

if config.save_memory:
    enable_sliced_attention()
