"""Fill50K's circles: the named colours, one circle's geometry and colours from a seed, its two images, and a data
set of them written in Fill50K's layout (make_fill50k; tool_make_fill50k.py is its command line).

The data set tool, the mode comparison (cldm/bench/comparison.py), the tiny base model's training and the fidelity
metrics share these. Sample N of a set depends only on (seed, N, size):
`sample_circle(np.random.default_rng([seed, N]), size)`.
"""

import json
import logging
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from ldm.checkpoint import live_temps, move_into_place, new_temp, remove_stale_temps

log = logging.getLogger(__name__)

# CSS named colours (the X11 set) with their RGB values; "grey" spellings left out (copies of "gray").
COLORS: list[tuple[str, tuple[int, int, int]]] = [
    ("alice blue", (240, 248, 255)), ("antique white", (250, 235, 215)), ("aqua", (0, 255, 255)),
    ("aquamarine", (127, 255, 212)), ("azure", (240, 255, 255)), ("beige", (245, 245, 220)),
    ("bisque", (255, 228, 196)), ("black", (0, 0, 0)), ("blanched almond", (255, 235, 205)),
    ("blue", (0, 0, 255)), ("blue violet", (138, 43, 226)), ("brown", (165, 42, 42)),
    ("burly wood", (222, 184, 135)), ("cadet blue", (95, 158, 160)), ("chartreuse", (127, 255, 0)),
    ("chocolate", (210, 105, 30)), ("coral", (255, 127, 80)), ("cornflower blue", (100, 149, 237)),
    ("corn silk", (255, 248, 220)), ("crimson", (220, 20, 60)), ("cyan", (0, 255, 255)),
    ("dark blue", (0, 0, 139)), ("dark cyan", (0, 139, 139)), ("dark golden rod", (184, 134, 11)),
    ("dark gray", (169, 169, 169)), ("dark green", (0, 100, 0)), ("dark khaki", (189, 183, 107)),
    ("dark magenta", (139, 0, 139)), ("dark olive green", (85, 107, 47)), ("dark orange", (255, 140, 0)),
    ("dark orchid", (153, 50, 204)), ("dark red", (139, 0, 0)), ("dark salmon", (233, 150, 122)),
    ("dark sea green", (143, 188, 143)), ("dark slate blue", (72, 61, 139)),
    ("dark slate gray", (47, 79, 79)), ("dark turquoise", (0, 206, 209)), ("dark violet", (148, 0, 211)),
    ("deep pink", (255, 20, 147)), ("deep sky blue", (0, 191, 255)), ("dim gray", (105, 105, 105)),
    ("dodger blue", (30, 144, 255)), ("fire brick", (178, 34, 34)), ("floral white", (255, 250, 240)),
    ("forest green", (34, 139, 34)), ("fuchsia", (255, 0, 255)), ("gainsboro", (220, 220, 220)),
    ("ghost white", (248, 248, 255)), ("gold", (255, 215, 0)), ("golden rod", (218, 165, 32)),
    ("gray", (128, 128, 128)), ("green", (0, 128, 0)), ("green yellow", (173, 255, 47)),
    ("honey dew", (240, 255, 240)), ("hot pink", (255, 105, 180)), ("indian red", (205, 92, 92)),
    ("indigo", (75, 0, 130)), ("ivory", (255, 255, 240)), ("khaki", (240, 230, 140)),
    ("lavender", (230, 230, 250)), ("lavender blush", (255, 240, 245)), ("lawn green", (124, 252, 0)),
    ("lemon chiffon", (255, 250, 205)), ("light blue", (173, 216, 230)), ("light coral", (240, 128, 128)),
    ("light cyan", (224, 255, 255)), ("light golden rod yellow", (250, 250, 210)),
    ("light gray", (211, 211, 211)), ("light green", (144, 238, 144)), ("light pink", (255, 182, 193)),
    ("light salmon", (255, 160, 122)), ("light sea green", (32, 178, 170)),
    ("light sky blue", (135, 206, 250)), ("light slate gray", (119, 136, 153)),
    ("light steel blue", (176, 196, 222)), ("light yellow", (255, 255, 224)), ("lime", (0, 255, 0)),
    ("lime green", (50, 205, 50)), ("linen", (250, 240, 230)), ("magenta", (255, 0, 255)),
    ("maroon", (128, 0, 0)), ("medium aquamarine", (102, 205, 170)), ("medium blue", (0, 0, 205)),
    ("medium orchid", (186, 85, 211)), ("medium purple", (147, 112, 219)),
    ("medium sea green", (60, 179, 113)), ("medium slate blue", (123, 104, 238)),
    ("medium spring green", (0, 250, 154)), ("medium turquoise", (72, 209, 204)),
    ("medium violet red", (199, 21, 133)), ("midnight blue", (25, 25, 112)),
    ("mint cream", (245, 255, 250)), ("misty rose", (255, 228, 225)), ("moccasin", (255, 228, 181)),
    ("navajo white", (255, 222, 173)), ("navy", (0, 0, 128)), ("old lace", (253, 245, 230)),
    ("olive", (128, 128, 0)), ("olive drab", (107, 142, 35)), ("orange", (255, 165, 0)),
    ("orange red", (255, 69, 0)), ("orchid", (218, 112, 214)), ("pale golden rod", (238, 232, 170)),
    ("pale green", (152, 251, 152)), ("pale turquoise", (175, 238, 238)),
    ("pale violet red", (219, 112, 147)), ("papaya whip", (255, 239, 213)),
    ("peach puff", (255, 218, 185)), ("peru", (205, 133, 63)), ("pink", (255, 192, 203)),
    ("plum", (221, 160, 221)), ("powder blue", (176, 224, 230)), ("purple", (128, 0, 128)),
    ("rebecca purple", (102, 51, 153)), ("red", (255, 0, 0)), ("rosy brown", (188, 143, 143)),
    ("royal blue", (65, 105, 225)), ("saddle brown", (139, 69, 19)), ("salmon", (250, 128, 114)),
    ("sandy brown", (244, 164, 96)), ("sea green", (46, 139, 87)), ("sea shell", (255, 245, 238)),
    ("sienna", (160, 82, 45)), ("silver", (192, 192, 192)), ("sky blue", (135, 206, 235)),
    ("slate blue", (106, 90, 205)), ("slate gray", (112, 128, 144)), ("snow", (255, 250, 250)),
    ("spring green", (0, 255, 127)), ("steel blue", (70, 130, 180)), ("tan", (210, 180, 140)),
    ("teal", (0, 128, 128)), ("thistle", (216, 191, 216)), ("tomato", (255, 99, 71)),
    ("turquoise", (64, 224, 208)), ("violet", (238, 130, 238)), ("wheat", (245, 222, 179)),
    ("white", (255, 255, 255)), ("white smoke", (245, 245, 245)), ("yellow", (255, 255, 0)),
    ("yellow green", (154, 205, 50)),
]
MIN_CONTRAST = 100.0  # least RGB distance between fill and background, so the circle is always visible

_RGB = np.array([rgb for _, rgb in COLORS], dtype=np.float64)
# For each fill colour, the background colours far enough from it.
_CONTRASTING = [np.flatnonzero(np.linalg.norm(_RGB - c, axis=1) >= MIN_CONTRAST) for c in _RGB]


def sample_circle(rng: np.random.Generator, size: int) -> dict:
    """One circle's geometry and colours: radius 10%-40% of `size`, fully inside the image."""
    thickness = max(1, round(size / 170))  # a thin line at any size: 3 px at 512, 1 px at 64
    radius = int(rng.integers(round(0.1 * size), round(0.4 * size), endpoint=True))
    margin = radius + thickness // 2  # the outline, not only the disc, stays inside the image
    cx, cy = (int(v) for v in rng.integers(margin, size - 1 - margin, size=2, endpoint=True))
    fill = int(rng.integers(len(COLORS)))
    background = int(rng.choice(_CONTRASTING[fill]))
    (color_name, color), (background_name, background_rgb) = COLORS[fill], COLORS[background]
    return {
        "center": [cx, cy],
        "radius": radius,
        "thickness": thickness,
        "color": list(color),
        "background": list(background_rgb),
        "color_name": color_name,
        "background_name": background_name,
        "prompt": f"{color_name} circle with {background_name} background",
    }


def render(circle: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) as uint8 RGB arrays (size, size, 3), not anti-aliased: colours stay exact."""
    center, radius = tuple(circle["center"]), circle["radius"]
    source = np.zeros((size, size, 3), np.uint8)
    cv2.circle(source, center, radius, (255, 255, 255), circle["thickness"], cv2.LINE_8)
    target = np.empty((size, size, 3), np.uint8)
    target[:] = circle["background"]
    cv2.circle(target, center, radius, circle["color"], -1, cv2.LINE_8)
    return source, target


MIN_SIZE = 16
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 6]  # zlib's default: less than half the bytes of OpenCV's level 1
SET_ENTRIES = ("source", "target", "meta.jsonl", "prompt.json")  # prompt.json last: its presence marks a set
STAGING = "fill50k"  # a run writes its set into `.fill50k.PID-HOST.RANDOM.tmp` inside the output folder


def _write_sample(job: tuple[Path, int, int, int]) -> tuple[str, str]:
    out, seed, i, size = job
    circle = sample_circle(np.random.default_rng([seed, i]), size)
    source, target = render(circle, size)
    for folder, image in (("source", source), ("target", target)):
        ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), PNG_PARAMS)
        if not ok:
            raise OSError(f"could not encode {out / folder / f'{i}.png'}")
        (out / folder / f"{i}.png").write_bytes(png.tobytes())  # (a full disk raises with its errno)
    record = {"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": circle["prompt"]}
    meta = {"source": record["source"], **{k: v for k, v in circle.items() if k != "prompt"}}
    return json.dumps(record), json.dumps(meta)


def make_fill50k(out: str | Path, n: int = 50000, size: int = 512, seed: int = 0, force: bool = False,
                 workers: int = 1) -> Path:
    """Write n samples in Fill50K's layout under `out` and return its path.

    A non-empty `out` is refused unless `force`, and so is one that another run is writing into. The new set is
    written into a hidden folder inside `out` and swapped in at the end (prompt.json last), so an interrupted
    run leaves the old set, or no prompt.json, never an index that names images of another set. Files of `out`
    that are not part of a set are kept; the hidden folders of killed runs are removed.
    """
    out = Path(out)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # every time: a set's hidden folders must not count as files of `out`
    writing = live_temps(out)
    if writing:
        raise FileExistsError(f"another run (process {writing[0][1]}) is writing a data set into {out} "
                              f"({writing[0][0].name}); wait for it, or choose another --out")
    if any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass --force to replace the data set in it "
                              "(other files are kept)")
    staging = new_temp(out / STAGING, folder=True)
    try:
        for folder in ("source", "target"):
            (staging / folder).mkdir()
        jobs = [(staging, seed, i, size) for i in range(n)]
        step = max(1, n // 10)
        records = []
        for done, record in enumerate(_records(jobs, workers), 1):
            records.append(record)
            if done % step == 0 or done == n:
                log.info("%d/%d samples", done, n)
        (staging / "meta.jsonl").write_text("".join(meta + "\n" for _, meta in records), encoding="utf-8")
        (staging / "prompt.json").write_text("".join(prompt + "\n" for prompt, _ in records), encoding="utf-8")
        if (out / "prompt.json").exists():  # the old index leaves first: it must never name the new images
            os.replace(out / "prompt.json", staging / "prompt.json.old")
        for name in SET_ENTRIES:
            move_into_place(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _records(jobs: list[tuple[Path, int, int, int]], workers: int):
    """(prompt line, meta line) per job, in order; in-process for one worker, saving the pool's start-up."""
    if workers <= 1:
        yield from map(_write_sample, jobs)
        return
    with mp.Pool(workers) as pool:
        yield from pool.imap(_write_sample, jobs, chunksize=64)
