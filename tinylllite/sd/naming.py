"""Module paths of diffusers' UNet2DConditionModel in the original (LDM / CompVis) layout.

The original ControlNet code, A1111, ComfyUI and kohya all name UNet modules the LDM way
(`input_blocks.4.1`), diffusers names them by block and layer (`down_blocks.1.attentions.0`).
This file is the one place that translates between the two, for any UNet that diffusers can build,
by counting layers instead of reading a table:

- the encoder is a flat list `input_blocks`: conv_in first, then per level `layers_per_block`
  (resnet[, attention]) pairs and one downsampler (not after the last level);
- the decoder is a flat list `output_blocks` with `layers_per_block + 1` entries per level, the
  upsampler riding in the last entry of each level but the last;
- `middle_block` is resnet, attention, resnet.

Left out: UNets whose `layers_per_block` differs per level (no Stable Diffusion release has them).
"""

import re

RESNET_PARTS = {  # diffusers ResnetBlock2D child -> LDM ResBlock child
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

TOP_LEVEL = {  # diffusers module -> LDM module, outside the blocks
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def layers_per_block(unet_config) -> int:
    """The number of resnets per encoder level; the decoder has one more."""
    n = unet_config["layers_per_block"]
    if not isinstance(n, int):
        raise ValueError(f"layers_per_block={n!r}: only one value for every level is supported")
    return n


def _rename_resnet(rest: str) -> str:
    """`conv1.weight` -> `in_layers.2.weight`; other parts pass through."""
    head, _, tail = rest.partition(".")
    return ".".join(p for p in (RESNET_PARTS.get(head, head), tail) if p)


def diffusers_to_ldm(path: str, unet_config) -> str:
    """Translate a diffusers UNet module or parameter path to its LDM name.

    >>> diffusers_to_ldm("down_blocks.1.attentions.0.proj_in", sd15_config)
    'input_blocks.4.1.proj_in'
    """
    n = layers_per_block(unet_config)
    for diff, ldm in TOP_LEVEL.items():
        if path == diff or path.startswith(diff + "."):
            return ldm + path[len(diff) :]

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\.(.*))?", path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[5] or ""
        index = level * (n + 1) + j + 1  # +1: input_blocks.0 is conv_in
        if kind == "resnets":
            return _join(f"input_blocks.{index}.0", _rename_resnet(rest))
        return _join(f"input_blocks.{index}.1", rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\.(.*))?", path):
        index = int(m[1]) * (n + 1) + n + 1
        return _join(f"input_blocks.{index}.0.op", m[3] or "")

    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\.(.*))?", path):
        kind, j, rest = m[1], int(m[2]), m[4] or ""
        if kind == "resnets":
            return _join(f"middle_block.{2 * j}", _rename_resnet(rest))
        return _join(f"middle_block.{2 * j + 1}", rest)

    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\.(.*))?", path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[5] or ""
        index = level * (n + 1) + j  # each decoder level holds n + 1 entries
        if kind == "resnets":
            return _join(f"output_blocks.{index}.0", _rename_resnet(rest))
        return _join(f"output_blocks.{index}.1", rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\.(.*))?", path):
        level = int(m[1])
        has_attention = "CrossAttn" in unet_config["up_block_types"][level]
        index = level * (n + 1) + n
        return _join(f"output_blocks.{index}.{2 if has_attention else 1}.conv", m[3] or "")

    raise KeyError(f"no LDM name for UNet path {path!r}")


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if rest else prefix
