"""The typed batch (ldm.batch, cldm.data.batch): every reader yields one of its kinds with exactly the keys it
defines, and a reader with a wrong, missing or misshapen key stops at the first batch with one message naming the
key and the reader."""
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from cldm.data import Fill50KDataset, HFDataset, KohyaDataset, Resize, ShardDataset, folder_subsets
from cldm.data.batch import ControlCachedItem, ControlImageItem, check_control_item
from cldm.data.latent_cache import CachedDataset, cache_latents
from cldm.data.loading import TrainData, sample_error_message
from cldm.data.shards import write_shards
from ldm.batch import BatchKeyError
from ldm.modules.encoders.conditioner import SIZE_KEYS
from tool_make_fill50k import make_fill50k

IMAGE_KEYS = {"jpg", "txt", "hint", *SIZE_KEYS}


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill"), n=4, size=32, seed=0)


def kohya_and_hf(fill, root):
    """The Fill50K samples in kohya's layout and as a Hugging Face imagefolder."""
    rows = [json.loads(line) for line in (fill / "prompt.json").read_text().splitlines()]
    (root / "kohya" / "cond").mkdir(parents=True)
    (root / "hf").mkdir()
    with open(root / "hf" / "metadata.jsonl", "w") as meta:
        for i, row in enumerate(rows):
            for folder in (root / "kohya", root / "hf"):
                Image.open(fill / row["target"]).save(folder / f"{i}.png")
            Image.open(fill / row["source"]).save(root / "kohya" / "cond" / f"{i}.png")
            Image.open(fill / row["source"]).save(root / "hf" / f"hint{i}.png")
            (root / "kohya" / f"{i}.txt").write_text(row["prompt"])
            meta.write(json.dumps({"file_name": f"{i}.png", "conditioning_image_file_name": f"hint{i}.png",
                                   "text": row["prompt"]}) + "\n")
    return root / "kohya", root / "hf"


def test_every_reader_yields_a_control_item_with_exactly_its_keys(fill, tiny_model, tmp_path):
    kohya, hf = kohya_and_hf(fill, tmp_path)
    readers = {"fill50k": Fill50KDataset(fill, resize=Resize(32)),
               "kohya": KohyaDataset(folder_subsets(kohya, kohya / "cond"), resize=Resize(32)),
               "hf": HFDataset(hf, resize=Resize(32), cache_dir=str(tmp_path / "hf_cache")),
               "shards": ShardDataset(write_shards(Fill50KDataset(fill), tmp_path / "shards"), Resize(32),
                                      shuffle=False)}
    for name, reader in readers.items():
        item = reader[0]
        check_control_item(item, name)
        assert set(item) == IMAGE_KEYS, name
        assert set(item) <= ControlImageItem.__required_keys__ | ControlImageItem.__optional_keys__
    cached = CachedDataset(cache_latents(tiny_model, Fill50KDataset(fill, size=32), tmp_path / "cache"))[0]
    check_control_item(cached, "CachedDataset")
    assert set(cached) == ControlCachedItem.__required_keys__ == {"txt", "hint", "mean", "std", "txt_emb",
                                                                  "txt_emb_empty"}


class Altered(Fill50KDataset):
    """A Fill50K reader whose items `alter` changes, as a reader with a mistake would."""

    def __init__(self, root, alter) -> None:
        super().__init__(root)
        self.alter = alter

    def __getitem__(self, idx):
        return self.alter(dict(super().__getitem__(idx)))


def renamed_hint(item):
    item["hints"] = item.pop("hint")
    return item


MISTAKES = {
    "renamed": (renamed_hint, r"Altered yields an item with no key 'hint' and an unknown key 'hints' \(a "
                              r"ControlImageItem has hint, jpg, txt; optional: crop_coords_top_left"),
    "missing": (lambda it: {k: v for k, v in it.items() if k != "txt"}, r"Altered yields an item with no key 'txt'"),
    "misspelt size": (lambda it: {**it, "original_size": it.pop("original_size_as_tuple")},
                      r"no key 'original_size_as_tuple'|unknown key 'original_size'"),
    "hint in 0..255": (lambda it: {**it, "hint": it["hint"] * 255},
                       r"Altered yields 'hint' with values from 0 to 255; a ControlImageItem's 'hint' is H x W x C "
                       r"in \[0, 1\]"),
    "channels first": (lambda it: {**it, "jpg": it["jpg"].transpose(2, 0, 1)},
                       r"Altered yields 'jpg' of shape 3 x 32 x 32; a ControlImageItem's 'jpg' is H x W x 3 in "
                       r"\[-1, 1\]"),
    "caption list": (lambda it: {**it, "txt": [it["txt"]]}, r"Altered yields 'txt' as a list; a ControlImageItem's "
                                                            r"'txt' is a str"),
    "NaN image": (lambda it: {**it, "jpg": np.full_like(it["jpg"], np.nan)}, r"'jpg' with values from nan to nan"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_wrong_item_is_named_by_key_and_reader_at_the_first_batch(fill, mistake):
    alter, message = MISTAKES[mistake]
    loader = TrainData(Altered(fill, alter), batch_size=2).train_dataloader()
    with pytest.raises(BatchKeyError, match=message):
        next(iter(loader))


def test_a_cached_item_without_the_empty_prompt_is_named(fill, tiny_model, tmp_path):
    cache = cache_latents(tiny_model, Fill50KDataset(fill, size=32), tmp_path / "cache")

    class NoEmptyPrompt(CachedDataset):
        def __getitem__(self, idx):
            return {k: v for k, v in super().__getitem__(idx).items() if k != "txt_emb_empty"}

    with pytest.raises(BatchKeyError, match=r"NoEmptyPrompt yields an item with no key 'txt_emb_empty' \(a "
                                            r"ControlCachedItem has"):
        next(iter(TrainData(NoEmptyPrompt(cache), batch_size=2).train_dataloader()))


def test_training_stops_at_the_first_batch_with_one_line_also_from_a_worker(fill, tiny_model):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, use_distributed_sampler=False)
    steps = []
    tiny_model.on_train_batch_start = lambda batch, batch_idx: steps.append(batch_idx)
    with pytest.raises(BatchKeyError) as raised:
        trainer.fit(tiny_model, datamodule=TrainData(Altered(fill, renamed_hint), batch_size=2, num_workers=1))
    assert steps == [] and trainer.global_step == 0
    assert sample_error_message(raised.value).startswith("Altered yields an item with no key 'hint'")
    assert "\n" not in sample_error_message(raised.value)
    assert torch.is_tensor(next(iter(TrainData(Fill50KDataset(fill), 2).train_dataloader()))["hint"])
