"""The original tutorial's Fill50K reader, for any folder in that layout (prompt.json, source/, target/).

Each item is dict(jpg=target, txt=prompt, hint=source), names inherited from LDM: target as float32 HWC RGB in
[-1, 1], source as float32 HWC RGB in [0, 1]. `python tool_make_fill50k.py` writes such a folder; the other
formats (kohya's, Hugging Face, streaming shards) have their readers in cldm/data/ (docs/data.md).
"""
from pathlib import Path

from cldm.data.fill50k import Fill50KDataset


class MyDataset(Fill50KDataset):
    """The tutorial's reader: a Fill50K-layout folder, ./training/fill50k unless told otherwise."""

    def __init__(self, root: str | Path = "./training/fill50k", size: int | None = None, **options) -> None:
        super().__init__(root, size=size, **options)
