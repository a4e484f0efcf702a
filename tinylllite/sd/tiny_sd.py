"""The tiny Stable Diffusion that ships with tinylllite: SD's architecture, shrunk to train on a CPU.

Nobody can download SD1.5 on a laptop without a GPU, so the project trains its own base
(`scripts/pretrain_tiny_sd.py`) on the Fill50K world at 64 px and commits the weights in diffusers'
layout under `tinylllite/sd/tiny_sd_weights/{vae,unet,text_encoder}/`. It knows "<colour> circle with
<colour> background" but, trained on random positions, not where the circle goes: that is the
control branch's job (`tutorial_train.py`).

The parts are the stock classes (diffusers AutoencoderKL + UNet2DConditionModel, transformers
CLIPTextModel with the real CLIP tokenizer), so every code path that runs SD1.5 runs this model
unchanged. It keeps the two facts of SD's geometry that control code depends on:

- a VAE with 4 levels (factor 8) and 4 latent channels, so the ControlNet hint encoder (÷8) applies
  unchanged; 64 px images give 8x8 latents;
- UNet levels at latent factors 8, 16, 32 (8x8 -> 4x4 -> 2x2), all with cross-attention, so every
  LLLite module has a kohya depth (1, 2, 3), the middle block included (factor 32: depth 3).

Left out: SD's fourth UNet level (a 1x1 latent would be all it saw) and its 768-wide, 12-layer text
encoder (2 layers of width 64 are enough to name 140 colours; the 49,408-token embedding table is
kept so the tokenizer is SD's).
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tinylllite.sd.base import SD_NOISE_SCHEDULE, StableDiffusionBase
from tinylllite.sd.tokenizer import clip_tokenizer

TINY_IMAGE_SIZE = 64  # Fill50K is rendered at 64 x 64 px for the tiny world
WEIGHTS_DIR = Path(__file__).parent / "tiny_sd_weights"
TEXT_WIDTH = 64  # text encoder hidden size = the UNet's cross_attention_dim

VAE_CONFIG = dict(
    block_out_channels=(8, 16, 32, 64),  # 4 levels: 3 down-samplings, factor 8 like SD's; narrow where wide
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,  # few, wide groups: GroupNorm removes each group's mean and scale, i.e. flat colours
    sample_size=TINY_IMAGE_SIZE,
)

UNET_CONFIG = dict(
    sample_size=TINY_IMAGE_SIZE // 8,  # latent side: 8
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),  # latent factors 8, 16, 32
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3,
    up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=4,  # diffusers' name for the number of heads
    norm_num_groups=8,
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,  # the real CLIP vocabulary (tinylllite.sd.tokenizer)
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

SCHEDULER_CONFIG = dict(SD_NOISE_SCHEDULE)  # SD's own training noise schedule; the tiny SD predicts epsilon


def build_tiny_parts(seed: int = 0) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """Freshly initialised (untrained) VAE, UNet and text encoder, seeded."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    return vae, unet, text_encoder


def load_tiny_sd(dtype: torch.dtype = torch.float32, weights_dir: Path | str = WEIGHTS_DIR) -> StableDiffusionBase:
    """The pretrained tiny SD from the committed weights (offline, `from_pretrained` on local folders)."""
    weights_dir = Path(weights_dir)
    for part in ("vae", "unet", "text_encoder"):
        if not (weights_dir / part / "config.json").is_file():
            raise FileNotFoundError(f"tiny SD part {part!r} missing: expected {weights_dir / part}/config.json and "
                                    "weights; run `python scripts/pretrain_tiny_sd.py` to train them")
    vae = AutoencoderKL.from_pretrained(weights_dir / "vae", torch_dtype=dtype, local_files_only=True,
                                        low_cpu_mem_usage=False)  # no `accelerate` needed for 12 MB
    unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet", torch_dtype=dtype, local_files_only=True,
                                                low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(weights_dir / "text_encoder", torch_dtype=dtype,
                                                 local_files_only=True)
    return StableDiffusionBase(family="tiny", unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                               tokenizer=clip_tokenizer(), scheduler_config=dict(SCHEDULER_CONFIG))
