import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"
sys.path.insert(0, str(ROOT))

# The suite's models are tiny: one thread avoids oversubscribing 2 cores (measured up to 30x slower when
# another process shares them).
torch.set_num_threads(1)

# The parity tests' batch: two prompts and the seed of each image's noise.
PROMPTS = ["a red circle on a white background", "a blue circle on a black background"]
SEEDS = [7, 8]


def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from a reference key list (`key<TAB>shape`, x-separated, `scalar` for 0-d)."""
    keys = {}
    for line in (REFERENCE / name).read_text().splitlines():
        key, shape = line.split("\t")
        keys[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return keys



def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """key -> shape of a state dict, to compare structures without their values."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def meta_tensors(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict of these names and shapes on the meta device: a full-size file's structure without its data."""
    return {k: torch.empty(shape, device="meta") for k, shape in keys.items()}


def sd_checkpoint(model) -> dict[str, torch.Tensor]:
    """A plain Stable Diffusion checkpoint of the model: UNet, VAE and text encoder."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}

def model_as_trained(config, seed: int = 0, control: bool = False):
    """The config's model with random weights (seeded), its UNet's zero-initialised layers randomised: a zero
    output layer would make eps, and so any control's effect, exactly zero; with `control`, its control network's
    too, so that the control acts."""
    from cldm.model import create_model
    torch.manual_seed(seed)
    model = create_model(config)
    randomize_zero_init(model.model.diffusion_model)
    if control:
        randomize_zero_init(model.control_model)
    return model


@pytest.fixture
def tiny_model():
    model = model_as_trained(ROOT / "models" / "cldm_tiny.yaml")
    return model


def write_clip_vocabulary(folder: Path) -> tuple[str, str]:
    """vocab.json and merges.txt of transformers' CLIPTokenizer written from open_clip's bundled BPE tables (its
    start and end tokens renamed as OpenAI's); their paths."""
    from open_clip.tokenizer import SimpleTokenizer
    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def diffusers_unet(model, config):
    """diffusers' UNet2DConditionModel holding `model`'s UNet, through diffusers' own LDM converter. Its config
    guesses SDXL's text_time embedding from a 2048/1280 context width, so at toy widths a base with size
    embedders gets the addition embedding as the SDXL converter sets it."""
    import diffusers
    from diffusers.loaders import single_file_utils as convert
    from omegaconf import OmegaConf

    original = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    unet_config = convert.create_unet_diffusers_config_from_ldm(original, sd)
    embedders = original["model"]["params"].get("conditioner_config", {}).get("params", {}).get("emb_models", [])
    sizes = [m["params"]["outdim"] for m in embedders if m["target"].endswith(".ConcatTimestepEmbedderND")]
    if sizes:
        unet_config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=sizes[0])
    unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(convert.convert_ldm_unet_checkpoint(sd, unet_config), strict=True)
    return unet



def sd_pipeline_latents(pipe, model, prompts, seeds, size: int, steps: int, cfg: float, **call):
    """The final latents of a diffusers SD pipeline on `model`'s text embeddings of `prompts` (and of empty negative
    prompts), from noise drawn by generators seeded with `seeds`, as sample() draws it; `call` adds the pipeline's
    own arguments (the control's image, scale, window)."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor((len(seeds), 4, size // 8, size // 8), generator=generators)
    with torch.no_grad():
        c = model.get_learned_conditioning(list(prompts))
        uc = model.get_learned_conditioning([""] * len(prompts))
        return pipe(prompt_embeds=c, negative_prompt_embeds=uc, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=cfg, generator=generators, latents=latents, output_type="latent", **call).images

def sdxl_pipeline_latents(pipe, model, prompts, seeds, size: int, steps: int, cfg: float, **call):
    """The final latents of a diffusers SDXL pipeline on `model`'s text conditioning of `prompts` (and of empty
    negative prompts: prompt embeddings and pooled text), from noise drawn by generators seeded with `seeds`, as
    sample() draws it; `call` adds the pipeline's own arguments (the control's image, scale, window)."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor((len(seeds), 4, size // 8, size // 8), generator=generators)
    pooled = model.conditioner.embedders[1].model.text_projection.shape[1]
    with torch.no_grad():
        c = model.text_conditioning(list(prompts), (size, size))
        uc = model.text_conditioning([""] * len(prompts), (size, size))
        return pipe(prompt_embeds=c["c_crossattn"][0], pooled_prompt_embeds=c["c_adm"][:, :pooled],
                    negative_prompt_embeds=uc["c_crossattn"][0], negative_pooled_prompt_embeds=uc["c_adm"][:, :pooled],
                    height=size, width=size, num_inference_steps=steps, guidance_scale=cfg, generator=generators,
                    latents=latents, output_type="latent", **call).images


def diffusers_vae(model, config):
    """diffusers' AutoencoderKL holding `model`'s VAE, through diffusers' own LDM converter."""
    import diffusers
    from diffusers.loaders import single_file_utils as convert
    from omegaconf import OmegaConf

    original = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    vae_config = convert.create_vae_diffusers_config_from_ldm(original, sd)
    vae = diffusers.AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(convert.convert_ldm_vae_checkpoint(sd, vae_config), strict=True)
    return vae


def randomize_zero_init(module: torch.nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised layers of a fresh UNet random weights, so it acts like a trained one."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def randomize_zero_convs(model, std: float = 0.1) -> None:
    """Give the zero convs (and the hint block's zero output) non-zero weights so control acts."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.control_model.named_parameters():
            if "zero_convs" in name or "middle_block_out" in name or name.startswith("input_hint_block.14"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def write_temps_to_dev_full(monkeypatch, prefix: str = "") -> None:
    """Make atomic writes whose temp file name starts with `prefix` write to /dev/full, where every write fails
    with ENOSPC as on a full disk."""
    import ldm.checkpoint
    mkstemp = ldm.checkpoint.tempfile.mkstemp

    def full_device(**kwargs):
        fd, name = mkstemp(**kwargs)
        if not kwargs.get("prefix", "").startswith(prefix):
            return fd, name
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name

    monkeypatch.setattr(ldm.checkpoint.tempfile, "mkstemp", full_device)


def dead_pid() -> int:
    """The id of a process that has exited (a writer killed with kill -9, for the temp names it left)."""
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid
