"""LLLite on a diffusers UNet (tinylllite/lllite_unet.py): identity, switches, depths, kohya keys, training."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from tiny_models import tiny_sd15_unet_config, tiny_sdxl_unet_config, tiny_unet

from tinylllite.files.control_io import save_lllite
from tinylllite.lllite import image_reduction
from tinylllite.lllite_unet import (LLLiteLinear, attach_lllite, attach_lllite_from_kohya, attention_blocks,
                                    detach_lllite, set_trainable, unet_base_state_dict)

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUT = json.loads((FIXTURES / "lllite_attention_layout.json").read_text())
TINY_CONFIGS = {"sd1": tiny_sd15_unet_config, "sdxl": tiny_sdxl_unet_config}


def sd15_config() -> dict:
    config = json.loads((FIXTURES / "sd15_component_configs.json").read_text())["unet"]
    return {k: v for k, v in config.items() if not k.startswith("_")}


def sd21_config() -> dict:
    return {**sd15_config(), "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
            "use_linear_projection": True, "sample_size": 96}


def sdxl_config() -> dict:
    return dict(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)


def meta_unet(config: dict) -> UNet2DConditionModel:
    """A full-size UNet with no memory behind it: shapes and structure only."""
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def unet_inputs(config: dict, batch: int = 2, seed: int = 1) -> dict:
    """Latents (8×8, i.e. a 64×64 image), timesteps, text and (SDXL) added conditioning."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.arange(batch) * 300 + 1,
                  encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g))
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, pooled, generator=g),
                                           time_ids=torch.randn(batch, 6, generator=g))
    return inputs


def randomise_up(lllite, seed: int = 2):
    """Give every module a non-zero `up` so LLLite visibly changes the output."""
    torch.manual_seed(seed)
    for module in lllite.values():
        torch.nn.init.normal_(module.up[0].weight, std=0.1)
        torch.nn.init.normal_(module.up[0].bias, std=0.1)


def record_tokens(seen: dict, name: str, layer, args):
    """Forward pre-hook: how many tokens the wrapped layer's input (B, T, in) has."""
    seen[name] = args[0].shape[1]


def run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_untrained_lllite_leaves_the_unet_output_bit_identical(family):
    """A freshly attached LLLite (all blocks) changes no bit of the UNet's output."""
    config = TINY_CONFIGS[family]()
    unet, inputs = tiny_unet(config), unet_inputs(config)
    plain = run(unet, inputs)
    lllite = attach_lllite(unet, blocks={"input", "middle", "output"})
    with lllite.conditioned(torch.rand(2, 3, 64, 64)):
        assert torch.equal(run(unet, inputs), plain)


def test_multiplier_zero_or_disabled_gives_the_plain_unet():
    """With trained-looking weights, multiplier 0 or enabled=False is exactly the plain UNet."""
    config = tiny_sdxl_unet_config()
    unet, inputs = tiny_unet(config), unet_inputs(config)
    plain = run(unet, inputs)
    lllite = attach_lllite(unet)
    randomise_up(lllite)
    with lllite.conditioned(torch.rand(2, 3, 64, 64)):
        assert not torch.equal(run(unet, inputs), plain)
        lllite.multiplier = 0.0
        assert torch.equal(run(unet, inputs), plain)
    lllite.multiplier, lllite.enabled = 1.0, False
    assert torch.equal(run(unet, inputs), plain)  # no conditioning needed when off


def test_modules_may_keep_a_wider_dtype_than_the_unet():
    """float64 LLLite modules on a float32 UNet run, add Δ in float32, and are an identity at init."""
    config = tiny_sd15_unet_config()
    unet, inputs = tiny_unet(config), unet_inputs(config)
    plain = run(unet, inputs)
    lllite = attach_lllite(unet, dtype=torch.float64)
    with lllite.conditioned(torch.rand(2, 3, 64, 64)):
        assert lllite[next(iter(lllite))].embedding.dtype == torch.float64
        assert torch.equal(run(unet, inputs), plain)
        randomise_up(lllite)
        assert run(unet, inputs).dtype == torch.float32


def test_running_without_conditioning_raises_a_clear_error():
    """An attached, enabled LLLite with no conditioning image tells you to call set_conditioning."""
    config = tiny_sd15_unet_config()
    unet = tiny_unet(config)
    attach_lllite(unet)
    with pytest.raises(RuntimeError, match="set_conditioning"):
        run(unet, unet_inputs(config))


def test_attaching_keeps_the_unets_own_keys_and_detaching_restores_plain_linears():
    """Base keys and tensors are unchanged beside the `.lllite.` children; detach gives nn.Linear back."""
    unet = tiny_unet(tiny_sdxl_unet_config())
    before = unet.state_dict()
    lllite = attach_lllite(unet)
    base = unet_base_state_dict(unet)
    assert list(base) == list(before) and all(torch.equal(base[k], before[k]) for k in before)
    extra = set(unet.state_dict()) - set(before)
    assert len(extra) == len(lllite.state_dict()) and all(".lllite." in k for k in extra)
    assert detach_lllite(unet) == len(lllite)
    assert not any(isinstance(m, LLLiteLinear) for m in unet.modules())
    assert unet.state_dict().keys() == before.keys()


@pytest.mark.parametrize("name, config", [("sd15", sd15_config), ("sd21", sd21_config), ("sdxl", sdxl_config)])
def test_lllite_depth_of_every_attention_block_matches_its_token_grid(name, config):
    """Walking the real UNet gives each block's factor, LDM name and a depth whose grid is its token grid."""
    lllite = attach_lllite(meta_unet(config()), blocks={"input", "middle", "output"})
    depths = {}
    for kohya, path in lllite.diffusers_paths.items():
        depths.setdefault(path.split(".transformer_blocks")[0], set()).add(lllite[kohya].depth)
    native = LAYOUT[name]["native_image_px"]
    for block in LAYOUT[name]["blocks"]:
        (depth,) = depths.pop(block["diffusers"])
        assert depth == block["matching_depth"], block["diffusers"]
        assert [native // image_reduction(depth)] * 2 == block["tokens_hw_at_native"]
    assert depths == {}


def test_tiny_unet_layers_see_exactly_their_modules_token_grid():
    """During a real forward, every wrapped layer's token count equals its embedding's, at every depth."""
    config = tiny_sd15_unet_config()
    unet, inputs = tiny_unet(config), unet_inputs(config)
    lllite = attach_lllite(unet, blocks={"input", "middle", "output"})
    seen = {}
    for name, path in lllite.diffusers_paths.items():
        unet.get_submodule(path).register_forward_pre_hook(partial(record_tokens, seen, name))
    with lllite.conditioned(torch.rand(2, 3, 64, 64)):
        run(unet, inputs)
        grids = {name: module.embedding.shape[1] for name, module in lllite.items()}
    assert seen == grids and {m.depth for m in lllite.values()} == {1, 2, 3, 4}
    assert [b.factor for b in attention_blocks(unet)] == [8, 8, 16, 16, 32, 32, 64] + [32] * 3 + [16] * 3 + [8] * 3


def test_sdxl_at_c32_m64_matches_kohyas_released_key_set():
    """SDXL default blocks: 136 modules, 1600 tensors, 22,969,600 params, kohya's keys and shapes exactly."""
    lllite = attach_lllite(meta_unet(sdxl_config()), cond_emb_dim=32, mlp_dim=64)
    expected = json.loads((FIXTURES / "lllite_sdxl_keys.json").read_text())
    state = lllite.kohya_state_dict()
    assert (len(lllite), len(state), sum(p.numel() for p in lllite.parameters())) == (136, 1600, 22_969_600)
    assert {k: list(v.shape) for k, v in state.items()} == expected
    modules = json.loads((FIXTURES / "lllite_sdxl_modules.json").read_text())
    assert {m["kohya_module"]: (m["diffusers_path"], m["depth"]) for m in modules} == {
        name: (lllite.diffusers_paths[name], module.depth) for name, module in lllite.items()}


def test_sd15_default_is_input_blocks_only_named_by_the_same_rule():
    """SD1.5 default: 24 input-block modules, 2,612,992 params, each named after a real LDM Linear."""
    config = sd15_config()
    lllite = attach_lllite(meta_unet(config), cond_emb_dim=32, mlp_dim=64)
    assert (len(lllite), sum(p.numel() for p in lllite.parameters())) == (24, 2_612_992)
    ldm_keys = json.loads((FIXTURES / "ldm_sd15_unet_keys.json").read_text())
    for name in lllite:
        assert name.startswith("lllite_unet_input_blocks_")
        ldm = next(k for k in ldm_keys if k.endswith(".weight") and
                   "lllite_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_") == name)
        assert ldm_keys[ldm][1] == lllite[name].in_features
    assert "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in lllite


def test_kohya_file_round_trip_gives_identical_outputs(tmp_path):
    """save_lllite -> load_file -> attach_lllite_from_kohya on a fresh UNet reproduces the output exactly."""
    config = tiny_sdxl_unet_config()
    unet, inputs, image = tiny_unet(config), unet_inputs(config), torch.rand(2, 3, 64, 64)
    lllite = attach_lllite(unet, cond_emb_dim=8, mlp_dim=16, blocks={"input", "output"})
    randomise_up(lllite)
    with lllite.conditioned(image):
        expected = run(unet, inputs)
    save_lllite(lllite, unet, tmp_path / "lllite.safetensors")

    fresh_unet = tiny_unet(config)
    loaded = attach_lllite_from_kohya(fresh_unet, load_file(tmp_path / "lllite.safetensors"))
    assert loaded.describe() == lllite.describe() and set(loaded) == set(lllite)
    with loaded.conditioned(image):
        assert torch.equal(run(fresh_unet, inputs), expected)


def test_loading_a_mismatched_file_fails_naming_the_key():
    """Wrong shape, missing and unexpected keys each raise an error that names the key."""
    lllite = attach_lllite(tiny_unet(tiny_sdxl_unet_config()), cond_emb_dim=8, mlp_dim=16)
    good = lllite.kohya_state_dict()
    key = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight"
    with pytest.raises(ValueError, match=rf"shape mismatches.*{key}: file \(8, 64\), expected \(16, 64\)"):
        lllite.load_kohya_state_dict({**good, key: torch.zeros(8, 64)})
    with pytest.raises(ValueError, match=rf"missing keys.*{key}"):
        lllite.load_kohya_state_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="unexpected keys.*lllite_unet_extra.down.0.weight"):
        lllite.load_kohya_state_dict({**good, "lllite_unet_extra.down.0.weight": torch.zeros(1)})


def test_a_file_for_another_base_is_refused_and_the_unet_left_plain():
    """SDXL weights on an SD1-shaped UNet: its middle block needs depth 4, not the file's 3; UNet left plain."""
    sdxl = attach_lllite(tiny_unet(tiny_sdxl_unet_config()), cond_emb_dim=8, mlp_dim=16)
    unet = tiny_unet(tiny_sd15_unet_config())
    message = r"middle_block_1_transformer_blocks_0_attn1_to_q: the file has depth 3 but .*\(depth 4\)"
    with pytest.raises(ValueError, match=message):
        attach_lllite_from_kohya(unet, sdxl.kohya_state_dict())
    assert not any(isinstance(m, LLLiteLinear) for m in unet.modules())


@pytest.mark.parametrize("k", [2, 3])
def test_cfg_batches_reuse_the_conditioning_per_copy(k):
    """A UNet batch k times the conditioning batch equals k separate conditioned runs."""
    config = tiny_sdxl_unet_config()
    unet = tiny_unet(config)
    lllite = attach_lllite(unet)
    randomise_up(lllite)
    single, image = unet_inputs(config, batch=2), torch.rand(2, 3, 64, 64)
    tiled = {k_: (v.repeat(k, *[1] * (v.ndim - 1)) if torch.is_tensor(v) else
                  {n: t.repeat(k, 1) for n, t in v.items()}) for k_, v in single.items()}
    with lllite.conditioned(image):
        torch.testing.assert_close(run(unet, tiled), run(unet, single).repeat(k, 1, 1, 1), rtol=0, atol=1e-5)


def test_cfg_batch_of_one_and_a_half_times_raises():
    """3 latents for 2 conditioning images is refused, not silently broadcast."""
    config = tiny_sdxl_unet_config()
    unet = tiny_unet(config)
    lllite = attach_lllite(unet)
    with lllite.conditioned(torch.rand(2, 3, 64, 64)), pytest.raises(ValueError, match="not a multiple"):
        run(unet, unet_inputs(config, batch=3))


def test_only_lllite_parameters_receive_gradients():
    """After set_trainable, the base UNet gets no gradient; up at step 0, then every LLLite tensor."""
    config = tiny_sdxl_unet_config()
    unet, inputs = tiny_unet(config), unet_inputs(config)
    lllite = attach_lllite(unet)
    params = set_trainable(unet, lllite)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    image = torch.rand(2, 3, 64, 64)
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        lllite.set_conditioning(image)  # per step: gradients reach conditioning1
        unet(**inputs).sample.square().mean().backward()
        grads = {name: p.grad for name, p in lllite.named_parameters()}
        assert all(g is not None for g in grads.values())
        nonzero = {name for name, g in grads.items() if g.abs().sum() > 0}
        expected = {n for n in grads if ".up." in n} if step == 0 else set(grads)
        assert nonzero == expected, f"step {step}"
        optimizer.step()
    lllite_ids = {id(p) for p in params}
    assert all(p.grad is None for p in unet.parameters() if id(p) not in lllite_ids)


def test_attaching_twice_and_unknown_block_names_are_refused():
    """A second attach and blocks outside input/middle/output raise with what to do."""
    unet = tiny_unet(tiny_sd15_unet_config())
    with pytest.raises(ValueError, match="subset of"):
        attach_lllite(unet, blocks={"encoder"})
    attach_lllite(unet)
    with pytest.raises(ValueError, match="detach_lllite"):
        attach_lllite(unet)
