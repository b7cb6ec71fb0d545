"""The data readers (cldm/data): every format gives the same items, images of any size and mode are decoded
and sized alike for target and hint, bad input is named, and a few training steps run on each format."""
import csv
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from cldm.data import (
    BadSampleError,
    Fill50KDataset,
    HFDataset,
    KohyaDataset,
    Resize,
    ShardDataset,
    detect_format,
    folder_subsets,
    open_dataset,
)
from cldm.data.images import bucket_sizes, decode, nearest_bucket, stored_size
from cldm.data.loading import BucketBatchSampler, SkipBadSamples, report_captions
from cldm.data.shards import write_shards
from conftest import ROOT
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")


def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def pattern(h, w, seed=0):
    """A picture whose every pixel differs from its neighbours, so any misalignment shows."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- decoding ----

def test_decode_modes(tmp_path):
    rgb = pattern(6, 10)
    np.testing.assert_array_equal(decode(save(tmp_path / "rgb.png", rgb)), rgb)

    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(decode(save(tmp_path / "gray.png", gray)), np.repeat(gray[:, :, None], 3, 2))

    deep = (np.arange(60, dtype=np.uint16).reshape(6, 10) * 1000)
    out = decode(save(tmp_path / "16bit.png", deep))
    assert out.dtype == np.uint8 and out.shape == (6, 10, 3)
    np.testing.assert_array_equal(out[:, :, 0], np.round(deep / 257.0).astype(np.uint8))

    rgba = np.dstack([rgb, np.where(np.arange(10) < 5, 255, 0).astype(np.uint8)[None].repeat(6, 0)])
    out = decode(save(tmp_path / "rgba.png", rgba))
    np.testing.assert_array_equal(out[:, :5], rgb[:, :5])  # opaque: as is
    assert (out[:, 5:] == 255).all()  # transparent: the white it is composited on

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 10 wide, shown rotated 90 degrees clockwise: 6 wide, 10 tall
    path = save(tmp_path / "rotated.png", rgb, exif=exif.tobytes())
    np.testing.assert_array_equal(decode(path), np.rot90(rgb, k=-1))
    assert stored_size(path) == (6, 10)

    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BadSampleError, match="broken.png is not a readable image"):
        decode(tmp_path / "broken.png")
    with pytest.raises(BadSampleError, match="absent.png not found"):
        decode(tmp_path / "absent.png")


# ---- sizing: target and hint always alike ----

@pytest.mark.parametrize("mode", ["center_crop", "random_crop", "stretch", "buckets"])
@pytest.mark.parametrize("shape", [(90, 160), (160, 90), (64, 64), (30, 50)])
def test_hint_gets_the_targets_resize_and_crop(mode, shape):
    target = pattern(*shape)
    resize = Resize(128, mode)
    for seed in range(3):
        out_target, out_hint = resize(target, target.copy(), np.random.default_rng(seed))
        np.testing.assert_array_equal(out_target, out_hint)  # the very same pixels
        w, h = resize.output_size((shape[1], shape[0]))
        assert out_target.shape == (h, w, 3)
        if mode != "buckets":
            assert (w, h) == (128, 128)


def test_smaller_hint_of_same_aspect_is_resized_first_and_misfit_refused():
    yy, xx = np.mgrid[:100, :200]
    target = np.dstack([xx * 255 // 199, yy * 255 // 99, (xx // 20 + yy // 20) % 2 * 255]).astype(np.uint8)
    hint = np.ascontiguousarray(target[::2, ::2])  # the same view at half size (kohya's hints may be smaller)
    out_target, out_hint = Resize(64, "center_crop")(target, hint, names=("t.png", "h.png"))
    assert out_hint.shape == out_target.shape == (64, 64, 3)
    diff = np.abs(out_hint.astype(int) - out_target.astype(int))
    assert diff[..., :2].max() <= 3 and diff[..., 2].mean() < 20  # aligned: gradients equal, squares in place
    with pytest.raises(BadSampleError, match=r"h.png is 100x100 but its target t.png is 200x100"):
        Resize(64)(target, pattern(100, 100), names=("t.png", "h.png"))


def test_random_crop_moves_but_center_crop_does_not():
    target = pattern(64, 256)
    crops = {Resize(64, "random_crop")(target, target, np.random.default_rng(s))[0].tobytes() for s in range(6)}
    assert len(crops) > 1
    center = Resize(64, "center_crop")(target, target)[0]
    np.testing.assert_array_equal(center, target[:, 96:160])


def test_buckets():
    buckets = bucket_sizes(512)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w, h) / min(w, h) <= 4
    assert nearest_bucket((1920, 1080), buckets) == (640, 384)
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    assert (1024, 1024) in bucket_sizes(1024)

    groups = [0, 1, 0, 1, 0, 1, 0, 2]
    seen = []
    for rank in range(2):
        sampler = BucketBatchSampler(groups, 2, rank=rank, world_size=2, seed=0)
        sampler.sampler.set_epoch(3)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        assert all(len({groups[i] for i in b}) == 1 for b in batches)  # one bucket per batch
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen))


# ---- the formats ----

def make_pairs(n=6):
    """n (target, hint, caption) triples of odd sizes; the hint is the target's own pattern, inverted."""
    sizes = [(48, 80), (80, 48), (64, 64), (50, 75), (96, 64), (40, 40)]
    for i in range(n):
        target = pattern(*sizes[i % len(sizes)], seed=i)
        yield target, 255 - target, f"sample {i}"


@pytest.fixture(scope="module")
def kohya_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya")
    modes = ["png", "jpg", "webp", "gray", "rgba", "16bit"]
    for i, (target, hint, caption) in enumerate(make_pairs()):
        name = f"img{i}"
        kind = modes[i]
        if kind == "gray":
            save(root / "train" / f"{name}.png", target[:, :, 0])
        elif kind == "rgba":
            save(root / "train" / f"{name}.png", np.dstack([target, np.full(target.shape[:2], 255, np.uint8)]))
        elif kind == "16bit":
            save(root / "train" / "nested" / f"{name}.png", target[:, :, 0].astype(np.uint16) * 257)
        else:
            save(root / "train" / f"{name}.{kind}", target, quality=95)
        caption_dir = root / "train" / ("nested" if kind == "16bit" else "")
        (caption_dir / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        save(root / "cond" / ("nested" if kind == "16bit" else "") / f"{name}.png", hint[::2, ::2].copy())
    return root


def test_kohya_reader(kohya_root):
    dataset = KohyaDataset(folder_subsets(kohya_root / "train", kohya_root / "cond"), resize=Resize(32))
    assert len(dataset) == 6
    assert sorted(dataset.caption(i) for i in range(6)) == [f"sample {i}" for i in range(6)]
    for i in range(6):
        item = dataset[i]
        assert item["jpg"].shape == item["hint"].shape == (32, 32, 3)
        assert item["jpg"].dtype == item["hint"].dtype == np.float32
        assert -1 <= item["jpg"].min() and item["jpg"].max() <= 1 and 0 <= item["hint"].min() <= item["hint"].max() <= 1
    assert detect_format(kohya_root / "train", kohya_root / "cond") == "kohya"
    with pytest.raises(ValueError, match="--conditioning_data_dir"):
        detect_format(kohya_root / "train")


def test_kohya_bad_input_named(kohya_root, tmp_path, caplog):
    import shutil
    root = shutil.copytree(kohya_root, tmp_path / "k")
    (root / "cond" / "img1.png").unlink()
    with pytest.raises(BadSampleError, match=r"img1.jpg has no hint .*--skip_bad_samples"):
        KohyaDataset(folder_subsets(root / "train", root / "cond"))
    with caplog.at_level(logging.WARNING):
        assert len(KohyaDataset(folder_subsets(root / "train", root / "cond"), skip_bad=True)) == 5
    assert "img1.jpg has no hint" in caplog.text

    shutil.copy(kohya_root / "cond" / "img1.png", root / "cond" / "img1.png")
    (root / "train" / "img2.txt").write_bytes(b"caf\xe9")
    with pytest.raises(BadSampleError, match=r"img2.txt: caption is not UTF-8"):
        KohyaDataset(folder_subsets(root / "train", root / "cond"), skip_bad=False)


def write_hf(pairs, root):
    """An imagefolder (metadata.jsonl) of the pairs; returns the folder."""
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (target, hint, caption) in enumerate(pairs):
            save(root / f"{i}.png", target)
            save(root / "hints" / f"{i}.png", hint)
            f.write(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"hints/{i}.png",
                                "text": caption}) + "\n")
    return root


@pytest.fixture(scope="module")
def hf_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    folder = write_hf(make_pairs(), base / "imagefolder")
    cache = str(base / "cache")
    table = HFDataset(folder, cache_dir=cache).table
    import datasets
    table = table.cast_column("image", datasets.Image()).cast_column("conditioning_image", datasets.Image())
    table.save_to_disk(str(base / "disk"))
    (base / "parquet").mkdir()
    table.rename_columns({"image": "photo", "conditioning_image": "edges", "text": "prompt"}).to_parquet(
        str(base / "parquet" / "train-00000-of-00001.parquet"))
    return {"imagefolder": folder, "disk": base / "disk", "parquet": base / "parquet", "cache": cache}


def test_hf_reader_three_layouts_same_items(hf_roots):
    resize = Resize(32)
    reference = [(target, caption) for target, _, caption in make_pairs()]
    columns = {"image_column": "photo", "conditioning_image_column": "edges", "caption_column": "prompt"}
    # the parquet file's images are paths into the imagefolder beside it, outside its own root
    for layout, options in (("imagefolder", {}), ("disk", {}), ("parquet", {**columns, "allow_outside_root": True})):
        assert detect_format(hf_roots[layout]) == "hf"
        dataset = HFDataset(hf_roots[layout], resize=resize, cache_dir=hf_roots["cache"], **options)
        assert len(dataset) == len(reference)
        for i, (target, caption) in enumerate(reference):
            item = dataset[i]
            assert item["txt"] == caption
            expected = resize(target, 255 - target)
            np.testing.assert_allclose(item["jpg"], expected[0] / 127.5 - 1, atol=1e-6)
            np.testing.assert_allclose(item["hint"], expected[1] / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"no column --image_column 'image'.*photo, edges, prompt"):
        HFDataset(hf_roots["parquet"], cache_dir=hf_roots["cache"])


def test_shards_round_trip_and_detect(tmp_path):
    fill = make_fill50k(tmp_path / "fill", n=10, size=32, seed=0)
    reader = Fill50KDataset(fill)
    out = write_shards(reader, tmp_path / "shards", chunk_bytes="4KB")
    assert detect_format(out) == "shards" and detect_format(fill) == "fill50k"
    stream = ShardDataset(out, shuffle=False)
    assert len(stream) == 10
    by_prompt = {reader[i]["txt"]: reader[i] for i in range(10)}
    for i in range(10):
        item = stream[i]
        np.testing.assert_array_equal(item["jpg"], by_prompt[item["txt"]]["jpg"])
        np.testing.assert_array_equal(item["hint"], by_prompt[item["txt"]]["hint"])
    with pytest.raises(FileExistsError, match="--force"):
        write_shards(reader, out)
    with pytest.raises(ValueError, match="buckets need a map-style format"):
        open_dataset(out, resize=Resize(64, "buckets"))
    with pytest.raises(ValueError, match="--image_column does not apply to the shards format"):
        open_dataset(out, image_column="photo")


def test_skip_bad_samples_counts_and_keeps_batches_whole(tmp_path, caplog):
    fill = make_fill50k(tmp_path / "fill", n=6, size=32, seed=0)
    (fill / "target" / "2.png").write_bytes(b"corrupt")
    dataset = Fill50KDataset(fill)
    with pytest.raises(BadSampleError, match=r"target/2.png \(named on line 3 of .*prompt.json\) is not a readable"):
        dataset[2]
    skipping = SkipBadSamples(dataset)
    with caplog.at_level(logging.WARNING):
        items = [skipping[i] for i in range(6)]
    assert [it["skipped"] for it in items] == [0, 0, 1, 0, 0, 0]
    assert items[2]["txt"] == dataset[3]["txt"]
    assert "target/2.png" in caplog.text


def test_caption_report_names_files(kohya_root, tmp_path, caplog):
    import shutil
    root = shutil.copytree(kohya_root, tmp_path / "k")
    (root / "train" / "img0.txt").write_text("  \n")
    (root / "train" / "img3.txt").write_text("word " * 100)
    dataset = KohyaDataset(folder_subsets(root / "train", root / "cond"))
    with caplog.at_level(logging.WARNING):
        counts = report_captions(dataset, lambda c: len(c.split()), 75)
    assert counts == {"empty": 1, "too_long": 1}
    assert f"empty caption: {root / 'train' / 'img0.txt'}" in caplog.text
    assert f"caption of 100 tokens, the text encoder reads 75 (the rest is cut): {root / 'train' / 'img3.txt'}" \
        in caplog.text


# ---- training a few steps on each format ----

def train(out, *extra):
    from tutorial_train import main
    return main(["--config", TINY, "--resume_path", "none", "--batch_size", "2", "--output_dir", str(out),
                 "--sample_steps", "1", "--logger_freq", "1000", "--accelerator", "cpu", "--devices", "1",
                 "--max_steps", "2", "--log_every_n_steps", "1", "--sd_locked", "False", *extra])


def losses(trainer):
    with open(os.path.join(trainer.loggers[1].log_dir, "metrics.csv")) as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_trains_on_kohya_with_buckets(kohya_root, tmp_path):
    trainer = train(tmp_path / "run", "--data_root", str(kohya_root / "train"), "--conditioning_data_dir",
                    str(kohya_root / "cond"), "--resolution", "128", "--resize", "buckets")
    assert trainer.global_step == 2 and all(np.isfinite(losses(trainer)))


def test_trains_on_hf_and_shards(hf_roots, tmp_path):
    trainer = train(tmp_path / "hf", "--data_root", str(hf_roots["disk"]), "--resolution", "32")
    assert trainer.global_step == 2 and all(np.isfinite(losses(trainer)))
    shards = write_shards(HFDataset(hf_roots["disk"]), tmp_path / "shards")
    trainer = train(tmp_path / "shards_run", "--data_root", str(shards), "--resolution", "32",
                    "--resize", "random_crop")
    assert trainer.global_step == 2 and all(np.isfinite(losses(trainer)))


def test_training_stops_on_a_bad_sample_or_skips_it(tmp_path):
    fill = make_fill50k(tmp_path / "fill", n=4, size=32, seed=0)
    (fill / "source" / "1.png").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match=r"source/1.png \(named on line 2 of .*prompt.json\) is not a readable"):
        train(tmp_path / "a", "--data_root", str(fill), "--max_steps", "4")
    trainer = train(tmp_path / "b", "--data_root", str(fill), "--max_steps", "4", "--skip_bad_samples")
    assert trainer.global_step == 4
    skipped = [cb for cb in trainer.callbacks if type(cb).__name__ == "SkippedSamples"][0]
    assert skipped.total == 2  # the bad sample came up once in each of the two epochs


def test_bench_data_smoke():
    from benchmarks import bench_data
    rows = bench_data.main(["--smoke"])
    assert {r["reader"] for r in rows} == set(bench_data.READERS)
    assert all(r["samples_per_s"] > 0 and r["workers_needed"] >= 1 for r in rows)
