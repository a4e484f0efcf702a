"""load_base: original single files (SD1.5, SD2.x, SDXL shapes) and diffusers folders, offline, EMA, bad inputs."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinylllite.files import ldm_format as lf
from tinylllite.errors import InputError
from tinylllite.files.sd_loading import base_from_ldm, family_config, load_base
from tinylllite.files.state_dicts import open_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
SD15_PARTS = ("unet", "vae", "text_encoder")
POSITION_IDS = lf.CLIP_PREFIX["sd1"] + "embeddings.position_ids"  # in old .ckpt files, never loaded


def sd15_ldm_shapes() -> dict[str, list[int]]:
    """Every tensor of an original SD1.5 file (UNet, VAE, CLIP), from the checked keymap."""
    keymap = json.loads((FIXTURES / "sd15_ldm_to_diffusers_keymap.json").read_text())
    return {key: row[1] for part in SD15_PARTS for key, row in keymap[part].items()}


def pattern(shape, index: int, dtype=torch.float16) -> torch.Tensor:
    """A cheap tensor whose every element differs, different for each key index."""
    n = int(torch.tensor(shape).prod()) if shape else 1
    return (torch.linspace(-1, 1, n) + index * 1e-3).to(dtype).reshape(shape)


def meta_ldm(shapes: dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape in shapes.items()}


def sdxl_meta_ldm() -> dict[str, torch.Tensor]:
    """An SDXL base file's keys and shapes, on the meta device, written by this project's converters."""
    config = family_config("sdxl")
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**config["unet"]), AutoencoderKL(**config["vae"])
        clip = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    sd = lf.to_ldm(unet.state_dict(), lf.unet_names(unet.state_dict(), config["unet"]), lf.UNET_PREFIX)
    sd |= lf.to_ldm(vae.state_dict(), lf.vae_names(vae.state_dict(), config["vae"]), lf.VAE_PREFIX, vae=True)
    sd |= lf.to_ldm(clip.state_dict(), lf.clip_names(clip.state_dict()), lf.CLIP_PREFIX["sdxl"])
    bigg_sd = {k: v for k, v in bigg.state_dict().items() if not k.endswith("position_ids")}
    return sd | lf.openclip_to_ldm(bigg_sd, lf.OPENCLIP_PREFIX["sdxl"])


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_file_layout_builds_every_part_with_the_published_counts():
    """An SD1.5-shaped file (meta tensors) loads strictly: UNet 859,520,964 params, CLIP 123,060,480."""
    base = base_from_ldm(meta_ldm(sd15_ldm_shapes()) | meta_ldm({POSITION_IDS: [1, 77]}))
    assert base.family == "sd1" and base.tokenizer.pad_token == "<|endoftext|>"
    assert (n_params(base.unet), n_params(base.vae), n_params(base.text_encoder)) == (859520964, 83653863, 123060480)


def test_sdxl_file_layout_is_detected_and_loads_both_text_encoders():
    """SDXL keys (label_emb, conditioner.embedders.0/1) give an 'sdxl' base with CLIP-L and bigG."""
    sd = sdxl_meta_ldm()
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    base = base_from_ldm(sd)
    assert base.family == "sdxl" and base.tokenizer_2.pad_token == "!"
    assert (n_params(base.unet), n_params(base.text_encoder_2)) == (2567463684, 694659840)


def test_sd2_file_layout_loads_the_openclip_text_encoder():
    """An SD2.x file (1024-wide cross-attention, OpenCLIP ViT-H) gives an 'sd2' base padding with '!'."""
    config = family_config("sd2")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
        text = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    ldm_unet = lf.to_ldm(unet.state_dict(), lf.unet_names(unet.state_dict(), config["unet"]), lf.UNET_PREFIX)
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    vae = {k: v for k, v in meta_ldm(sd15_ldm_shapes()).items() if k.startswith(lf.VAE_PREFIX)}
    sd = ldm_unet | vae | lf.openclip_to_ldm(text_sd, lf.OPENCLIP_PREFIX["sd2"])
    sd["cond_stage_model.model.logit_scale"] = torch.empty((), device="meta")
    base = base_from_ldm(sd, prediction_type="v_prediction")
    assert base.family == "sd2" and base.tokenizer.pad_token == "!" and base.prediction_type == "v_prediction"
    assert n_params(base.unet) == 865910724


def test_ema_weights_are_taken_only_when_asked():
    """Non-EMA by default; ema=True reads model_ema.<path without dots> for every UNet tensor."""
    shapes = sd15_ldm_shapes()
    sd = meta_ldm(shapes, torch.bfloat16)
    sd |= {lf.ema_name(k): torch.empty(s, dtype=torch.float16, device="meta") for k, s in shapes.items()
           if k.startswith(lf.UNET_PREFIX)}
    assert base_from_ldm(sd, dtype=None).unet.dtype == torch.bfloat16
    ema = base_from_ldm(sd, ema=True, dtype=None)
    assert ema.unet.dtype == torch.float16 and ema.vae.dtype == torch.bfloat16


def test_ema_request_on_a_file_without_ema_is_refused():
    """ema=True on a pruned file says there is no EMA copy instead of loading the plain weights."""
    with pytest.raises(ValueError, match="no EMA copy"):
        base_from_ldm(meta_ldm(sd15_ldm_shapes()), ema=True)


def test_small_real_file_round_trips_values_through_safetensors_and_ckpt(tmp_path):
    """Values survive file -> load_base for .safetensors and memory-mapped .ckpt alike."""
    shapes = sd15_ldm_shapes()
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    vae_key = "first_stage_model.decoder.mid.attn_1.q.weight"
    sd = meta_ldm(shapes)
    for name in (key, vae_key):  # two real tensors are enough to check values; load_base needs all keys
        sd[name] = pattern(shapes[name], 1, torch.float32)
    ckpt = tmp_path / "small.ckpt"
    real = {k: v for k, v in sd.items() if not v.is_meta}
    torch.save({"state_dict": real}, ckpt)
    loaded = open_state_dict(ckpt)
    assert loaded.keys() == real.keys() and torch.equal(loaded[key], real[key])
    save_file(real, tmp_path / "small.safetensors")
    from_st = open_state_dict(tmp_path / "small.safetensors")
    base = base_from_ldm({**sd, **{k: from_st[k] for k in from_st}})
    assert torch.equal(base.unet.down_blocks[0].attentions[0].proj_in.weight, real[key])
    assert torch.equal(base.vae.decoder.mid_block.attentions[0].to_q.weight, real[vae_key][:, :, 0, 0])


def test_diffusers_folder_loads_offline(tmp_path):
    """A diffusers folder (unet/, vae/, text_encoder/) loads with local files only, weights unchanged."""
    from tiny_models import tiny_base
    for family in ("sd1", "sdxl"):
        base = tiny_base(family)
        for name, module in base.parts().items():
            module.save_pretrained(tmp_path / family / name)
        loaded = load_base(tmp_path / family)
        expected = "tiny" if family == "sd1" else "sdxl"
        assert loaded.family == expected
        assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), loaded.unet.state_dict().values()))


def test_files_that_are_not_sd_checkpoints_are_refused(tmp_path):
    """A missing file, an unknown suffix and a non-SD state dict each fail with a message saying so."""
    with pytest.raises(InputError, match="no such file"):
        load_base(tmp_path / "absent.ckpt")
    (tmp_path / "weights.onnx").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        load_base(tmp_path / "weights.onnx")
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a Stable Diffusion checkpoint"):
        load_base(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="diffusers folder needs"):
        load_base(tmp_path)


def test_file_with_tensors_its_family_lacks_is_refused_by_name():
    """A file whose UNet has tensors the detected config lacks fails naming them."""
    sd = meta_ldm(sd15_ldm_shapes())
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2816, device="meta")
    with pytest.raises(KeyError, match="label_emb"):
        base_from_ldm(sd)
