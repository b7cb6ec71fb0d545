"""kohya's dataset options (cldm/data/captions.py, augment.py, buckets.py, kohya.py, kohya_config.py) and
diffusers' --max_train_samples and caption lists, each against a hand computation on generated data."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cldm.data import HFDataset, KohyaDataset, KohyaSubset, Resize, folder_subsets
from cldm.data.augment import ImageAugmentation, color_augment
from cldm.data.base import select_samples
from cldm.data.buckets import KohyaBuckets
from cldm.data.captions import CaptionOptions, expand_wildcards
from cldm.data.images import BadSampleError
from cldm.data.kohya_config import DatasetConfigError, read_dataset_config
from cldm.data.loading import TrainData
from conftest import ROOT
from tool_make_fill50k import make_fill50k

TINY = str(ROOT / "models" / "cldm_tiny.yaml")
DRAWS = 4000


def tolerance(p: float, n: int = DRAWS) -> float:
    """Four standard deviations of a frequency of probability p over n draws."""
    return 4 * (p * (1 - p) / n) ** 0.5


def draws(options: CaptionOptions, caption: str, n: int = DRAWS, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [options(caption, rng) for _ in range(n)]


# ---- captions ----

def test_caption_unchanged_without_shuffle_or_dropout_even_with_keep_tokens():
    caption = "a cat,  sitting ,on a mat"
    assert draws(CaptionOptions(keep_tokens=2, caption_separator=","), caption, 5) == [caption] * 5


def test_prefix_suffix_and_full_dropout():
    assert draws(CaptionOptions(caption_prefix="best", caption_suffix="photo"), "a cat", 1) == ["best a cat photo"]
    assert set(draws(CaptionOptions(caption_dropout_rate=1.0), "a cat", 50)) == {""}
    out = draws(CaptionOptions(caption_dropout_rate=0.3), "a cat")
    assert set(out) == {"", "a cat"}
    assert abs(out.count("") / DRAWS - 0.3) < tolerance(0.3)


def test_shuffle_keeps_the_first_keep_tokens_tags_and_permutes_the_rest_uniformly():
    out = draws(CaptionOptions(shuffle_caption=True, keep_tokens=1), "a, b,c , d")
    orders = {}
    for caption in out:
        tags = caption.split(", ")
        assert tags[0] == "a" and sorted(tags[1:]) == ["b", "c", "d"]  # stripped, joined with ", "
        orders[caption] = orders.get(caption, 0) + 1
    assert len(orders) == 6  # 3! orders of b, c, d
    assert all(abs(n / DRAWS - 1 / 6) < tolerance(1 / 6) for n in orders.values())
    # another separator: cut at it, joined with ", " as kohya does
    assert set(draws(CaptionOptions(shuffle_caption=True, caption_separator=";"), "x;y", 200)) == {"x, y", "y, x"}


def test_keep_tokens_separator_fixes_the_front_and_the_back():
    options = CaptionOptions(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    out = set(draws(options, "a, b ||| c, d, ||| e", 400))
    assert out == {"a, b, c, d, e", "a, b, d, c, e"}  # empty tags dropped in this form, keep_tokens unused


def test_tag_dropout_drops_each_free_tag_with_its_rate_and_keeps_order():
    out = draws(CaptionOptions(caption_tag_dropout_rate=0.25, keep_tokens=1), "k, t1, t2, t3")
    kept = {t: 0 for t in ("t1", "t2", "t3")}
    for caption in out:
        tags = caption.split(", ")
        assert tags[0] == "k" and tags[1:] == sorted(tags[1:])  # the kept tag never drops; order stays
        for t in tags[1:]:
            kept[t] += 1
    assert all(abs(n / DRAWS - 0.75) < tolerance(0.75) for n in kept.values())


def test_secondary_separator_becomes_the_separator_after_shuffling():
    options = CaptionOptions(shuffle_caption=True, secondary_separator=";;")
    assert set(draws(options, "red;;blue hat, cat", 200)) == {"red,blue hat, cat", "cat, red,blue hat"}


def test_wildcards_and_lines():
    rng = np.random.default_rng(0)
    out = [expand_wildcards("{red|blue} ball {{literal}}", rng) for _ in range(DRAWS)]
    assert set(out) == {"red ball {literal}", "blue ball {literal}"}
    assert abs(out.count("red ball {literal}") / DRAWS - 0.5) < tolerance(0.5)
    assert set(draws(CaptionOptions(enable_wildcard=True), "one\ntwo", 200)) == {"one", "two"}
    assert set(draws(CaptionOptions(), "one\ntwo", 20)) == {"one"}


# ---- image augmentation ----

def test_color_aug_gamma_and_hue_by_hand():
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    seen = {"none": 0, "gamma": 0, "hue": 0}
    for seed in range(600):
        g = np.random.default_rng(seed)  # the draws color_augment makes, in its order
        applied, hue, value = g.random() <= 0.33, None, None
        if applied:
            hue = g.random() > 0.5
            value = g.uniform(-8, 8) if hue else g.uniform(0.95, 1.05)
        out = color_augment(ramp, np.random.default_rng(seed))
        if not applied:
            seen["none"] += 1
            np.testing.assert_array_equal(out, ramp)
        elif not hue:
            seen["gamma"] += 1
            want = np.round(255 * (np.arange(256) / 255) ** value)  # gamma on [0, 1]
            np.testing.assert_array_equal(out[0, :, 1], want)
        else:
            seen["hue"] += 1
            # pure red has hue 0 in OpenCV's 0..180: turning it by s lands on floor(s mod 180)
            out_red = color_augment(red, np.random.default_rng(seed))
            h, s, v = cv2.cvtColor(out_red, cv2.COLOR_RGB2HSV)[0, 0].astype(int)
            assert abs(h - int(np.floor(value % 180))) <= 1 and v == 200 and s == 255
    assert seen["gamma"] > 50 and seen["hue"] > 50 and abs(seen["none"] / 600 - 0.67) < tolerance(0.67, 600)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def pattern(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def wide_pair(tmp_path):
    """One 102x64 image, its hint the inverse, a caption: scaled to 51x32 for 32 px, the centred crop is at x = 9."""
    target = pattern(64, 102)
    save(tmp_path / "img" / "a.png", target)
    save(tmp_path / "hint" / "a.png", 255 - target)
    (tmp_path / "img" / "a.txt").write_text("a, b, c")
    return tmp_path


def items(dataset, n, idx=0):
    torch.manual_seed(0)
    return [dataset[idx] for _ in range(n)]


def test_flip_aug_mirrors_image_hint_and_crop_together(wide_pair):
    plain = KohyaDataset([KohyaSubset(wide_pair / "img", wide_pair / "hint")], Resize(32))[0]
    assert plain["crop_coords_top_left"].tolist() == [0, 9]
    flipping = KohyaDataset([KohyaSubset(wide_pair / "img", wide_pair / "hint",
                                         augmentation=ImageAugmentation(flip_aug=True))], Resize(32))
    flips = 0
    for item in items(flipping, 400):
        if np.array_equal(item["jpg"], plain["jpg"]):
            np.testing.assert_array_equal(item["hint"], plain["hint"])
            assert item["crop_coords_top_left"].tolist() == [0, 9]
        else:
            flips += 1
            np.testing.assert_array_equal(item["jpg"], plain["jpg"][:, ::-1])
            np.testing.assert_array_equal(item["hint"], plain["hint"][:, ::-1])
            assert item["crop_coords_top_left"].tolist() == [0, 51 - 9 - 32]  # the crop's left, mirrored
    assert abs(flips / 400 - 0.5) < tolerance(0.5, 400)


def test_color_aug_changes_the_image_never_the_hint(wide_pair):
    plain = KohyaDataset([KohyaSubset(wide_pair / "img", wide_pair / "hint")], Resize(32))[0]
    coloured = KohyaDataset([KohyaSubset(wide_pair / "img", wide_pair / "hint",
                                         augmentation=ImageAugmentation(color_aug=True))], Resize(32))
    changed = 0
    for item in items(coloured, 300):
        np.testing.assert_array_equal(item["hint"], plain["hint"])
        changed += not np.array_equal(item["jpg"], plain["jpg"])
    assert abs(changed / 300 - 0.33) < tolerance(0.33, 300)


# ---- kohya's buckets ----

def test_kohya_bucket_sizes_and_choice_by_hand():
    buckets = KohyaBuckets((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=8)
    # width w from 32 to 128 by 8, height min(128, 4096 // w // 8 * 8), kept if >= 32, and each turned
    heights = {32: 128, 40: 96, 48: 80, 56: 72, 64: 64, 72: 56, 80: 48, 88: 40, 96: 40, 104: 32, 112: 32,
               120: 32, 128: 32}
    assert set(buckets.sizes) == {(w, h) for w, h in heights.items()} | {(h, w) for w, h in heights.items()}
    # 192x108 (ratio 1.778): nearest ratio 80/48 = 1.667; wider than it, so the height fits: 48/108
    assert buckets.fit((192, 108)) == ((80, 48), (int(192 * 48 / 108 + 0.5), 48))
    assert buckets.fit((169, 96)) == ((80, 48), (85, 48))  # 84.5 rounds up, as int(x + 0.5) does
    assert buckets.fit((40, 88)) == ((40, 88), (40, 88))  # a bucket's own size is kept


def pixels(item):
    return ((item["jpg"] + 1) * 127.5).round().astype(np.uint8)


def test_kohya_buckets_in_the_reader_and_no_upscale(tmp_path):
    target = pattern(108, 192)
    save(tmp_path / "img" / "a.png", target)
    save(tmp_path / "hint" / "a.png", target)
    save(tmp_path / "img" / "b.png", pattern(30, 50, 1))
    save(tmp_path / "hint" / "b.png", pattern(30, 50, 1))
    subset = [KohyaSubset(tmp_path / "img", tmp_path / "hint")]
    resize = Resize(64, "buckets", KohyaBuckets((64, 64), 32, 128, 8))
    item = KohyaDataset(subset, resize)[0]
    scaled = cv2.resize(target, (85, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(pixels(item), scaled[:, 2:82])  # crop x = (85 - 80) // 2
    assert item["crop_coords_top_left"].tolist() == [0, 2]
    assert item["original_size_as_tuple"].tolist() == [108, 192]
    # bucket_no_upscale: 50x30 is not enlarged; its bucket is its size rounded down to the step, centre-cropped
    no_upscale = KohyaDataset(subset, Resize(64, "buckets", KohyaBuckets((64, 64), 32, 128, 8, True)))
    small = no_upscale[1]
    np.testing.assert_array_equal(pixels(small), pattern(30, 50, 1)[3:27, 1:49])
    assert small["crop_coords_top_left"].tolist() == [3, 1]
    groups = TrainData(no_upscale, 1)._bucket_groups()[0]
    assert len(set(groups)) == 2  # two images, two buckets of their own


# ---- subsets, repeats, captions on disk ----

def test_repeat_folders_count_each_image_n_times_per_epoch(tmp_path, caplog):
    for folder, names in (("3_canny", ["a", "b"]), ("1_other", ["c"])):
        for name in names:
            save(tmp_path / "train" / folder / f"{name}.png", pattern(8, 8))
            (tmp_path / "train" / folder / f"{name}.txt").write_text(name)
    for name in ("a", "b"):
        save(tmp_path / "cond" / "3_canny" / f"{name}.png", pattern(8, 8))  # the repeat folder mirrored
    save(tmp_path / "cond" / "c.png", pattern(8, 8))  # or the conditioning folder itself
    save(tmp_path / "train" / "stray.png", pattern(8, 8))
    save(tmp_path / "train" / "misc" / "d.png", pattern(8, 8))
    with caplog.at_level(logging.WARNING):
        subsets = folder_subsets(tmp_path / "train", tmp_path / "cond")
    assert "misc (not an N_name repeat folder" in caplog.text and "stray.png (not an N_name" in caplog.text
    dataset = KohyaDataset(subsets)
    assert len(dataset) == 2 * 3 + 1
    loader = TrainData(dataset, batch_size=1).train_dataloader()
    seen = [batch["txt"][0] for batch in loader]
    assert sorted(seen) == ["a"] * 3 + ["b"] * 3 + ["c"]


def test_missing_caption_trains_empty_with_a_warning_or_stops(tmp_path, caplog):
    for name in ("a", "b", "c", "d"):
        save(tmp_path / "img" / f"{name}.png", pattern(8, 8))
        save(tmp_path / "cond" / f"{name}.png", pattern(8, 8))
    (tmp_path / "img" / "a.caption").write_text("from .caption")  # .txt named, .caption read
    (tmp_path / "img" / "b.txt").write_text("first line\nsecond line\n")
    (tmp_path / "img" / "c.txt").write_text("  spaced  ")
    with caplog.at_level(logging.WARNING):
        dataset = KohyaDataset(folder_subsets(tmp_path / "img", tmp_path / "cond", ".txt"))
    assert [dataset.caption(i) for i in range(4)] == ["from .caption", "first line", "spaced", ""]
    assert f"no caption file for {tmp_path / 'img' / 'd.png'}: it trains on an empty caption" in caplog.text
    assert "1 caption files hold several lines: each trains on its first line" in caplog.text
    reverse = KohyaDataset(folder_subsets(tmp_path / "img", tmp_path / "cond", ".caption"))
    assert reverse.caption(1) == "first line"  # .caption named, .txt read
    with pytest.raises(BadSampleError, match=r"d.png has no caption file .*d.txt"):
        KohyaDataset(folder_subsets(tmp_path / "img", tmp_path / "cond"), require_captions=True)


# ---- the dataset config ----

def kohya_folders(root, n=4, size=64):
    fill = make_fill50k(root / "fill", n=n, size=size, seed=0)
    rows = [json.loads(line) for line in (fill / "prompt.json").read_text().splitlines()]
    for i, row in enumerate(rows):
        for sub in ("a", "b"):
            save(root / sub / "images" / f"{i}.png", np.asarray(Image.open(fill / row["target"])))
            save(root / sub / "canny" / f"{i}.png", np.asarray(Image.open(fill / row["source"])))
            (root / sub / "images" / f"{i}.txt").write_text(row["prompt"])
    return root


def write_toml(path, text):
    path.write_text(text)
    return path


def test_settings_fall_back_from_subset_to_dataset_to_general(tmp_path):
    root = kohya_folders(tmp_path)
    config = read_dataset_config(write_toml(tmp_path / "d.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
flip_aug = true
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
keep_tokens = 2
enable_bucket = true
bucket_reso_steps = 32
min_bucket_reso = 32
max_bucket_reso = 128

  [[datasets.subsets]]
  image_dir = "{root / 'a' / 'images'}"
  conditioning_data_dir = "{root / 'a' / 'canny'}"
  num_repeats = 3
  keep_tokens = 3

  [[datasets.subsets]]
  image_dir = "{root / 'b' / 'images'}"
  conditioning_data_dir = "{root / 'b' / 'canny'}"
  flip_aug = false
"""))
    first, second = config.subsets
    assert (first.num_repeats, first.captions.keep_tokens, first.augmentation.flip_aug) == (3, 3, True)
    assert (second.num_repeats, second.captions.keep_tokens, second.augmentation.flip_aug) == (1, 2, False)
    assert first.captions.shuffle_caption and second.captions.shuffle_caption
    assert config.batch_size == 2
    assert config.resize.buckets == KohyaBuckets((64, 64), 32, 128, 32, False)
    dataset = KohyaDataset(config.subsets, config.resize)
    assert len(dataset) == 4 * 3 + 4


def test_a_configs_caption_options_reach_each_subsets_items(tmp_path):
    """Each subset's items train on captions its options made: dropped in one, prefixed in the other."""
    root = kohya_folders(tmp_path)
    config = read_dataset_config(write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = "{root / 'a' / 'images'}"
  conditioning_data_dir = "{root / 'a' / 'canny'}"
  caption_dropout_rate = 1.0

  [[datasets.subsets]]
  image_dir = "{root / 'b' / 'images'}"
  conditioning_data_dir = "{root / 'b' / 'canny'}"
  caption_prefix = "best"
"""))
    dataset = KohyaDataset(config.subsets, config.resize)
    stored = [dataset.caption(i) for i in range(8)]
    assert all(stored) and [dataset[i]["txt"] for i in range(4)] == [""] * 4
    assert [dataset[i]["txt"] for i in range(4, 8)] == [f"best {caption}" for caption in stored[4:]]


REFUSALS = {
    "unknown key": ("flip = true", r"datasets\[0\].subsets\[0\]: unknown key 'flip'"),
    "type": ('flip_aug = "yes"', r"datasets\[0\].subsets\[0\].flip_aug must be true or false, got 'yes'"),
    "random crop": ("random_crop = true", r"random_crop = True is not supported: kohya's ControlNet training"),
    "epoch dropout": ("caption_dropout_every_n_epochs = 2", r"caption_dropout_every_n_epochs = 2 is not supported"),
    "warm-up": ("token_warmup_step = 10", r"token_warmup_step = 10 is not supported"),
    "interpolation": ('resize_interpolation = "lanczos"', r"resize_interpolation = 'lanczos' is not supported"),
    "rate": ("caption_dropout_rate = 1.5", r"caption_dropout_rate must be a number from 0 to 1, got 1.5"),
    "dataset key in a subset": ("resolution = 32", r"subsets\[0\].resolution: resolution belongs in \[\[datasets\]\]"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_key_that_cannot_take_effect_is_refused_by_name(tmp_path, case):
    line, message = REFUSALS[case]
    path = write_toml(tmp_path / "d.toml", f"""
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "x"
  conditioning_data_dir = "y"
  {line}
""")
    with pytest.raises(DatasetConfigError, match=message):
        read_dataset_config(path)


def test_dataset_level_refusals(tmp_path):
    subset = '[[datasets.subsets]]\nimage_dir = "x"\nconditioning_data_dir = "y"\n'
    cases = {
        '[[datasets]]\nimage_dir = "x"\n': r"datasets\[0\].image_dir: image_dir belongs in \[\[datasets.subsets\]\]",
        f"[[datasets]]\n{subset}": r"no resolution \(in \[\[datasets\]\], \[general\] or --resolution\)",
        f"[[datasets]]\nresolution = 64\n{subset}[[datasets]]\nresolution = 32\n{subset}":
            r"datasets\[1\].resolution is 32 but datasets\[0\].resolution is 64",
        f"[[datasets]]\nresolution = 64\nvalidation_split = 0.1\n{subset}": r"validation_split = 0.1 is not supported",
        f"[[datasets]]\nresolution = [64, 32]\n{subset}": r"non-square resolution needs enable_bucket",
        f"[[datasets]]\nresolution = 512\nenable_bucket = true\nmin_bucket_reso = 640\n{subset}":
            r"resolution 512 must lie between min_bucket_reso 640",
        f"pretrained_model_name_or_path = 'm'\n[[datasets]]\n{subset}": r"unknown key 'pretrained_model_name_or_path'",
    }
    for text, message in cases.items():
        with pytest.raises(DatasetConfigError, match=message):
            read_dataset_config(write_toml(tmp_path / "d.toml", text))
    with pytest.raises(DatasetConfigError, match=r"datasets\[0\].resolution is 64 but --resolution is 32"):
        read_dataset_config(write_toml(tmp_path / "d.toml", f"[[datasets]]\nresolution = 64\n{subset}"),
                            {"resolution": 32})
    assert read_dataset_config(write_toml(tmp_path / "d.toml", f"[[datasets]]\n{subset}"),
                               {"resolution": 32}).resize == Resize(32)
    (tmp_path / "d.json").write_text(json.dumps({"datasets": [{"resolution": 48, "subsets": [
        {"image_dir": "x", "conditioning_data_dir": "y"}]}]}))
    assert read_dataset_config(tmp_path / "d.json").resize == Resize(48)


def train(out, *extra):
    from tutorial_train import main
    return main(["--config", TINY, "--resume_path", "none", "--output_dir", str(out), "--sample_steps", "1",
                 "--logger_freq", "1000", "--accelerator", "cpu", "--devices", "1", "--max_steps", "2",
                 "--log_every_n_steps", "1", "--sd_locked", "False", *extra])


def test_a_kohya_lllite_dataset_toml_trains_unchanged(tmp_path):
    """The dataset TOML of kohya's docs/train_lllite_README.md, at a tiny resolution."""
    root = kohya_folders(tmp_path)
    path = write_toml(tmp_path / "dataset.toml", f"""
[general]
flip_aug = false
color_aug = false
cache_info = true

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = false

[[datasets.subsets]]
image_dir = "{root / 'a' / 'images'}"
caption_extension = ".txt"
conditioning_data_dir = "{root / 'a' / 'canny'}"
""")
    trainer = train(tmp_path / "run", "--dataset_config", str(path), "--max_train_samples", "3", "--seed", "1")
    assert trainer.global_step == 2 and trainer.datamodule.batch_size == 2
    assert len(trainer.datamodule.dataset) == 3
    with pytest.raises(ValueError, match=r"--data_root, --resize cannot be given with --dataset_config"):
        train(tmp_path / "run2", "--dataset_config", str(path), "--data_root", "x", "--resize", "buckets")
    with pytest.raises(ValueError, match=r"batch_size is 2 but --batch_size is 3"):
        train(tmp_path / "run3", "--dataset_config", str(path), "--batch_size", "3")


# ---- diffusers' options ----

def test_max_train_samples_draws_by_seed(tmp_path):
    from cldm.data import Fill50KDataset
    dataset = Fill50KDataset(make_fill50k(tmp_path / "fill", n=10, size=16, seed=0))
    chosen = select_samples(dataset, 4, seed=3)
    want = sorted(np.random.default_rng(3).permutation(10)[:4].tolist())  # diffusers: shuffle(seed), first N
    assert chosen.indices == want and len(chosen) == 4
    assert [chosen.caption(i) for i in range(4)] == [dataset.caption(i) for i in want]
    np.testing.assert_array_equal(chosen[1]["jpg"], dataset[want[1]]["jpg"])
    with pytest.raises(ValueError, match="--max_train_samples must be from 1 to the 10 samples of the data, got 11"):
        select_samples(dataset, 11)


def test_caption_lists_pick_one_per_step(tmp_path):
    root = tmp_path / "hf"
    save(root / "0.png", pattern(8, 8))
    save(root / "h0.png", pattern(8, 8))
    with open(root / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "0.png", "conditioning_image_file_name": "h0.png",
                            "text": ["a red circle", "a circle, red", "red round shape"]}) + "\n")
    dataset = HFDataset(root, cache_dir=str(tmp_path / "cache"))
    assert dataset.caption(0) == "a red circle"
    captions = [item["txt"] for item in items(dataset, 900)]
    for choice in ("a red circle", "a circle, red", "red round shape"):
        assert abs(captions.count(choice) / 900 - 1 / 3) < tolerance(1 / 3, 900)
    os.remove(root / "metadata.jsonl")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "conditioning_image_file_name": "h0.png",
                                                     "text": []}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 is neither text nor a non-empty list of texts"):
        HFDataset(root, cache_dir=str(tmp_path / "cache2"))
