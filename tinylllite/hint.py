"""The hint encoder: a small conv net that turns a control image into the UNet's first feature map.

Mirrors `input_hint_block` of the original `cldm/cldm.py` (lllyasviel/ControlNet) and diffusers'
`ControlNetConditioningEmbedding`, whose submodule names (`conv_in`, `blocks.i`, `conv_out`) are kept so
released weights load. The layers, for a VAE that shrinks images 8x (Stable Diffusion):

    3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> C0      (3x3 convs, padding 1, SiLU in between)
                 s2          s2          s2       zero-init

Each stride-2 conv halves the image, so the number of stride-2 stages is log2(VAE factor): a hint of
H x W pixels comes out on the latent grid H/8 x W/8. For a factor-4 VAE the last stage is dropped
(channels 16, 32, 96), as diffusers' tiny test configs do.

The paper (Zhang et al. 2023, sec. 3.3) describes "a tiny network E(.) of four convolution layers with
4 x 4 kernels and 2 x 2 strides"; the released code and weights use the deeper encoder above instead.

The last conv starts at zero, so an untrained hint encoder outputs exactly zero. `check_hint` is the
one check of a control image in the package (ControlNet's encoder, LLLite's conditioning and the
sampler all call it). Left out: diffusers' `bgr` channel-order option (hints here are always RGB).
"""

import contextvars
import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from tinylllite.errors import InputError

STAGE_CHANNELS = (16, 32, 96, 256)  # channels after conv_in and after each stride-2 stage
RANGE_TOLERANCE = 1e-2  # resizing may overshoot [0, 1] a little; [-1, 1] or [0, 255] inputs are the real mistakes


def hint_stage_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """(16, 32, 96, 256) for a factor-8 VAE, (16, 32, 96) for factor 4: one stride-2 stage per halving."""
    stages = math.log2(vae_scale_factor)
    if not stages.is_integer() or not 1 <= stages <= len(STAGE_CHANNELS) - 1:
        raise ValueError(
            f"vae_scale_factor={vae_scale_factor}: the hint encoder supports factors 2, 4 and 8 "
            f"(one stride-2 stage per halving, at most {len(STAGE_CHANNELS) - 1})"
        )
    return STAGE_CHANNELS[: int(stages) + 1]


def check_hint(hint: torch.Tensor, channels: int = 3, vae_scale_factor: int | None = None) -> None:
    """The one check of a control image, for ControlNet and LLLite alike: (B, channels, H, W), values in [0, 1].

    With `vae_scale_factor`, H and W must also be multiples of it, so the hint lands exactly on the latent
    grid. Raises an InputError (a ValueError) that says what is wrong and how to fix it.
    """
    if hint.ndim != 4 or hint.shape[1] != channels:
        raise InputError(
            f"hint has shape {tuple(hint.shape)}; expected (B, {channels}, H, W) RGB, channels first "
            f"(an HWC image needs .permute(0, 3, 1, 2))"
        )
    height, width = hint.shape[-2:]
    f = vae_scale_factor
    if f and (height % f or width % f):
        raise InputError(
            f"hint is {height}x{width} pixels; both sides must be multiples of the VAE factor {f} so that it "
            f"lands exactly on the latent grid (resize or crop it to {height // f * f}x{width // f * f})"
        )
    if hint.is_meta or hint.numel() == 0 or torch.compiler.is_compiling() or _CHECKED_ON_HOST.get():
        return  # inside torch.compile the host read below would split the graph at every call
    low, high = torch.stack(torch.aminmax(hint.detach())).float().tolist()  # one device -> host read
    check_hint_range(low, high)


_CHECKED_ON_HOST = contextvars.ContextVar("hint_checked_on_host", default=False)


@contextmanager
def checked_on_host():
    """`with checked_on_host():` the hints used inside had their values checked before they left the host
    (`check_hint_range` on each training item), so `check_hint` checks only their shape there and makes the
    GPU wait for no read-back. The training loop is the one user."""
    token = _CHECKED_ON_HOST.set(True)
    try:
        yield
    finally:
        _CHECKED_ON_HOST.reset(token)


def check_hint_range(low: float, high: float, where: str = "hint") -> None:
    """Refuse hint values outside [0, 1] (up to resizing's overshoot), naming `where` they came from."""
    if math.isnan(low) or math.isnan(high):
        raise InputError(f"{where} holds NaN values; control images are RGB in [0, 1]: check how the hint was made")
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise InputError(
            f"{where} values lie in [{low:.3g}, {high:.3g}]; control images are RGB in [0, 1] "
            f"(divide uint8 images by 255; map [-1, 1] images with (x + 1) / 2)"
        )


class HintEncoder(nn.Module):
    """Control image (B, 3, H, W) in [0, 1] -> feature map (B, C0, H/f, W/f), zero at initialisation."""

    def __init__(self, hint_channels: int = 3, out_channels: int = 320, vae_scale_factor: int = 8):
        super().__init__()
        channels = hint_stage_channels(vae_scale_factor)
        self.hint_channels = hint_channels
        self.vae_scale_factor = vae_scale_factor

        self.conv_in = nn.Conv2d(hint_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))  # same size
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))  # halves H and W

        # "zero_module(conv_nd(dims, 256, model_channels, 3, padding=1))" (cldm.py): an untrained ControlNet
        # adds nothing to the UNet's first feature map.
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        check_hint(hint, self.hint_channels, self.vae_scale_factor)
        hint = hint.to(self.conv_in.weight.dtype)  # a float32 hint may meet a half-precision encoder
        h = F.silu(self.conv_in(hint))  # (B, 3, H, W) -> (B, 16, H, W)
        for conv in self.blocks:
            h = F.silu(conv(h))  # after all blocks: (B, 256, H/f, W/f)
        return self.conv_out(h)  # (B, 256, H/f, W/f) -> (B, C0, H/f, W/f)
