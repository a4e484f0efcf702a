"""The hint encoder (tinylllite/hint.py): its layers, its output grid, and its errors for bad hints."""

import pytest
import torch
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from tinylllite.hint import HintEncoder


def conv_channels(encoder: HintEncoder) -> list[tuple[int, int, int]]:
    convs = [encoder.conv_in, *encoder.blocks, encoder.conv_out]
    return [(conv.in_channels, conv.out_channels, conv.stride[0]) for conv in convs]


def test_hint_encoder_layers_follow_the_original_channels_and_strides():
    """Factor 8: 3->16->16->32->32->96->96->256->C0 with stride 2 on the 16->32, 32->96 and 96->256 convs."""
    encoder = HintEncoder(out_channels=320, vae_scale_factor=8)

    assert conv_channels(encoder) == [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2),
                                      (96, 96, 1), (96, 256, 2), (256, 320, 1)]
    assert sum(p.numel() for p in encoder.parameters()) == 1_086_480  # SD1.5's input_hint_block in control_sd15_ini.ckpt


def test_factor_4_hint_encoder_drops_the_last_stride_2_stage():
    """Factor 4 keeps the stages with channels 16, 32, 96 and feeds the 96 channels to the zero conv."""
    encoder = HintEncoder(out_channels=32, vae_scale_factor=4)

    assert conv_channels(encoder) == [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 32, 1)]


@pytest.mark.parametrize("factor", [4, 8])
def test_hint_encoder_output_lands_on_the_latent_grid(factor):
    """A (B, 3, H, W) hint becomes (B, C0, H/f, W/f), the grid of the VAE latent, for VAE factors 4 and 8."""
    encoder = HintEncoder(out_channels=32, vae_scale_factor=factor)

    out = encoder(torch.rand(2, 3, 48, 64))

    assert out.shape == (2, 32, 48 // factor, 64 // factor)


def test_untrained_hint_encoder_outputs_exact_zero():
    """The last conv is zero-initialised, so a fresh hint encoder adds nothing to the UNet's first features."""
    encoder = HintEncoder(out_channels=32)

    assert torch.equal(encoder(torch.rand(1, 3, 32, 32)), torch.zeros(1, 32, 4, 4))
    assert encoder.conv_in.weight.abs().sum() > 0  # only conv_out starts at zero


def test_hint_encoder_matches_diffusers_conditioning_embedding():
    """Same state-dict keys as diffusers' ControlNetConditioningEmbedding and the same output for random weights."""
    torch.manual_seed(0)
    ours = HintEncoder(out_channels=32, vae_scale_factor=8)
    torch.nn.init.normal_(ours.conv_out.weight, std=0.02)
    reference = ControlNetConditioningEmbedding(conditioning_embedding_channels=32)
    reference.load_state_dict(ours.state_dict())
    hint = torch.rand(2, 3, 32, 40)

    assert list(ours.state_dict()) == list(reference.state_dict())
    torch.testing.assert_close(ours(hint), reference(hint), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "hint, message",
    [
        (torch.rand(1, 1, 32, 32), "channels first"),  # grayscale, one channel
        (torch.rand(1, 32, 32, 3), "channels first"),  # HWC instead of CHW
        (torch.rand(1, 3, 30, 32), "multiples of the VAE factor 8"),
        (torch.rand(1, 3, 32, 32) * 2 - 1, "in \\[0, 1\\]"),  # [-1, 1] like the VAE's images
        (torch.rand(1, 3, 32, 32) * 255, "divide uint8 images by 255"),
    ],
    ids=["one-channel", "channels-last", "not-a-multiple-of-8", "minus-one-to-one", "0-255"],
)
def test_hint_of_wrong_channels_size_or_range_raises_a_clear_error(hint, message):
    """Bad hints are refused with a message saying what to fix, not silently encoded."""
    encoder = HintEncoder(out_channels=32)

    with pytest.raises(ValueError, match=message):
        encoder(hint)


def test_unsupported_vae_scale_factor_raises():
    """A VAE factor that is not 2, 4 or 8 cannot be reached by stride-2 stages of the original encoder."""
    with pytest.raises(ValueError, match="supports factors 2, 4 and 8"):
        HintEncoder(vae_scale_factor=16)
