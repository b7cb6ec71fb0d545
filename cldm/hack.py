"""Process-wide switches the tutorials and apps flip through share.py."""

import logging
import warnings

from ldm.modules.attention import CrossAttention

log = logging.getLogger(__name__)


def disable_verbosity() -> None:
    """Silence library chatter that buries training and app output."""
    for name in ("open_clip", "timm", "httpx", "gradio", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # the frozen VAE and text encoder stay in eval mode on purpose (DDPM's disabled_train)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    log.info("logging improved.")


def enable_sliced_attention(slice_size: int = 1024) -> None:
    """Attend `slice_size` queries at a time, trading speed for peak memory on large images."""
    CrossAttention.slice_size = slice_size
    log.info("Enabled sliced attention (%d queries per slice).", slice_size)
