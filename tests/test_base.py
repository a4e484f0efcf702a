"""How each base family turns prompts into the UNet's text conditioning."""

import pytest
import torch
from tiny_models import tiny_base, tiny_text_encoder, tiny_unet, tiny_vae
from transformers import CLIPTextConfig, CLIPTextModel

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.sd.tokenizer import clip_tokenizer


def _openclip_like(layers: int) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=77)
    return CLIPTextModel(config).eval()


def test_sd2_reads_the_same_layer_from_24_layer_files_and_23_layer_folders():
    """SD2 conditioning is OpenCLIP's 23rd layer + final norm, whether the 24th layer was kept or not."""
    full = _openclip_like(24)
    trimmed = _openclip_like(23)
    trimmed.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers.23." not in k})
    make = lambda encoder: StableDiffusionBase("sd2", tiny_unet(), tiny_vae(), encoder, clip_tokenizer("!"))
    hidden_full, _ = make(full).encode_prompt(["red circle"])
    hidden_trimmed, _ = make(trimmed).encode_prompt(["red circle"])
    assert torch.equal(hidden_full, hidden_trimmed)
    assert torch.equal(hidden_trimmed, trimmed(clip_tokenizer("!")(["red circle"], padding="max_length",
                                                                    return_tensors="pt").input_ids).last_hidden_state)


def test_sd1_reads_the_last_hidden_state_and_has_no_pooled_embedding():
    """SD1.x conditioning is CLIP's final layer output, shape (B, 77, D)."""
    base = tiny_base("sd1")
    hidden, pooled = base.encode_prompt(["red circle with blue background", ""])
    assert hidden.shape == (2, 77, base.text_encoder.config.hidden_size) and pooled is None


def test_sdxl_concatenates_both_encoders_and_passes_pooled_text_and_time_ids():
    """SDXL: penultimate layers of both encoders side by side, plus bigG's pooled embedding and 6 time ids."""
    base = tiny_base("sdxl")
    hidden, pooled = base.encode_prompt(["red circle"])
    width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    extra = base.added_cond_kwargs(pooled, 64, 64)
    assert hidden.shape == (1, 77, width) and pooled.shape == (1, base.text_encoder_2.config.projection_dim)
    assert extra["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_a_base_with_the_wrong_number_of_text_encoders_is_refused():
    """An SDXL base needs two text encoders; a family typo is named."""
    with pytest.raises(ValueError, match="two text encoders"):
        StableDiffusionBase("sdxl", tiny_unet(), tiny_vae(), tiny_text_encoder(), clip_tokenizer())
    with pytest.raises(ValueError, match="sd3"):
        StableDiffusionBase("sd3", tiny_unet(), tiny_vae(), tiny_text_encoder(), clip_tokenizer())
