"""Process-wide switches the tutorials and apps flip through share.py."""

import logging
import warnings

from ldm.modules.attention import CrossAttention


def disable_verbosity() -> None:
    """Silence library chatter that buries training and app output."""
    for name in ("open_clip", "timm", "httpx", "gradio"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    print("logging improved.")


def enable_sliced_attention(slice_size: int = 1024) -> None:
    """Attend `slice_size` queries at a time, trading speed for peak memory on large images."""
    CrossAttention.slice_size = slice_size
    print(f"Enabled sliced attention ({slice_size} queries per slice).")
