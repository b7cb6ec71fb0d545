"""The ADE20K class palette (RGB, one row per class id) as mmseg's `ade_palette()` defines it.

seg2image ControlNets were trained on maps in these colours, so the rows are data, not a choice.
The palette repeats one colour: class 6 (road) and class 48 (skyscraper) are both (140, 140, 140).
"""

import numpy as np

ADE20K_PALETTE = np.array(
    [
        [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
        [120, 120, 80], [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7],
        [224, 5, 255], [235, 255, 7], [150, 5, 61], [120, 120, 70], [8, 255, 51],
        [255, 6, 82], [143, 255, 140], [204, 255, 4], [255, 51, 7], [204, 70, 3],
        [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255], [255, 7, 71],
        [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
        [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10],
        [7, 255, 255], [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7],
        [255, 122, 8], [0, 255, 20], [255, 8, 41], [255, 5, 153], [6, 51, 255],
        [235, 12, 255], [160, 150, 20], [0, 163, 255], [140, 140, 140], [250, 10, 15],
        [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0], [153, 255, 0],
        [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
        [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112],
        [0, 255, 133], [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0],
        [0, 143, 255], [51, 255, 0], [0, 82, 255], [0, 255, 41], [0, 255, 173],
        [10, 0, 255], [173, 255, 0], [0, 255, 153], [255, 92, 0], [255, 0, 255],
        [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20], [255, 184, 184],
        [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
        [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255],
        [0, 122, 255], [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0],
        [143, 255, 0], [82, 0, 255], [163, 255, 0], [255, 235, 0], [8, 184, 170],
        [133, 0, 255], [0, 255, 92], [184, 0, 255], [255, 0, 31], [0, 184, 255],
        [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255], [112, 224, 255],
        [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
        [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235],
        [245, 0, 255], [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0],
        [0, 204, 255], [20, 0, 255], [255, 255, 0], [0, 153, 255], [0, 41, 255],
        [0, 255, 204], [41, 0, 255], [41, 255, 0], [173, 0, 255], [0, 245, 255],
        [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255], [184, 255, 0],
        [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
    ],
    dtype=np.uint8,
)  # fmt: skip


def colorize(classes: np.ndarray) -> np.ndarray:
    """HxW class ids in [0, 150) -> HxWx3 uint8 RGB in ADE20K colours."""
    return ADE20K_PALETTE[classes]


# mmseg's ignore index: the label of pixels of no class
NO_CLASS = 255


def classes_of(colours: np.ndarray) -> np.ndarray:
    """...x3 colours (0..255) -> the class id of each one's nearest palette colour, or NO_CLASS where black is
    nearer than any class: black is ADE20K's "other" (class 0 of its annotations, left out of the 150), which mmseg's
    reduce_zero_label and ControlNet++ ignore. Two classes share one colour; such pixels take the first."""
    palette = np.concatenate([[[0, 0, 0]], ADE20K_PALETTE]).astype(np.float32)  # black first, as ControlNet++'s file
    # a map holds few distinct colours: find the nearest for each of them once
    distinct, where = np.unique(np.asarray(colours, dtype=np.float32).reshape(-1, 3), axis=0, return_inverse=True)
    nearest = np.concatenate(
        [
            ((chunk[:, None] - palette[None]) ** 2).sum(-1).argmin(1)  # in chunks: distances to 151 colours
            for chunk in np.array_split(distinct, max(1, len(distinct) // 65536))
        ]
    )[where.reshape(-1)]
    return np.where(nearest == 0, NO_CLASS, nearest - 1).reshape(np.shape(colours)[:-1])
