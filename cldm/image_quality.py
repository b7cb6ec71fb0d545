"""Image quality beside the control metrics, as ControlNet++ reports it: FID of each group of generated images
(the g-th image of every prompt) against the held-out targets, averaged over the groups, and the CLIP score of
every image with its prompt. Both through torchmetrics' maintained implementations, on weights read from
annotator/ckpts (nothing is downloaded):

  FID         FrechetInceptionDistance, 2048 features of torch-fidelity's port of the TensorFlow Inception
              (weights-inception-2015-12-05-6726825d.pth); images resized to 299 by torchmetrics (bilinear,
              antialiased). The paper used clean-fid (PIL bicubic resize) on the same network, so values can differ
              from its table by a little.
  CLIP score  CLIPScore with openai/clip-vit-base-patch16 (a Hugging Face folder): 100 x the cosine of the image's
              and the prompt's embeddings, averaged over all images (the paper's metric.score / n_samples).

Both are `ImageSink`s of cldm.protocol.run: they see each prompt's target and generated images as they come.
"""

from pathlib import Path

import numpy as np
import torch

from annotator.util import load_weights, weights_path
from cldm.protocol import ImageSink, hub_folder, interval

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
CLIP_FOLDER = "clip-vit-base-patch16"
CLIP_SOURCE = "https://huggingface.co/openai/clip-vit-base-patch16"
CLIP_FILES = ("config.json", ("preprocessor_config.json", "processor_config.json"), "vocab.json", "merges.txt")


def as_chw(images: np.ndarray) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W uint8."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def inception(device: str | torch.device = "cpu", path: str | Path | None = None,
              features: str = "2048") -> torch.nn.Module:
    """torchmetrics' Inception feature extractor (FID's 2048 features, or another of torch-fidelity's layers) on
    the weights file in annotator/ckpts. The file is first read with weights_only (refused if it holds anything
    but tensors), since torch-fidelity's loader would unpickle it unchecked."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    path = Path(path) if path is not None else weights_path(INCEPTION_FILE, INCEPTION_URL)
    try:
        load_weights(path)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a plain weights file: {err}") from err
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[features],
                              feature_extractor_weights_path=str(path)).to(device)


class FID(ImageSink):
    """FID of each group of generated images against the targets (all of them real), averaged over groups."""

    def __init__(self, groups: int, device: str | torch.device = "cpu", network: torch.nn.Module | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance
        network = network if network is not None else inception(device)
        self.metrics = [FrechetInceptionDistance(feature=network).to(device) for _ in range(groups)]
        self.device = torch.device(device)

    def update(self, prompt_index: int, prompt: str, target: np.ndarray, outputs: np.ndarray) -> None:
        real = as_chw(target[None]).to(self.device)
        for metric, image in zip(self.metrics, outputs):
            metric.update(real, real=True)
            metric.update(as_chw(image[None]).to(self.device), real=False)

    def summary(self, resamples: int = 0, seed: int = 0) -> dict:
        """The mean FID over the groups, and each group's; FID has no per-prompt parts, so no interval."""
        if int(self.metrics[0].real_features_num_samples) < 2:
            raise ValueError("FID needs at least two prompts")
        per_group = [float(m.compute()) for m in self.metrics]
        return {"metric": "FID", "higher_is_better": False, "value": float(np.mean(per_group)),
                "per_group": per_group}


def clip_vit_b16(device: str | torch.device = "cpu") -> tuple:
    """(CLIPModel, CLIPProcessor) from annotator/ckpts/clip-vit-base-patch16 (the openai/clip-vit-base-patch16
    folder)."""
    from transformers import CLIPModel, CLIPProcessor
    folder = hub_folder(CLIP_FOLDER, CLIP_SOURCE, CLIP_FILES)
    return CLIPModel.from_pretrained(folder).to(device).eval(), CLIPProcessor.from_pretrained(folder)


class ProjectedEmbeddings(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as a tensor:
    transformers 5 returns them inside an output object (its pooler_output), which torchmetrics 1.9's CLIPScore
    takes for the tensor and fails on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


class CLIPScore(ImageSink):
    """CLIP score of every generated image with its prompt; the per-prompt means give the interval."""

    def __init__(self, device: str | torch.device = "cpu", model_and_processor: tuple | None = None):
        from torchmetrics.multimodal.clip_score import CLIPScore as Metric
        model, processor = model_and_processor or clip_vit_b16(device)
        self.metric = Metric(model_name_or_path=lambda: (ProjectedEmbeddings(model), processor)).to(device)
        self.device = torch.device(device)
        self.per_prompt: list[float] = []

    def update(self, prompt_index: int, prompt: str, target: np.ndarray, outputs: np.ndarray) -> None:
        before = float(self.metric.score)
        self.metric.update(as_chw(outputs).to(self.device), [prompt] * len(outputs))
        self.per_prompt.append((float(self.metric.score) - before) / len(outputs))

    def summary(self, resamples: int = 2000, seed: int = 0) -> dict:
        scores = np.asarray(self.per_prompt)
        low, high = interval(lambda idx: float(scores[idx].mean()), len(scores), resamples, seed)
        return {"metric": "CLIP score", "higher_is_better": True,
                "value": float(self.metric.score / self.metric.n_samples), "ci95": [low, high]}
