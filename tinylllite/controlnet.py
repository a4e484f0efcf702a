"""ControlNet: a trainable copy of the UNet encoder whose outputs enter the locked UNet through zero convs.

Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models" (2023), sec. 3.1-3.3,
Eq. (2):    y_c = F(x; Θ) + Z(F(x + Z(c; Θ_z1); Θ_c); Θ_z2)
F(.; Θ) is a locked UNet block, F(.; Θ_c) its trainable copy, Z(.) a zero-initialised convolution, c the
condition. Here, as in the original `cldm/cldm.py` (ControlNet, ControlledUnetModel) and diffusers'
`ControlNetModel`:

- the copy is the UNet's time embedding (plus SDXL's added "text_time" embedding), `conv_in`, every down
  block and the middle block, weights copied;
- Z(c; Θ_z1) is the hint encoder (hint.py), added once, to the output of the copied `conv_in`;
- Z(.; Θ_z2) is one zero-initialised 1x1 conv per skip feature the UNet encoder produces, plus one for the
  middle block (SD1.5: 12 + 1 = 13), each output added to the matching skip of the locked UNet.

Parameter and module names equal diffusers' ControlNetModel, so
`ControlNetModel(...).load_state_dict(ControlNet.from_unet(unet).state_dict())` works both ways.

Left out: class-label, image and Kandinsky-style embeddings, attention masks, `global_pool_conditions`
(shuffle models) and gradient checkpointing; UNets that need them raise in `from_unet`.
"""

import copy
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from tinylllite.hint import HintEncoder


@dataclass
class ControlResiduals:
    """What a ControlNet returns: one tensor per encoder skip (shallowest first) and one for the middle."""

    down: tuple[torch.Tensor, ...]  # down[i]: (B, C_i, H_i, W_i), the shape of the UNet's skip i
    mid: torch.Tensor  # (B, C_mid, H_mid, W_mid), the shape of the middle block output

    def __len__(self) -> int:
        return len(self.down) + 1

    def scaled(self, scales: list[float] | None = None, strength: float = 1.0) -> "ControlResiduals":
        """Residual i times scales[i] times strength; the last scale is the middle one's.

        The original's `control_scales` (`[strength] * 13`, or the guess-mode ramp) and diffusers'
        `conditioning_scale` are these two knobs.
        """
        scales = [1.0] * len(self) if scales is None else list(scales)
        if len(scales) != len(self):
            raise ValueError(
                f"got {len(scales)} control scales for {len(self)} residuals ({len(self.down)} skips + 1 middle); "
                f"pass one per residual, e.g. guess_mode_scales({len(self)})"
            )
        down = tuple(r * (s * strength) for r, s in zip(self.down, scales[:-1]))
        return ControlResiduals(down, self.mid * (scales[-1] * strength))

    def with_zero_unconditional(self) -> "ControlResiduals":
        """Residuals computed for the conditional half only -> [zeros; residuals] for a [uncond; cond] CFG batch.

        Guess mode drops the control from the unconditional half of classifier-free guidance, so that the
        difference cond - uncond carries the control (diffusers' pipeline does exactly this).
        """
        def pad(r: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(r), r])  # (B, C, H, W) -> (2B, C, H, W)

        return ControlResiduals(tuple(pad(r) for r in self.down), pad(self.mid))


def guess_mode_scales(n: int) -> list[float]:
    """Guess mode's per-residual scales: a geometric ramp from 0.1 (shallowest skip) to 1.0 (middle).

    This is diffusers' `torch.logspace(-1, 0, n)`. The original uses `0.825 ** (12 - i)` for i = 0..12, the
    same curve rounded (0.825 ** 12 = 0.099); the two differ by at most 9.4e-4.
    """
    return torch.logspace(-1, 0, n).tolist()


def zero_conv(channels: int, device=None, dtype=None) -> nn.Conv2d:
    """Z(.): a 1x1 conv with weight and bias zero, so it outputs zero until training moves it."""
    conv = nn.Conv2d(channels, channels, kernel_size=1, device=device, dtype=dtype)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def encoder_skip_channels(unet) -> list[int]:
    """Channels of every skip feature the UNet encoder hands to its decoder, shallowest first.

    Walks the structure the way the UNet's forward fills its skip list: the output of `conv_in`, then per
    down block one output per resnet (with its attention, if any) and one per downsampler.
    """
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [resnet.out_channels for resnet in block.resnets]
        channels += [down.out_channels for down in (block.downsamplers or [])]
    return channels


def _check_supported(unet) -> None:
    config = unet.config
    unsupported = {
        "class_embed_type / num_class_embeds": unet.class_embedding is not None,
        "encoder_hid_dim_type": unet.encoder_hid_proj is not None,
        "time_embedding_act_fn": unet.time_embed_act is not None,
        f"addition_embed_type={config.addition_embed_type!r}": config.addition_embed_type not in (None, "text_time"),
        "mid_block_type=None": unet.mid_block is None,
    }
    if found := [name for name, present in unsupported.items() if present]:
        raise NotImplementedError(
            f"ControlNet.from_unet: this UNet uses {', '.join(found)}, which tinylllite does not copy "
            f"(it supports the SD1.x, SD2.x and SDXL layouts)"
        )


def _check_same_grid(guided_hint: torch.Tensor, h: torch.Tensor, hint: torch.Tensor, factor: int) -> None:
    if guided_hint.shape[-2:] != h.shape[-2:]:
        raise ValueError(
            f"hint is {tuple(hint.shape[-2:])} pixels, which is a {tuple(guided_hint.shape[-2:])} grid after the "
            f"hint encoder, but the latent is {tuple(h.shape[-2:])}: the hint must be the latent size times the "
            f"VAE factor {factor}"
        )


class ControlNet(nn.Module):
    """The control branch. Build it with `ControlNet.from_unet(unet)`; run the UNet with `controlled_unet_forward`."""

    def __init__(self, unet, hint_channels: int = 3, vae_scale_factor: int = 8):
        super().__init__()
        _check_supported(unet)
        weight = unet.conv_in.weight  # new layers are made on the UNet's device, in its dtype
        # Registration order follows diffusers' ControlNetModel, so even the state_dict key order matches.
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)  # sinusoidal, no parameters
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
            self.add_time_proj = copy.deepcopy(unet.add_time_proj)
            self.add_embedding = copy.deepcopy(unet.add_embedding)
        else:
            self.add_embedding = None
        self.controlnet_cond_embedding = HintEncoder(hint_channels, unet.conv_in.out_channels, vae_scale_factor)
        self.controlnet_cond_embedding.to(device=weight.device, dtype=weight.dtype)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.controlnet_down_blocks = nn.ModuleList(
            zero_conv(c, weight.device, weight.dtype) for c in encoder_skip_channels(unet)
        )
        mid_channels = unet.mid_block.resnets[-1].out_channels
        self.controlnet_mid_block = zero_conv(mid_channels, weight.device, weight.dtype)
        self.mid_block = copy.deepcopy(unet.mid_block)
        # The copy is the trainable one even when the UNet it came from is frozen (deepcopy would keep
        # requires_grad=False): diffusers' ControlNetModel.from_unet also returns fresh, trainable parameters.
        self.requires_grad_(True)

    @classmethod
    def from_unet(cls, unet, hint_channels: int = 3, vae_scale_factor: int = 8) -> "ControlNet":
        """Copy `unet`'s encoder (weights included) and add a fresh hint encoder and zero convs.

        `vae_scale_factor` is the VAE's downsampling factor (8 for Stable Diffusion): it sets how many
        stride-2 stages the hint encoder needs to bring a pixel-space hint onto the latent grid.
        """
        return cls(unet, hint_channels, vae_scale_factor)

    @property
    def num_residuals(self) -> int:
        """How many residuals `forward` returns: one per encoder skip + 1 for the middle (SD1.5: 13)."""
        return len(self.controlnet_down_blocks) + 1

    def embed_time(self, timestep, batch: int, dtype: torch.dtype, added_cond_kwargs: dict | None) -> torch.Tensor:
        """Timestep (and SDXL's pooled text + time ids) -> the embedding every resnet receives, (B, 4*C0)."""
        t = torch.as_tensor(timestep, device=self.conv_in.weight.device).reshape(-1).expand(batch)  # () or (B,) -> (B,)
        emb = self.time_embedding(self.time_proj(t).to(dtype))  # (B,) -> (B, C0) -> (B, 4*C0)
        if self.add_embedding is not None:
            if not added_cond_kwargs or not {"text_embeds", "time_ids"} <= added_cond_kwargs.keys():
                raise ValueError("an SDXL ControlNet needs added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}")
            text_embeds = added_cond_kwargs["text_embeds"]  # (B, D_pooled)
            time_ids = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())  # (B, 6) -> (B*6, D_t)
            time_ids = time_ids.reshape(text_embeds.shape[0], -1)  # (B*6, D_t) -> (B, 6*D_t)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_ids], dim=-1).to(dtype))
        return emb

    def _run_block(self, block, h, emb, encoder_hidden_states):
        if getattr(block, "has_cross_attention", False):
            return block(h, emb, encoder_hidden_states=encoder_hidden_states)
        return block(h, emb)

    def forward(self, sample, timestep, encoder_hidden_states, hint, added_cond_kwargs=None) -> ControlResiduals:
        """Noisy latent (B, 4, h, w), timestep, text (B, 77, D) and hint (B, 3, h*f, w*f) in [0, 1] -> residuals."""
        emb = self.embed_time(timestep, sample.shape[0], sample.dtype, added_cond_kwargs)

        # x + Z(c; Θ_z1): the hint enters once, added to the copy's first feature map.
        # cldm.py: "h = module(h, emb, context); h += guided_hint; guided_hint = None"
        h = self.conv_in(sample)  # (B, 4, h, w) -> (B, C0, h, w)
        guided_hint = self.controlnet_cond_embedding(hint)  # (B, 3, H, W) -> (B, C0, H/f, W/f)
        _check_same_grid(guided_hint, h, hint, self.controlnet_cond_embedding.vae_scale_factor)
        h = h + guided_hint  # (B, C0, h, w)

        # F(.; Θ_c): the copied encoder, collecting every skip feature the UNet's decoder would receive
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = self._run_block(block, h, emb, encoder_hidden_states)
            skips.extend(block_skips)
        h = self._run_block(self.mid_block, h, emb, encoder_hidden_states)  # (B, C_mid, h/2^k, w/2^k)

        # Z(.; Θ_z2): one zero conv per skip and one for the middle.
        # cldm.py: "outs.append(zero_conv(h, emb, context))" ... "outs.append(self.middle_block_out(h, emb, context))"
        down = tuple(zero(skip) for zero, skip in zip(self.controlnet_down_blocks, skips, strict=True))
        return ControlResiduals(down, self.controlnet_mid_block(h))


def controlled_unet_forward(unet, sample, timestep, encoder_hidden_states, residuals: ControlResiduals | None,
                            only_mid_control: bool = False, added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """Run the (locked) UNet with ControlNet residuals added to its skips and middle block output.

    The one way this package runs a controlled UNet. diffusers' UNet treats the residuals as ControlNet
    residuals only when BOTH `down_block_additional_residuals` and `mid_block_additional_residual` are given:
    the middle one alone is silently ignored, the skips alone are taken for a T2I-Adapter. So both are
    always passed, and `only_mid_control` passes zero skips rather than none.
    Original (ControlledUnetModel): "h += control.pop()" after the middle block, then per decoder block
    "h = torch.cat([h, hs.pop() + control.pop()], dim=1)", or "hs.pop()" alone when only_mid_control.
    `residuals=None` runs the plain UNet.
    """
    if residuals is None:
        return unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    down = residuals.down
    if only_mid_control:
        down = tuple(torch.zeros_like(r) for r in down)
    return unet(
        sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
        down_block_additional_residuals=list(down), mid_block_additional_residual=residuals.mid,
    ).sample


def set_trainable(unet, control: ControlNet, sd_locked: bool = True) -> list[nn.Parameter]:
    """Freeze and unfreeze exactly what ControlNet trains; return the parameters to hand to the optimizer.

    sd_locked=True (the default, the paper's setting): only the control branch learns, the UNet is frozen.
    sd_locked=False: the UNet's decoder learns too (original: `output_blocks` and `out`; diffusers:
    `up_blocks`, `conv_norm_out`, `conv_out`); the original suggests a lower lr (2e-6) then.
    Frozen parameters get `requires_grad=False`, so backward leaves their `.grad` at None.
    """
    unet.requires_grad_(False)
    control.requires_grad_(True)
    if not sd_locked:
        for decoder_part in (unet.up_blocks, unet.conv_norm_out, unet.conv_out):
            if decoder_part is not None:  # conv_norm_out is None when the UNet has no norm groups
                decoder_part.requires_grad_(True)
    return [p for p in chain(control.parameters(), unet.parameters()) if p.requires_grad]
