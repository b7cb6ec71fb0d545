"""What every reader yields and ControlLDM consumes: the latent diffusion model's item (ldm.batch) plus the hint.

    ControlImageItem   jpg (H x W x 3 in [-1, 1]), txt, hint (H x W x C in [0, 1]), SDXL's size keys if recorded
    ControlCachedItem  txt, hint, the latent cache's mean / std / txt_emb / txt_emb_empty (SDXL: txt_pooled,
                       txt_pooled_empty and the size keys)

Both may carry `skipped` (the bad samples passed over before the item, with --skip_bad_samples). The training
loader checks every item against its kind (`ItemCheck`), so a reader with a wrong or missing key stops at the
first batch with one message naming the key and the reader.
"""
from typing import Annotated, NotRequired, TypedDict

from torch.utils.data import default_collate

from ldm.batch import MEAN, Array, CachedItem, ImageItem, Layout, check_item

HINT = "hint"  # the control image
SKIPPED = "skipped"  # bad samples passed over before this item (summed in training, logged at the end)

CONTROL_FIELDS = {HINT: Annotated[Array, Layout("H W C", 0.0, 1.0)], SKIPPED: NotRequired[int]}
ControlImageItem = TypedDict("ControlImageItem", {**ImageItem.__annotations__, **CONTROL_FIELDS})
ControlCachedItem = TypedDict("ControlCachedItem", {**CachedItem.__annotations__, **CONTROL_FIELDS})
ControlItem = ControlImageItem | ControlCachedItem


def item_kind(item: object) -> type:
    """The kind an item claims to be: one with the cached posterior is a cached item, any other an image item."""
    return ControlCachedItem if isinstance(item, dict) and MEAN in item else ControlImageItem


def check_control_item(item: object, source: str) -> None:
    """BatchKeyError naming the key and `source` (the reader) unless `item` is a ControlItem."""
    check_item(item, item_kind(item), source)


class ItemCheck:
    """The training loader's collate function: every item checked against its kind, then stacked as usual."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __call__(self, items: list) -> dict:
        for item in items:
            check_control_item(item, self.source)
        return default_collate(items)
