"""Cached latents: tool_cache_latents + CachedDataset give the online training objective without the encoders."""

import json

import pytest
import torch
from torch.utils.data import default_collate

import tool_cache_latents
from cldm.data.latent_cache import CachedDataset, cache_latents
from cldm.model import load_state_dict, save_state_dict
from conftest import ROOT, model_as_trained, randomize_zero_convs
from ldm.checkpoint import UserError
from tool_make_fill50k import make_fill50k
from tutorial_dataset import MyDataset

TINY = str(ROOT / "models" / "cldm_tiny.yaml")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fill50k(tmp_path_factory.mktemp("fill50k"), n=6, size=32, seed=0)


@pytest.fixture
def cached(tiny_model, data_root, tmp_path):
    randomize_zero_convs(tiny_model)
    out = cache_latents(tiny_model, MyDataset(data_root), tmp_path / "cache", batch_size=4)
    return tiny_model, out


def batches(data_root, cache, n=4):
    online = default_collate([MyDataset(data_root)[i] for i in range(n)])
    return online, default_collate([CachedDataset(cache)[i] for i in range(n)])


@pytest.mark.parametrize("drop_prompt_rate", [0.0, 0.5])
def test_cached_and_online_training_give_the_same_loss(cached, data_root, drop_prompt_rate):
    model, cache = cached
    online, from_cache = batches(data_root, cache)
    assert set(from_cache) == {"txt", "hint", "mean", "std", "txt_emb", "txt_emb_empty"}
    assert torch.equal(online["hint"], from_cache["hint"]) and online["txt"] == from_cache["txt"]
    model.train()
    model.drop_prompt_rate = drop_prompt_rate
    for seed in range(3):
        torch.manual_seed(seed)
        loss_online, _ = model.shared_step(online)
        torch.manual_seed(seed)
        loss_cached, _ = model.shared_step(from_cache)
        assert (loss_online - loss_cached).abs().item() <= 1e-5, seed
    model.drop_prompt_rate = 0.5
    torch.manual_seed(0)
    dropped = model.drop_prompt_batch(from_cache)
    assert "" in dropped["txt"] and any(dropped["txt"])  # seed 0 drops some prompts and keeps others
    for i, prompt in enumerate(dropped["txt"]):
        want = from_cache["txt_emb_empty"][i] if prompt == "" else from_cache["txt_emb"][i]
        assert torch.equal(dropped["txt_emb"][i], want)


def test_cached_training_runs_neither_encoder(cached, data_root, monkeypatch):
    model, cache = cached
    _, from_cache = batches(data_root, cache, n=2)

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran on a cached batch")

    monkeypatch.setattr(model, "encode_first_stage", refuse)
    monkeypatch.setattr(model, "get_learned_conditioning", refuse)
    loss, _ = model.shared_step(from_cache)
    assert torch.isfinite(loss)


def test_cache_files_and_refusals(cached, data_root, tmp_path):
    model, cache = cached
    meta = json.loads((cache / "meta.json").read_text())
    prompts = [MyDataset(data_root)[i]["txt"] for i in range(6)]
    assert meta["count"] == 6 and meta["latent_shape"] == [4, 4, 4] and set(meta["prompts"]) == set(prompts)
    run = lambda *extra: tool_cache_latents.main(  # noqa: E731
        ["--config", TINY, "--ckpt", "none", "--data_root", str(data_root), "--out", str(cache), *extra])
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        run()
    stamp = (cache / "mean.npy").stat().st_mtime_ns
    run("--force", "--batch_size", "3")
    assert (cache / "mean.npy").stat().st_mtime_ns != stamp and not list(cache.parent.glob(".cache.*"))
    (data_root / "prompt.json").write_text((data_root / "prompt.json").read_text().replace("circle", "disc", 1))
    try:
        with pytest.raises(ValueError, match="does not match"):
            CachedDataset(cache)
    finally:
        (data_root / "prompt.json").write_text((data_root / "prompt.json").read_text().replace("disc", "circle", 1))
    with pytest.raises(FileNotFoundError, match="tool_cache_latents.py"):
        CachedDataset(tmp_path / "nowhere")


def initial_checkpoint(path, seed: int):
    """Initial weights as tool_add_control.py would give them, of a tiny model that can learn."""
    model = model_as_trained(TINY, seed)
    return save_state_dict(model.state_dict(), path)


def test_tutorial_train_on_a_cache_with_speed_flags(data_root, tmp_path):
    from tutorial_train import main
    initial = initial_checkpoint(tmp_path / "ini.ckpt", seed=0)
    cache = tool_cache_latents.main(["--config", TINY, "--ckpt", str(initial), "--data_root", str(data_root),
                                     "--out", str(tmp_path / "cache")])
    trainer = main(["--config", TINY, "--resume_path", str(initial), "--cached_latents", str(cache),
                    "--batch_size", "2",
                    "--max_steps", "2", "--logger_freq", "1000", "--accelerator", "cpu", "--devices", "1",
                    "--output_dir", str(tmp_path / "run"), "--gradient_checkpointing", "True", "--channels_last",
                    "--drop_prompt_rate", "0.5", "--precision", "bf16-mixed"])
    assert trainer.global_step == 2 and (tmp_path / "run" / "control_model.safetensors").is_file()
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def test_a_cache_of_other_encoder_weights_is_refused(data_root, tmp_path):
    from tutorial_train import main
    initial, other = (initial_checkpoint(tmp_path / f"ini{seed}.ckpt", seed) for seed in (0, 1))
    cache = tool_cache_latents.main(["--config", TINY, "--ckpt", str(other), "--data_root", str(data_root),
                                     "--out", str(tmp_path / "cache")])
    assert json.loads((cache / "meta.json").read_text())["ckpt"] == str(other)
    args = ["--config", TINY, "--cached_latents", str(cache), "--batch_size", "2", "--max_steps", "1",
            "--accelerator", "cpu", "--devices", "1", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match=f"{cache} was made with another VAE / text encoder \\(from {other}\\)"):
        main([*args, "--resume_path", str(initial)])
    meta = json.loads((cache / "meta.json").read_text())
    del meta["encoders_fingerprint"]  # as an older tool_cache_latents.py wrote it
    (cache / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="records no fingerprint") as refused:
        main([*args, "--resume_path", str(other)])
    assert "tool_cache_latents.py" in refused.value.advice
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("option", [["--resolution", "64"], ["--resize", "random_crop"], ["--skip_bad_samples"],
                                    ["--data_format", "fill50k"], ["--caption_extension", ".caption"]])
def test_reader_options_a_cache_would_ignore_are_refused_by_name(cached, option, tmp_path):
    """A run asked for 64 px must not train at the cache's 32 without a word."""
    from tutorial_train import main
    with pytest.raises(UserError, match=f"^{option[0]} does not apply to --cached_latents {cached[1]}"):
        main(["--config", TINY, "--resume_path", "none", "--cached_latents", str(cached[1]), *option,
              "--max_steps", "1", "--accelerator", "cpu", "--devices", "1", "--output_dir", str(tmp_path / "run")])


def test_a_resumed_run_with_bf16_frozen_weights_keeps_its_cache(data_root, tmp_path):
    """--frozen_dtype bf16 saves the frozen encoders rounded to bf16; the cache of their float32 weights still
    fits the resumed run (the SDXL 24 GB recipe resumes so)."""
    from tutorial_train import main
    initial = initial_checkpoint(tmp_path / "ini.ckpt", seed=0)
    cache = tool_cache_latents.main(["--config", TINY, "--ckpt", str(initial), "--data_root", str(data_root),
                                     "--out", str(tmp_path / "cache")])
    assert set(json.loads((cache / "meta.json").read_text())["encoders_fingerprint"]) == {
        "float32", "bfloat16", "float16"}
    args = ["--config", TINY, "--cached_latents", str(cache), "--batch_size", "2", "--logger_freq", "1000",
            "--accelerator", "cpu", "--devices", "1", "--output_dir", str(tmp_path / "run"), "--frozen_dtype", "bf16",
            "--precision", "bf16-mixed"]
    main([*args, "--resume_path", str(initial), "--max_steps", "1"])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_state_dict(last)["first_stage_model.decoder.conv_out.weight"].dtype == torch.bfloat16
    resumed = main([*args, "--resume", str(last), "--max_steps", "2", "--force"])
    assert resumed.global_step == 2


def test_non_finite_latents_are_refused_naming_the_image_and_nothing_is_written(data_root, tmp_path, monkeypatch):
    """A VAE that overflows (float16, or broken weights) must not leave a cache that trains on NaN."""
    import cldm.data.latent_cache
    encode = cldm.data.latent_cache.encode_images

    def overflowing(model, batch):
        mean, std = encode(model, batch)
        mean[1, 0, 0, 0] = float("inf") if len(mean) == 4 else mean[1, 0, 0, 0]  # sample 1 of the first batch
        return mean, std
    monkeypatch.setattr(cldm.data.latent_cache, "encode_images", overflowing)
    out = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"target/1\.png \(line 2 of .*prompt\.json\): the VAE encodes it to "
                                         r"non-finite latents"):
        tool_cache_latents.main(["--config", TINY, "--ckpt", "none", "--data_root", str(data_root), "--out", str(out),
                                 "--batch_size", "4"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []
