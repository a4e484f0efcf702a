"""Tiny, randomly initialised Stable Diffusion parts for tests: same layouts as SD1.5 / SDXL, CPU-fast.

Shared by the test files (import from `tiny_models`). Every builder is seeded, so tests are deterministic.
"""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.sd.tokenizer import clip_tokenizer

TEXT_DIM = 32


def tiny_sd15_unet_config(**overrides) -> dict:
    """SD1.5's block layout (3 cross-attention levels + 1 plain, 2 layers each) at toy width."""
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_sdxl_unet_config(**overrides) -> dict:
    """SDXL's layout: plain first level, transformer depth (1, 2), text_time added conditioning."""
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return config


def tiny_unet(config: dict | None = None, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**(config or tiny_sd15_unet_config())).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A factor-8 VAE (4 levels) with 4 latent channels, like SD's."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def tiny_text_encoder(seed: int = 0, hidden: int = TEXT_DIM, with_projection: bool = False):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_base(family: str = "sd1", seed: int = 0) -> StableDiffusionBase:
    """A random SD1-shaped (or SDXL-shaped) base: every part real diffusers/transformers classes."""
    if family == "sdxl":
        return StableDiffusionBase(
            family="sdxl", unet=tiny_unet(tiny_sdxl_unet_config(), seed), vae=tiny_vae(seed),
            text_encoder=tiny_text_encoder(seed), tokenizer=clip_tokenizer(),
            text_encoder_2=tiny_text_encoder(seed + 1, with_projection=True), tokenizer_2=clip_tokenizer("!"),
        )
    return StableDiffusionBase(family=family, unet=tiny_unet(seed=seed), vae=tiny_vae(seed),
                               text_encoder=tiny_text_encoder(seed), tokenizer=clip_tokenizer())


def diffusers_pipeline(base: StableDiffusionBase, control):
    """diffusers' StableDiffusionControlNetPipeline on the base's own parts and a ControlNetModel holding `control`'s
    weights (its keys are diffusers' own), with tinylllite's DDIM settings: the reference sampling is compared to."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from tinylllite.sample import make_sampler

    reference = ControlNetModel.from_unet(base.unet)
    reference.load_state_dict(control.state_dict())  # diffusers' keys, one for one
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=reference.eval(), scheduler=make_sampler(base, "ddim"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
