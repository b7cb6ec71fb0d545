"""The benchmarks in smoke mode (tiny config, a step or two, diffusers as the peer), so they cannot rot."""

import math

import pytest

from benchmarks import bench_sample, bench_train, gpu_suite  # noqa: E402


def test_bench_train_compares_the_same_function_and_memory(tmp_path):
    table = tmp_path / "table.md"
    result = bench_train.main(["--smoke", "--device", "cpu", "--cached", "--table", str(table)])
    assert result["max_eps_diff"] <= 1e-5
    ours, theirs = result["ours"], result["diffusers"]
    for side in (ours, theirs):
        assert side["samples_per_s"] > 0 and side["memory"] > side["static"] > 0
    assert ours["static"] == pytest.approx(theirs["static"], rel=0.02)  # same weights and optimizer state
    assert "| train samples/s | cldm_tiny 32px b1 fp32 cached |" in table.read_text()


def test_bench_train_with_speed_and_memory_options():
    result = bench_train.main(["--smoke", "--device", "cpu", "--precision", "bf16-mixed",
                               "--gradient_checkpointing", "--channels_last", "--optimizer", "adamw8bit"])
    assert result["ratio"] > 0 and result["ours"]["memory"] > 0
    assert result["ours"]["static"] == pytest.approx(result["diffusers"]["static"], rel=0.02)


def test_bench_sample_gives_the_same_latents():
    result = bench_sample.main(["--smoke", "--device", "cpu"])
    assert result["max_latent_diff"] <= 1e-4
    assert result["ours"]["it_per_s"] > 0 and result["diffusers"]["s_per_image"] > 0
    assert result["drift"] == {}  # float32 weights: nothing to compare against


def test_bench_sample_in_bf16_differs_from_diffusers_less_than_rounding_moves_either():
    result = bench_sample.main(["--smoke", "--device", "cpu", "--precision", "bf16"])
    assert result["max_latent_diff"] <= 0.1
    assert set(result["drift"]) == {"ours", "diffusers"}
    assert all(math.isfinite(d) and result["max_latent_diff"] < d for d in result["drift"].values())


def test_gpu_suite_stages_run(tmp_path):
    table = tmp_path / "gpu.md"
    rows = gpu_suite.main(["--smoke", "--table", str(table)])
    metrics = [r[0] for r in rows]
    assert "failed" not in [r[1] for r in rows], rows
    assert metrics.count("train samples/s") == 3 and metrics.count("sample it/s") == 3  # ours, and 2 ablations
    assert metrics[-2:] == ["train samples/s at max batch", "train peak memory at max batch"]
    assert "b2 bf16-mixed cached, each side alone" in table.read_text()


def test_narrowed_config_keeps_the_layers():
    from cldm.bench.measure import TINY, narrowed_config
    from cldm.model import create_model
    wide, narrow = create_model(TINY, device="meta"), create_model(narrowed_config(TINY, 64), device="meta")
    assert [n for n, _ in wide.named_modules()] == [n for n, _ in narrow.named_modules()]
    assert narrow.control_model.input_blocks[0][0].out_channels == 64
    assert narrow.model.diffusion_model.input_blocks[0][0].out_channels == 64
    result = bench_sample.main(["--smoke", "--device", "cpu", "--model_channels", "64"])
    assert result["max_latent_diff"] <= 1e-4 and "cldm_tiny_ch64 32px" in result["rows"][0][1]

