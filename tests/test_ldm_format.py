"""LDM <-> diffusers names and tensors: the SD1.5 keymap exactly, SD2/SDXL layouts, exact round trips."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tinylllite.files import ldm_format as lf
from tinylllite.errors import InputError
from tinylllite.files.identify import unet_family
from tinylllite.files.sd_loading import family_config

FIXTURES = Path(__file__).parent / "fixtures"
KEYMAP = json.loads((FIXTURES / "sd15_ldm_to_diffusers_keymap.json").read_text())


def meta_parts(family: str) -> dict:
    """Every part of a family built on the meta device: names and shapes, no memory."""
    config = family_config(family)
    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel(**config["unet"]), vae=AutoencoderKL(**config["vae"]),
                     controlnet=ControlNetModel(**lf.controlnet_config(config["unet"])))
        if family != "sd2":
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    return parts


def ldm_names(part: str, model, unet_config, vae_config) -> dict[str, str]:
    keys = model.state_dict().keys()
    return {"unet": lambda: lf.unet_names(keys, unet_config), "controlnet": lambda: lf.controlnet_names(keys, unet_config),
            "vae": lambda: lf.vae_names(keys, vae_config), "text_encoder": lambda: lf.clip_names(keys)}[part]()


@pytest.mark.parametrize("part", ["unet", "controlnet", "vae", "text_encoder"])
def test_sd15_names_and_shapes_equal_the_checked_keymap(part):
    """Every SD1.5 tensor gets the LDM name and shape of the real checkpoints (keymap fixture)."""
    prefix = {"unet": lf.UNET_PREFIX, "controlnet": lf.CONTROL_PREFIX, "vae": lf.VAE_PREFIX,
              "text_encoder": lf.CLIP_PREFIX["sd1"]}[part]
    config = family_config("sd1")
    model = meta_parts("sd1")[part]
    names = ldm_names(part, model, config["unet"], config["vae"])
    sd = {k: v for k, v in model.state_dict().items() if k in names}
    ldm = lf.to_ldm(sd, names, prefix, vae=part == "vae")
    got = {prefix + names[diff]: [diff, list(ldm[prefix + names[diff]].shape)] for diff in sd}
    expected = {key: [diff, ldm_shape] for key, (diff, ldm_shape, _) in KEYMAP[part].items()}
    assert got == expected


def test_vae_attention_weights_change_shape_but_not_values():
    """The VAE's middle attention is a 1x1 conv in LDM and a Linear in diffusers, same numbers."""
    names = {"encoder.mid_block.attentions.0.to_q.weight": "encoder.mid.attn_1.q.weight"}
    linear = {"encoder.mid_block.attentions.0.to_q.weight": torch.randn(4, 4)}
    ldm = lf.to_ldm(linear, names, lf.VAE_PREFIX, vae=True)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (4, 4, 1, 1)
    back = lf.from_ldm(ldm, names, lf.VAE_PREFIX)
    assert torch.equal(back["encoder.mid_block.attentions.0.to_q.weight"], linear["encoder.mid_block.attentions.0.to_q.weight"])


def test_sd21_unet_names_equal_the_reference_key_list():
    """The SD2.x config maps to the 686 keys and shapes of the released SD2.1 UNet."""
    config = family_config("sd2")["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    ldm = lf.to_ldm(unet.state_dict(), lf.unet_names(unet.state_dict(), config), lf.UNET_PREFIX)
    expected = json.loads((FIXTURES / "ldm_sd21_unet_keys.json").read_text())
    assert {k: list(t.shape) for k, t in ldm.items()} == expected


def test_sd21_control_names_equal_control_sd21_keys():
    """An SD2.x ControlNet gets exactly the `control_model.*` names and shapes of control_sd21_ini."""
    config = family_config("sd2")["unet"]
    with torch.device("meta"):
        control = ControlNetModel(**lf.controlnet_config(config))
    ldm = lf.to_ldm(control.state_dict(), lf.controlnet_names(control.state_dict(), config), lf.CONTROL_PREFIX)
    expected = json.loads((FIXTURES / "control_sd21_keys.json").read_text())
    assert {k: list(t.shape) for k, t in ldm.items()} == expected


def test_sdxl_attention_modules_get_kohyas_ldm_paths():
    """SDXL's UNet names agree with the 136 LDM paths of kohya's LLLite modules."""
    config = family_config("sdxl")["unet"]
    modules = json.loads((FIXTURES / "lllite_sdxl_modules.json").read_text())
    mapped = lf.unet_names([row["diffusers_path"] for row in modules], config)
    assert len(modules) == 136 and all(mapped[row["diffusers_path"]] == row["ldm_path"] for row in modules)


def test_unet_family_reads_the_cross_attention_width():
    """768 -> SD1, 1024 -> SD2, 2048 -> SDXL; anything else or no attention is refused."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert [unet_family({key: (320, w)}) for w in (768, 1024, 2048)] == ["sd1", "sd2", "sdxl"]
    with pytest.raises(InputError, match="width 512"):
        unet_family({key: (320, 512)})
    with pytest.raises(InputError, match="not a Stable Diffusion"):
        unet_family({"encoder.weight": (3, 3)})


def test_missing_and_unexpected_ldm_keys_are_named():
    """from_ldm names the first missing key, and refuses keys no diffusers name claims."""
    names = {"conv_in.weight": "input_blocks.0.0.weight"}
    with pytest.raises(KeyError, match="input_blocks.0.0.weight"):
        lf.from_ldm({}, names, lf.UNET_PREFIX)
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
          "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="label_emb"):
        lf.from_ldm(sd, names, lf.UNET_PREFIX)


@pytest.mark.parametrize("with_projection", [False, True])
def test_openclip_in_proj_round_trip_is_exact(with_projection):
    """OpenCLIP's joined q/k/v and transposed projection convert to transformers and back bit for bit."""
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                            projection_dim=16, hidden_act="gelu")
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    ldm = lf.openclip_to_ldm(sd, lf.OPENCLIP_PREFIX["sd2"])
    assert ldm["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (48, 16)
    back = lf.openclip_from_ldm(ldm, lf.OPENCLIP_PREFIX["sd2"], n_layers=2, with_projection=with_projection)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_openclip_with_more_layers_than_the_config_is_refused():
    """A text tower read with too few layers fails instead of silently dropping weights."""
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
    sd = {k: v for k, v in CLIPTextModel(config).state_dict().items() if not k.endswith("position_ids")}
    ldm = lf.openclip_to_ldm(sd, "p.")
    with pytest.raises(KeyError, match="resblocks.1"):
        lf.openclip_from_ldm(ldm, "p.", n_layers=1, with_projection=False)


@pytest.mark.parametrize("part", ["unet", "controlnet", "vae"])
def test_tiny_parts_round_trip_through_ldm_exactly(part):
    """diffusers -> LDM -> diffusers gives back every tensor unchanged."""
    from tiny_models import tiny_sd15_unet_config, tiny_unet, tiny_vae
    config = tiny_sd15_unet_config()
    model = {"unet": lambda: tiny_unet(config), "vae": lambda: tiny_vae(),
             "controlnet": lambda: ControlNetModel(**lf.controlnet_config(config))}[part]()
    sd = model.state_dict()
    names = ldm_names(part, model, config, model.config if part == "vae" else None)
    back = lf.from_ldm(lf.to_ldm(sd, names, "x.", vae=part == "vae"), names, "x.")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
