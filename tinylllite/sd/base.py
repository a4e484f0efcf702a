"""A Stable Diffusion base model: the frozen parts a control branch is trained on.

Every base the project handles (SD1.x, SD2.x, SDXL, and the tiny SD it ships) is the same four
diffusers/transformers parts. This dataclass holds them together with the facts that differ
per family and that training and sampling must get right:

- how a prompt becomes the UNet's `encoder_hidden_states`: SD1 reads CLIP's last hidden state
  (ldm/modules/encoders/modules.py, `FrozenCLIPEmbedder`); SD2 the penultimate layer of OpenCLIP
  (`FrozenOpenCLIPEmbedder`, layer="penultimate"); SDXL concatenates the penultimate layers of two
  encoders and also passes the pooled embedding plus six size/crop numbers as `added_cond_kwargs`
  (Podell et al. 2023, "SDXL", sec. 2.2; diffusers' StableDiffusionXLPipeline);
- how latents are scaled (`vae.config.scaling_factor`, 0.18215 for SD1/SD2, 0.13025 for SDXL);
- the noise schedule the UNet was trained with: `SD_NOISE_SCHEDULE` below for every released SD
  (the `linear_start`, `linear_end`, `timesteps` of the original v1-inference.yaml), which a base's
  own scheduler config may override.

Left out: SDXL's refiner (one text encoder, aesthetic-score time ids) and per-sample crop/size time
ids (every sample is taken as uncropped at its own size).
"""

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tinylllite.errors import InputError

FAMILIES = ("sd1", "sd2", "sdxl", "tiny")
# The DDPM schedule of every SD1.x/SD2.x/SDXL UNet: 1000 steps, betas "scaled linear" (linear in sqrt(beta))
# from 0.00085 to 0.012, as diffusers' DDPMScheduler names them.
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
OPENCLIP_LAYERS = 24  # SD2's text encoder, OpenCLIP ViT-H/14
MAX_SIZE_FACTOR = 2  # images over 2x the base's native side take minutes and come out as repeated tiles


@dataclass
class StableDiffusionBase:
    family: str  # one of FAMILIES
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL only
    tokenizer_2: CLIPTokenizer | None = None  # SDXL only
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"
    scheduler_config: dict = field(default_factory=dict)  # overrides of SD_NOISE_SCHEDULE, e.g. from a folder

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if (self.family == "sdxl") != (self.text_encoder_2 is not None):
            raise ValueError("SDXL bases have exactly two text encoders; other families one")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 ** (number of VAE levels - 1), 8 for every SD."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def noise_schedule_config(self) -> dict:
        """The schedule the UNet was trained with (SD's, overridden by the base's own), with its prediction type:
        what diffusers' DDPMScheduler / DDIMScheduler `from_config` take."""
        return {**SD_NOISE_SCHEDULE, **self.scheduler_config, "prediction_type": self.prediction_type}

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def parts(self) -> dict[str, torch.nn.Module]:
        """The frozen modules by name, e.g. to move them to a device or count parameters."""
        named = dict(unet=self.unet, vae=self.vae, text_encoder=self.text_encoder)
        if self.text_encoder_2 is not None:
            named["text_encoder_2"] = self.text_encoder_2
        return named

    def to(self, device=None, dtype=None) -> "StableDiffusionBase":
        moves = {k: v for k, v in dict(device=device, dtype=dtype).items() if v is not None}
        for module in self.parts().values():
            module.to(**moves)  # a dtype=None argument would make diffusers warn about casting
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def _tokens(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)  # (B, 77)

    def truncated_words(self, prompt: str) -> str:
        """The end of `prompt` that CLIP's 77 tokens leave out ("" when it fits); diffusers' pipeline warns with it."""
        tokenizer = self.tokenizer
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # [BOS, tokens..., EOS]
        if len(ids) <= tokenizer.model_max_length:
            return ""
        return tokenizer.decode(ids[tokenizer.model_max_length - 1:-1])  # the kept ones: BOS + 75, then EOS

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> (encoder_hidden_states (B, 77, D), pooled (B, P) for SDXL else None)."""
        out = self.text_encoder(self._tokens(self.tokenizer, prompts), output_hidden_states=True)
        if self.family in ("sd1", "tiny"):
            return out.last_hidden_state, None  # (B, 77, 768)
        if self.family == "sd2":
            # OpenCLIP-H's 23rd of 24 layers, then the final layer norm (SD2's FrozenOpenCLIPEmbedder).
            # Original files hold all 24 layers, diffusers folders only the 23 that are used: index by
            # position (hidden_states[0] is the embedding output), not from the end.
            penultimate = out.hidden_states[OPENCLIP_LAYERS - 1]
            return self.text_encoder.final_layer_norm(penultimate), None  # (B, 77, 1024)
        out_2 = self.text_encoder_2(self._tokens(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return hidden, out_2.text_embeds  # pooled bigG: (B, 1280)

    def added_cond_kwargs(self, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
        """SDXL's extra conditioning: pooled text plus (orig h, w, crop top, left, target h, w)."""
        if self.family != "sdxl":
            return None
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}


def check_image_size(base: StableDiffusionBase, height: int, width: int, what: str) -> None:
    """Sides must land on the latent grid and stay within MAX_SIZE_FACTOR x the base's native size."""
    factor = base.vae_scale_factor
    if height % factor or width % factor:
        raise InputError(f"{what} is {height}x{width} pixels; both sides must be multiples of the VAE factor {factor}")
    native = base.unet.config.sample_size * factor
    if max(height, width) > MAX_SIZE_FACTOR * native:
        raise InputError(f"{what} is {height}x{width} pixels, over {MAX_SIZE_FACTOR}x this base's native {native} px: "
                         f"sampling would be slow and the image useless; resize it to {native}x{native}")
