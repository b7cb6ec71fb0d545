"""The original's process-wide switches, kept for scripts written against it (share.py flips them).

Library code and the apps read nothing these set: the apps and tools pass attention slicing as an argument
(ldm.modules.attention.set_attention_slicing) and low VRAM to cldm.pipeline.sample.
"""

import functools
import logging
import warnings

from ldm.modules.attention import CrossAttention

log = logging.getLogger(__name__)
_UNPATCHED_INIT = CrossAttention.__init__


def disable_verbosity() -> None:
    """Silence library chatter that buries training and app output."""
    for name in ("open_clip", "timm", "httpx", "gradio", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # the frozen VAE and text encoder stay in eval mode on purpose (DDPM's disabled_train)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    log.info("logging improved.")


def enable_sliced_attention(slice_size: int = 1024) -> None:
    """Every CrossAttention built from now on attends `slice_size` queries at a time (the class patched, as the
    original patches it); build the model after calling this, as the original's scripts do (import share first)."""
    CrossAttention.__init__ = functools.partialmethod(_UNPATCHED_INIT, slice_size=slice_size)
    log.info("Enabled sliced attention (%d queries per slice).", slice_size)
