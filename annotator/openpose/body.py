"""Multi-person body pose: heatmaps and part affinity fields, then greedy limb assembly."""

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from annotator.util import NetworkDetector

from .model import WEIGHTS_SOURCE, bodypose_model, remap_flat_keys
from .util import LIMB_SEQ, padRightDownCorner

# PAF channel pair (x, y) of each limb in LIMB_SEQ: the original's mapIdx, which counts the 19
# heatmap channels first.
MAP_IDX = [
    [31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24], [25, 26],
    [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38], [45, 46],
]  # fmt: skip
MID_NUM = 10  # points sampled along a candidate limb


@torch.no_grad()
def infer_maps(
    net: torch.nn.Module, oriImg: np.ndarray, scales: Sequence[float], boxsize: int = 368
) -> list[np.ndarray]:
    """Network outputs averaged over `scales` (relative to `boxsize` / image height), at image size.

    Each scale: resize, pad to the stride with grey, normalise to [-0.5, 0.5), run, upsample by the
    stride, crop the padding, resize back. Returns one (H, W, C) array per network output. (The
    original doubled its running heatmap sum at each scale; this is the plain mean, the same for one scale.)
    """
    stride, pad_value = 8, 128
    device = next(net.parameters()).device
    height, width = oriImg.shape[:2]
    averages = None
    for scale in scales:
        factor = scale * boxsize / height
        image = cv2.resize(oriImg, (0, 0), fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        padded, pad = padRightDownCorner(image, stride, pad_value)
        data = torch.from_numpy(padded).to(device=device, dtype=torch.float32).permute(2, 0, 1)[None]
        outputs = net(data / 256 - 0.5)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        maps = []
        for out in outputs:
            out = out[0].permute(1, 2, 0).cpu().numpy()
            out = cv2.resize(out, (0, 0), fx=stride, fy=stride, interpolation=cv2.INTER_CUBIC)
            out = out[: padded.shape[0] - pad[2], : padded.shape[1] - pad[3]]
            out = cv2.resize(out, (width, height), interpolation=cv2.INTER_CUBIC)
            maps.append(out.reshape(height, width, -1).astype(np.float64) / len(scales))
        averages = maps if averages is None else [a + m for a, m in zip(averages, maps)]
    return averages


def find_peaks(heatmap: np.ndarray, thre1: float = 0.1) -> list[np.ndarray]:
    """Per part, the local maxima of the smoothed heatmap above `thre1`: rows (x, y, score, id).

    Scores are read from the unsmoothed map; ids number all peaks of all parts consecutively.
    """
    all_peaks, counter = [], 0
    for part in range(18):
        raw = heatmap[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        # A peak is >= its four neighbours (outside the map counts as 0) and above the threshold.
        padded = np.pad(smooth, 1)
        is_peak = (
            (smooth >= padded[:-2, 1:-1])
            & (smooth >= padded[2:, 1:-1])
            & (smooth >= padded[1:-1, :-2])
            & (smooth >= padded[1:-1, 2:])
            & (smooth > thre1)
        )
        ys, xs = np.nonzero(is_peak)  # row-major: peaks are listed by y, then x
        ids = np.arange(counter, counter + len(xs))
        all_peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        counter += len(xs)
    return all_peaks


def connect_limbs(
    all_peaks: list[np.ndarray], paf: np.ndarray, image_height: int, thre2: float = 0.05
) -> list[np.ndarray | None]:
    """Per limb, the accepted connections as rows (id_a, id_b, score, i, j), or None if a side has no peaks.

    A candidate pair is scored by the PAF projected on its direction at MID_NUM points, with a penalty
    for limbs longer than half the image height; it needs over 80% of points above `thre2` and a
    positive score. Pairs are then taken greedily by score, each peak used once.
    """
    connections = []
    for (a, b), (px, py) in zip(LIMB_SEQ, MAP_IDX):
        cand_a, cand_b = all_peaks[a - 1], all_peaks[b - 1]
        n_a, n_b = len(cand_a), len(cand_b)
        if n_a == 0 or n_b == 0:
            connections.append(None)
            continue
        start = np.broadcast_to(cand_a[:, None, :2], (n_a, n_b, 2))
        end = np.broadcast_to(cand_b[None, :, :2], (n_a, n_b, 2))
        vec = end - start
        norm = np.maximum(np.linalg.norm(vec, axis=-1), 0.001)
        unit = vec / norm[..., None]
        points = np.round(np.linspace(start, end, num=MID_NUM, axis=2)).astype(int)  # (nA, nB, MID, 2)
        xs, ys = points[..., 0], points[..., 1]
        scores = paf[ys, xs, px - 19] * unit[..., 0:1] + paf[ys, xs, py - 19] * unit[..., 1:2]
        with_prior = scores.mean(-1) + np.minimum(0.5 * image_height / norm - 1, 0)
        accepted = (np.count_nonzero(scores > thre2, axis=-1) > 0.8 * MID_NUM) & (with_prior > 0)

        pairs = np.argwhere(accepted)  # (i, j) in row-major order, as the original's double loop
        order = np.argsort(-with_prior[accepted], kind="stable")
        rows, used_a, used_b = [], set(), set()
        for i, j in pairs[order]:
            if i in used_a or j in used_b:
                continue
            rows.append([cand_a[i, 3], cand_b[j, 3], with_prior[i, j], i, j])
            used_a.add(i)
            used_b.add(j)
            if len(rows) >= min(n_a, n_b):
                break
        connections.append(np.array(rows, dtype=np.float64).reshape(-1, 5))
    return connections


def add_part(person: np.ndarray, index: int, part_id: float, gain: float) -> None:
    person[index] = part_id
    person[-1] += 1
    person[-2] += gain


def assemble_people(connections: list[np.ndarray | None], candidate: np.ndarray) -> np.ndarray:
    """Group connections into people: rows of 18 candidate ids (-1 if absent), total score, part count.

    People with fewer than 4 parts or a mean score under 0.4 are dropped.
    """
    subset = -np.ones((0, 20))
    for k, connection in enumerate(connections):
        if connection is None:
            continue
        index_a, index_b = np.array(LIMB_SEQ[k]) - 1
        for id_a, id_b, score, _, _ in connection:
            found = np.flatnonzero((subset[:, index_a] == id_a) | (subset[:, index_b] == id_b)).tolist()
            gain = candidate[int(id_b), 2] + score
            if len(found) == 1:
                if subset[found[0], index_b] != id_b:
                    add_part(subset[found[0]], index_b, id_b, gain)
            elif len(found) == 2:
                first, second = found
                if np.any((subset[found, :-2] >= 0).all(axis=0)):
                    # The two share a part: extend the first (unconditionally, as the original does).
                    add_part(subset[first], index_b, id_b, gain)
                else:
                    # Two disjoint partial people joined by this limb: merge the second into the first.
                    subset[first, :-2] = np.maximum(subset[first, :-2], subset[second, :-2])
                    subset[first, -2:] += subset[second, -2:]
                    subset[first, -2] += score
                    subset = np.delete(subset, second, axis=0)
            elif not found and k < 17:
                # A new person; the last two limbs (ear-shoulder) only ever extend existing ones.
                row = -np.ones(20)
                row[index_a], row[index_b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidate[int(id_a), 2] + candidate[int(id_b), 2] + score
                subset = np.vstack([subset, row])
    keep = (subset[:, -1] >= 4) & (subset[:, -2] / subset[:, -1] >= 0.4)
    return subset[keep]


def decode_body(
    heatmap: np.ndarray, paf: np.ndarray, thre1: float = 0.1, thre2: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (H, W, 19) and PAFs (H, W, 38) -> candidate (N, 4: x, y, score, id), subset (P, 20)."""
    all_peaks = find_peaks(heatmap, thre1)
    candidate = np.concatenate(all_peaks, axis=0)
    connections = connect_limbs(all_peaks, paf, heatmap.shape[0], thre2)
    return candidate, assemble_people(connections, candidate)


class Body(NetworkDetector):
    """The OpenPose body estimator: `body_pose_model.pth` from lllyasviel/Annotators."""

    network, weights_file, weights_url = bodypose_model, "body_pose_model.pth", WEIGHTS_SOURCE + "body_pose_model.pth"
    rename = remap_flat_keys  # the published files name layers without their block prefix

    @torch.no_grad()
    def __call__(self, oriImg: np.ndarray, scales: Sequence[float] = (0.5,)) -> tuple[np.ndarray, np.ndarray]:
        """BGR uint8 image -> candidate, subset (see decode_body). ControlNet 1.0 used the single scale 0.5."""
        paf, heatmap = infer_maps(self.model, oriImg, scales)
        return decode_body(heatmap, paf)
