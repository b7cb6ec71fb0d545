"""Module names of our ControlNet in diffusers' ControlNetModel layout (the two differ only in names)."""

from collections.abc import Mapping

import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import Downsample

RESNET_LAYERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_module_names(net: nn.Module) -> dict[str, str]:
    """ldm module path -> diffusers ControlNetModel module path, for every module of `net` (a cldm.cldm.ControlNet)
    holding weights.

    Used by tool_convert_diffusers and by the LoRA mode to read ControlLoRA v2's diffusers-named files.
    """
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block.1": "mid_block.attentions.0",
             "middle_block_out.0": "controlnet_mid_block"}
    if net.label_emb is not None:  # SDXL's vector embedding: diffusers' text_time add_embedding
        names |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    resnets = {"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"}
    level = index = 0
    for i, block in enumerate(net.input_blocks):
        if i == 0:
            continue
        if isinstance(block[0], Downsample):
            names[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, index = level + 1, 0
            continue
        resnets[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{index}"
        if len(block) > 1:
            names[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{index}"
        index += 1
    for old, new in resnets.items():
        names |= {f"{old}.{a}": f"{new}.{b}" for a, b in RESNET_LAYERS.items()}
    convs = [i for i, m in enumerate(net.input_hint_block) if isinstance(m, nn.Conv2d)]
    names[f"input_hint_block.{convs[0]}"] = "controlnet_cond_embedding.conv_in"
    names[f"input_hint_block.{convs[-1]}"] = "controlnet_cond_embedding.conv_out"
    names |= {f"input_hint_block.{c}": f"controlnet_cond_embedding.blocks.{n}"
              for n, c in enumerate(convs[1:-1])}
    names |= {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(len(net.zero_convs))}
    return names


def rename_module(key: str, table: Mapping[str, str]) -> str:
    """Rename the longest module path of `key` found in `table`; keys it does not know stay as they are."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return key
