"""Streaming shards with LitData: `write_shards` turns any reader into chunk files plus an index.json
(litdata.optimize); `ShardDataset` streams them (litdata.StreamingDataset) from a local folder or an
object-store URI (s3://, gs://, azure://), split across nodes, ranks and workers, with its position saved in
Lightning checkpoints through litdata.StreamingDataLoader.

A sample is stored as written by its reader, not re-encoded: {"target": file bytes, "hint": file bytes,
"txt": caption, "key": the sample's name (UTF-8)}. Resizing happens when reading, with the same `Resize` as the
other readers (aspect-ratio buckets need a map-style reader, since a stream cannot group by size ahead).
"""
import json
import logging
import os
from functools import partial
from pathlib import Path

from litdata import StreamingDataset, optimize

from cldm.data.base import PairedImageDataset
from cldm.data.batch import ControlImageItem
from cldm.data.images import BadSampleError, Resize, decode, fit_hint, to_item
from ldm.checkpoint import atomic_output, write_error

log = logging.getLogger(__name__)

SHARD_INDEX = "index.json"
DEFAULT_CHUNK_BYTES = "64MB"


def _record(reader: PairedImageDataset, idx: int) -> dict | None:
    """Sample idx of `reader` as a shard record, checked to decode and fit; None (left out) when bad."""
    try:
        sample = reader.encoded(idx)
        fit_hint(decode(sample.hint, sample.hint_name), decode(sample.target, sample.target_name).shape[:2],
                 (sample.target_name, sample.hint_name))
    except BadSampleError as err:
        log.warning("left out of the shards: %s", err)
        return None
    # the name as bytes: litdata stores a string naming an existing image file as that file's pixels
    return {"target": sample.target, "hint": sample.hint, "txt": sample.caption,
            "key": sample.target_name.encode("utf-8")}


def _emit(reader: PairedImageDataset, idx: int):
    record = _record(reader, idx)
    if record is not None:
        yield record


def write_shards(reader: PairedImageDataset, out: str | Path, num_workers: int = 1,
                 chunk_bytes: str = DEFAULT_CHUNK_BYTES, force: bool = False) -> Path:
    """Write every readable sample of `reader` as LitData shards in `out` and return it.

    Written into a temporary folder beside `out` and swapped in at the end (ldm.checkpoint.atomic_output), so
    `out` holds the old shards or the whole new ones; an existing `out` is replaced only with `force`.
    """
    with atomic_output(out, force, folder=True) as tmp:
        optimize(fn=partial(_emit, reader), inputs=list(range(len(reader))), output_dir=tmp,
                 chunk_bytes=chunk_bytes, num_workers=max(1, num_workers), mode="overwrite", verbose=False,
                 start_method="fork" if os.name == "posix" else None)
        check_written(Path(tmp), Path(out), len(reader))
    return Path(out)


def check_written(folder: Path, out: Path, samples: int) -> None:
    """Refuse shards that litdata's writer processes left incomplete without a word (a write error there gives
    a chunk cut short and an index that names none): each chunk file must be whole and named in the index. The
    error names `out` and, where a one-byte write can still tell, the reason (WriteError)."""
    chunks = sorted(folder.glob("*.bin"))
    try:
        named = {c["filename"]: c["chunk_bytes"] for c in json.loads((folder / SHARD_INDEX).read_text())["chunks"]}
    except FileNotFoundError:
        named = {}
    except (ValueError, KeyError, TypeError) as err:
        raise write_error(err, out, folder / SHARD_INDEX) or OSError(
            f"could not write {out}: its {SHARD_INDEX} is not whole ({err})") from err
    if not named and not chunks:
        raise BadSampleError(f"no sample of {samples} could be read, so no shards were written")
    for chunk in chunks:
        if named.get(chunk.name) != chunk.stat().st_size:
            cut = OSError(f"{chunk.name} is {chunk.stat().st_size} bytes, its index says {named.get(chunk.name)}")
            raise write_error(cut, out, chunk) or OSError(f"could not write {out}: litdata's writer left "
                                                          f"{chunk.name} incomplete") from cut
    missing = sorted(set(named) - {chunk.name for chunk in chunks})
    if missing:
        raise OSError(f"could not write {out}: {missing[0]}, named in its {SHARD_INDEX}, was never written")


def is_shard_uri(root: str) -> bool:
    """Whether `root` names an object store (s3://bucket/path and the like) rather than a local folder."""
    return "://" in str(root)


class ShardDataset(StreamingDataset):
    """Training items streamed from `write_shards` output: ControlImageItem, as every reader gives.

    `shuffle` reorders chunks and the items within them each epoch (seeded by `seed`); under several ranks
    each gets its own part, every sample once per epoch (drop_last evens the ranks out).
    """

    def __init__(self, input_dir: str | Path, resize: Resize | None = None, shuffle: bool = True, seed: int = 0,
                 cache_dir: str | None = None, **options) -> None:
        if not is_shard_uri(str(input_dir)) and not (Path(input_dir) / SHARD_INDEX).is_file():
            raise FileNotFoundError(f"{Path(input_dir) / SHARD_INDEX} not found: write shards with "
                                    f"`python tool_make_dataset.py ... --format shards --out {input_dir}`")
        super().__init__(str(input_dir), cache_dir=cache_dir, shuffle=shuffle, seed=seed, **options)
        self.resize = resize or Resize()
        self._arguments = dict(input_dir=input_dir, resize=resize, shuffle=shuffle, seed=seed, cache_dir=cache_dir,
                               **options)

    def for_this_process(self) -> "ShardDataset":
        """The same stream built anew: LitData fixes a stream's split across ranks when it is built, so the
        training loader builds it after the process group is up."""
        return ShardDataset(**self._arguments)

    def __getitem__(self, index) -> ControlImageItem:
        record = super().__getitem__(index)
        key = record["key"] if isinstance(record["key"], str) else bytes(record["key"]).decode("utf-8")
        target, hint = decode(record["target"], key), decode(record["hint"], f"hint of {key}")
        target, hint, sizes = self.resize.frame(target, hint, None, (key, f"hint of {key}"))
        return to_item(target, hint, record["txt"], sizes)
