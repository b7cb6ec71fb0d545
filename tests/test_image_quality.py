"""FID and CLIP score beside the protocol (cldm/image_quality.py): torchmetrics' metrics on networks of the real
architectures with random weights, read from annotator/ckpts as the real files would be, against the Fréchet
distance and the cosine computed by hand; missing and unsafe weight files named in one line."""

import argparse

import numpy as np
import pytest
import scipy.linalg
import torch

from cldm.data.circles import make_fill50k
from cldm.image_quality import FID, CLIPScore, as_chw, clip_vit_b16, inception
from cldm.model import save_state_dict
from conftest import ROOT, model_as_trained, randomize_zero_convs, write_clip_vocabulary

TINY = str(ROOT / "models" / "cldm_tiny.yaml")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """annotator/ckpts as a user would fill it, with random weights of the real architectures: torch-fidelity's
    Inception (which cannot be built without loading a file, so its own initialisation is saved once) and a
    small CLIP folder as transformers saves one, its tokenizer on open_clip's vocabulary."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), folder / "weights-inception-2015-12-05-6726825d.pth")
    clip = folder / "clip-vit-base-patch16"
    clip.mkdir()
    config = CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64),
                        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(clip)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(images, CLIPTokenizer(*write_clip_vocabulary(clip), model_max_length=77)).save_pretrained(clip)
    return folder


def frechet_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets (Dowson and Landau's
    symmetric form of the trace term, both roots from symmetric eigendecompositions; unbiased covariances)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = scipy.linalg.eigh(sa)
    root = (vectors * np.sqrt(values.clip(0))) @ vectors.T
    cross = np.sqrt(scipy.linalg.eigvalsh(root @ sb @ root).clip(0)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def test_fid_per_group_is_the_frechet_distance_of_the_inception_features(ckpts, monkeypatch):
    """On Inception's 64-channel layer: the same computation as on its 2048 features (whose covariances take a
    minute on two cores), which the network gives from the same file."""
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(ckpts))
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    outputs = rng.integers(0, 128, (4, 2, 32, 32, 3), dtype=np.uint8)  # 4 prompts, 2 images each
    with torch.no_grad():
        assert inception()(as_chw(targets[:1])).shape == (1, 2048)
    network = inception(features="64")
    fid = FID(2, network=network)
    for i in range(4):
        fid.update(i, "a prompt", targets[i], outputs[i])
    summary = fid.summary()
    with torch.no_grad():
        def features(images):
            return network(as_chw(images)).double().numpy()
        real = features(targets)
        expected = [frechet_by_hand(real, features(outputs[:, g])) for g in range(2)]
    assert summary["per_group"] == pytest.approx(expected, rel=1e-3)
    assert summary["value"] == pytest.approx(np.mean(expected), rel=1e-3) and min(expected) > 0


def test_missing_and_unsafe_inception_files_are_named(tmp_path, monkeypatch):
    from annotator.util import MissingWeightsError
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth.*torch-fidelity"):
        inception()
    torch.save({"state": argparse.Namespace(code="runs when unpickled")},
               tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(ValueError, match="is not a plain weights file"):
        inception()


def test_clip_score_is_the_cosine_of_the_embeddings_times_100(ckpts, monkeypatch):
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(ckpts))
    model, processor = clip_vit_b16()
    score = CLIPScore(model_and_processor=(model, processor))
    rng = np.random.default_rng(1)
    outputs = rng.integers(0, 256, (3, 2, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square on a white background", "two cats"]
    for i, prompt in enumerate(prompts):
        score.update(i, prompt, outputs[i, 0], outputs[i])
    with torch.no_grad():
        pixels = processor(images=list(outputs.reshape(-1, 32, 32, 3)), return_tensors="pt")["pixel_values"]
        tokens = processor(text=[p for p in prompts for _ in range(2)], return_tensors="pt", padding=True)
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image, text = (getattr(x, "pooler_output", x) for x in (image, text))
        cosine = torch.nn.functional.cosine_similarity(image, text).numpy()
    expected = 100 * cosine.reshape(3, 2).mean(1)
    assert score.per_prompt == pytest.approx(expected.tolist(), abs=1e-3)
    summary = score.summary(resamples=100)
    assert summary["value"] == pytest.approx(expected.mean(), abs=1e-3)
    assert summary["ci95"][0] <= summary["value"] <= summary["ci95"][1]


def test_missing_clip_folder_is_named(tmp_path, monkeypatch):
    from annotator.util import MissingWeightsError
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="clip-vit-base-patch16 lacks config.json, preprocessor_config.json "
                                                  "or processor_config.json, .*openai/clip-vit-base-patch16"):
        clip_vit_b16()


def test_tool_reports_clip_score_and_fid_beside_the_condition(ckpts, tmp_path, monkeypatch):
    import cldm.image_quality
    from tool_eval_control import main
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_CKPTS", str(ckpts))
    monkeypatch.setattr(cldm.image_quality, "inception", lambda device: inception(device, features="64"))
    model = model_as_trained(TINY)
    randomize_zero_convs(model)
    ckpt = save_state_dict(model.state_dict(), tmp_path / "tiny.ckpt")
    data = make_fill50k(tmp_path / "val", n=2, size=32, seed=1)
    md = tmp_path / "canny.md"
    summary = main(["--config", TINY, "--ckpt", str(ckpt), "--data_root", str(data), "--protocol", "controlnet++",
                    "--condition", "canny", "--resolution", "32", "--images_per_prompt", "2", "--steps", "2",
                    "--device", "cpu", "--bootstrap", "100", "--clip_score", "--fid", "--markdown", str(md)])
    quality = summary["image_quality"]
    assert set(quality) == {"fid", "clip_score"} and len(quality["fid"]["per_group"]) == 2
    assert "| CLIP score (higher is better) |" in md.read_text() and "| FID (lower is better) |" in md.read_text()
