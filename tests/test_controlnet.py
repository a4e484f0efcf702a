"""ControlNet (tinylllite/controlnet.py): no change at init, parity with diffusers, gradients, knobs, SD1.5 counts."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from tiny_models import TEXT_DIM, tiny_sd15_unet_config, tiny_sdxl_unet_config, tiny_unet

from tinylllite.controlnet import (
    ControlNet,
    ControlResiduals,
    controlled_unet_forward,
    encoder_skip_channels,
    guess_mode_scales,
    set_trainable,
)
from tinylllite.sd.naming import diffusers_to_ldm

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = {"sd1": tiny_sd15_unet_config, "sdxl": tiny_sdxl_unet_config}


def make_inputs(config: dict, batch: int = 2, seed: int = 1) -> dict:
    """Noisy latent (B, 4, 8, 8), timestep, text (B, 77, D), hint (B, 3, 64, 64) and SDXL's added conditions."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor(437),
        encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
        hint=torch.rand(batch, 3, 64, 64, generator=g),
        added_cond_kwargs=None,
    )
    if config.get("addition_embed_type") == "text_time":
        time_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]).repeat(batch, 1)  # (B, 6)
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, TEXT_DIM, generator=g), time_ids=time_ids)
    return inputs


def run_unet(unet, control, inputs, **kwargs) -> torch.Tensor:
    """The controlled UNet output, or the plain one when `control` is None."""
    unet_args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    residuals = None if control is None else control(*unet_args, inputs["hint"], inputs["added_cond_kwargs"])
    return controlled_unet_forward(unet, *unet_args, residuals, added_cond_kwargs=inputs["added_cond_kwargs"], **kwargs)


def randomize_(module: torch.nn.Module, seed: int = 2) -> None:
    """Move every parameter off its initial value, zero convs included (they then output non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def nonzero_grad_names(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("family", CONFIGS)
def test_untrained_controlnet_leaves_unet_output_bit_identical(family):
    """Zero convs and the zero hint conv make a fresh ControlNet add exactly nothing (torch.equal)."""
    config = CONFIGS[family]()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    inputs = make_inputs(config)

    with torch.no_grad():
        plain, controlled = run_unet(unet, None, inputs), run_unet(unet, control, inputs)

    assert torch.equal(plain, controlled)


@pytest.mark.parametrize("family", CONFIGS)
def test_controlnet_state_dict_equals_diffusers_controlnet_model_keys_and_shapes(family):
    """Same keys in the same order with the same shapes as diffusers' ControlNetModel.from_unet."""
    unet = tiny_unet(CONFIGS[family]())

    ours, reference = ControlNet.from_unet(unet).state_dict(), ControlNetModel.from_unet(unet).state_dict()

    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in reference.items()]


@pytest.mark.parametrize("family", CONFIGS)
def test_controlnet_residuals_match_diffusers_controlnet_model_for_the_same_weights(family):
    """Random weights (zero convs too) loaded into diffusers' ControlNetModel give every residual within 1e-5."""
    config = CONFIGS[family]()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    randomize_(control)
    reference = ControlNetModel.from_unet(unet)
    reference.load_state_dict(control.state_dict())
    inputs = make_inputs(config)
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["hint"])

    with torch.no_grad():
        ours = control(*args, inputs["added_cond_kwargs"])
        theirs = reference(*args, added_cond_kwargs=inputs["added_cond_kwargs"])
        ours_guess = ours.scaled(guess_mode_scales(len(ours)), strength=0.7)
        theirs_guess = reference(*args, conditioning_scale=0.7, added_cond_kwargs=inputs["added_cond_kwargs"],
                                 guess_mode=True)

    assert len(ours.down) == len(theirs.down_block_res_samples) == len(encoder_skip_channels(unet))
    for mine, other in ((ours, theirs), (ours_guess, theirs_guess)):
        for a, b in zip((*mine.down, mine.mid), (*other.down_block_res_samples, other.mid_block_res_sample)):
            assert a.abs().max() > 0
            assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("family", CONFIGS)
def test_gradient_reaches_zero_convs_then_the_copy_then_the_hint_encoder(family):
    """AdamW: step 0 only the zero convs; after update 1 all but the hint's inner convs; after update 2 all."""
    config = CONFIGS[family]()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    optimizer = torch.optim.AdamW(set_trainable(unet, control), lr=1e-3)
    inputs = make_inputs(config)
    target = torch.randn_like(inputs["sample"])
    names = {name for name, _ in control.named_parameters()}
    zero_convs = {n for n in names if n.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))}
    hint_inner = {n for n in names if n.startswith(("controlnet_cond_embedding.conv_in.",
                                                    "controlnet_cond_embedding.blocks."))}

    reached = []
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(run_unet(unet, control, inputs), target).backward()
        reached.append(nonzero_grad_names(control))
        optimizer.step()

    assert reached[0] == zero_convs  # the hint's conv_out too is still cut off by the zero convs behind it
    assert reached[1] == names - hint_inner  # includes controlnet_cond_embedding.conv_out
    assert reached[2] == names
    assert all(p.grad is None for p in unet.parameters())  # the locked UNet gets none


def test_from_unet_returns_a_trainable_copy_even_of_a_frozen_unet():
    """Like diffusers' ControlNetModel.from_unet: every ControlNet parameter requires grad, the UNet stays frozen."""
    unet = tiny_unet().requires_grad_(False)

    control = ControlNet.from_unet(unet)

    assert all(p.requires_grad for p in control.parameters())
    assert not any(p.requires_grad for p in unet.parameters())


def test_sd_unlocked_trains_exactly_the_unet_decoder():
    """sd_locked=False adds up_blocks, conv_norm_out and conv_out; the rest of the UNet stays frozen, grad None."""
    config = tiny_sd15_unet_config()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    decoder = {n for n, _ in unet.named_parameters() if n.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))}

    trainable = set_trainable(unet, control, sd_locked=False)
    run_unet(unet, control, make_inputs(config)).square().mean().backward()

    assert {n for n, p in unet.named_parameters() if p.requires_grad} == decoder
    assert len(trainable) == len(list(control.parameters())) + len(decoder)
    assert {n for n, p in unet.named_parameters() if p.grad is not None} == decoder
    assert set_trainable(unet, control, sd_locked=True) == list(control.parameters())
    assert not any(p.requires_grad for p in unet.parameters())


def test_only_mid_control_applies_the_middle_residual_and_zero_skips():
    """only_mid_control equals running with the skip residuals zeroed: it differs from plain and from full control."""
    config = tiny_sd15_unet_config()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    randomize_(control)
    inputs = make_inputs(config)
    unet_args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

    with torch.no_grad():
        residuals = control(*unet_args, inputs["hint"])
        mid_only = controlled_unet_forward(unet, *unet_args, residuals, only_mid_control=True)
        zero_skips = ControlResiduals(tuple(torch.zeros_like(r) for r in residuals.down), residuals.mid)
        by_hand = controlled_unet_forward(unet, *unet_args, zero_skips)
        plain = controlled_unet_forward(unet, *unet_args, None)
        full = controlled_unet_forward(unet, *unet_args, residuals)

    assert torch.equal(mid_only, by_hand)
    assert not torch.allclose(mid_only, plain)
    assert not torch.allclose(mid_only, full)


def test_strength_zero_gives_the_plain_unet_output():
    """A trained-looking ControlNet scaled by strength 0 leaves the UNet output unchanged."""
    config = tiny_sd15_unet_config()
    unet = tiny_unet(config)
    control = ControlNet.from_unet(unet)
    randomize_(control)
    inputs = make_inputs(config)
    unet_args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])

    with torch.no_grad():
        residuals = control(*unet_args, inputs["hint"])
        off = controlled_unet_forward(unet, *unet_args, residuals.scaled(strength=0.0))
        on = controlled_unet_forward(unet, *unet_args, residuals)
        plain = controlled_unet_forward(unet, *unet_args, None)

    assert torch.equal(off, plain)
    assert not torch.allclose(on, plain)


def test_per_residual_scales_need_one_value_per_residual():
    """SD1.5's layout gives 13 residuals; 13 scales multiply them one by one, 12 scales raise."""
    config = tiny_sd15_unet_config()
    control = ControlNet.from_unet(tiny_unet(config))
    randomize_(control)
    inputs = make_inputs(config)
    with torch.no_grad():
        residuals = control(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["hint"])
    scales = [0.5 + i / 10 for i in range(13)]

    scaled = residuals.scaled(scales, strength=2.0)

    assert control.num_residuals == len(residuals) == 13
    assert torch.equal(scaled.down[3], residuals.down[3] * (scales[3] * 2.0))
    assert torch.equal(scaled.mid, residuals.mid * (scales[12] * 2.0))
    with pytest.raises(ValueError, match="12 control scales for 13 residuals"):
        residuals.scaled(scales[:12])


def test_guess_mode_ramp_and_unconditional_half():
    """Guess mode: diffusers' logspace ramp (within 9.4e-4 of 0.825**(12-i)); the uncond CFG half gets zeros."""
    scales = guess_mode_scales(13)
    original = [0.825 ** (12 - i) for i in range(13)]
    residuals = ControlResiduals((torch.ones(1, 2, 4, 4),), torch.ones(1, 3, 2, 2))

    padded = residuals.with_zero_unconditional()

    assert scales[0] == pytest.approx(0.1) and scales[-1] == pytest.approx(1.0)
    assert max(abs(a - b) for a, b in zip(scales, original)) < 9.5e-4
    assert padded.down[0].shape == (2, 2, 4, 4) and padded.mid.shape == (2, 3, 2, 2)
    assert torch.equal(padded.down[0][0], torch.zeros(2, 4, 4)) and torch.equal(padded.mid[1], torch.ones(3, 2, 2))


def test_hint_off_the_latent_grid_raises_a_clear_error():
    """A valid hint whose size is not the latent size times the VAE factor is refused, naming both sizes."""
    config = tiny_sd15_unet_config()
    control = ControlNet.from_unet(tiny_unet(config))
    inputs = make_inputs(config)

    with pytest.raises(ValueError, match="latent size times the VAE factor 8"):
        control(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], torch.rand(2, 3, 32, 32))


SD21_CHANGES = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)


def unet_on_meta(family: str) -> UNet2DConditionModel:
    """The real SD1.5 (or SD2.1) UNet, shapes only (meta device: no memory, no weights)."""
    config = json.loads((FIXTURES / "sd15_component_configs.json").read_text())["unet"]
    config.update(SD21_CHANGES if family == "sd21" else {})
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family, unet_params, control_params", [("sd15", 859_520_964, 361_279_120),
                                                                  ("sd21", 865_910_724, 364_228_240)],
                         ids=["sd15", "sd21"])
def test_controlnet_parameter_counts_match_the_original(family, unet_params, control_params):
    """SD1.5 and SD2.1: UNet and ControlNet sizes of the released checkpoints, 340 ControlNet tensors."""
    unet = unet_on_meta(family)
    control = ControlNet.from_unet(unet)

    assert count(unet) == unet_params and len(unet.state_dict()) == 686
    assert count(control) == control_params and len(control.state_dict()) == 340


def test_sd15_controlnet_new_layers_and_residual_channels_match_the_original():
    """SD1.5: 12,566,160 new params (hint 1,086,480; 12 zero convs 9,840,000; middle 1,639,680), 13 residuals."""
    unet = unet_on_meta("sd15")
    control = ControlNet.from_unet(unet)

    assert count(control.controlnet_cond_embedding) == 1_086_480
    assert count(control.controlnet_down_blocks) == 9_840_000
    assert count(control.controlnet_mid_block) == 1_639_680
    residual_channels = encoder_skip_channels(unet) + [control.controlnet_mid_block.out_channels]
    assert residual_channels == [320] * 4 + [640] * 3 + [1280] * 5 + [1280]


def ldm_control_name(key: str, unet_config, hint_blocks: int) -> str:
    """Our (= diffusers') ControlNet key -> the original `control_model.` key (cldm.py's module names)."""
    if key.startswith("controlnet_down_blocks."):
        index, param = key.split(".")[1:]
        return f"zero_convs.{index}.0.{param}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key.split(".")[-1]
    if key.startswith("controlnet_cond_embedding."):
        part, param = key.removeprefix("controlnet_cond_embedding.").rsplit(".", 1)
        # the original's Sequential interleaves SiLUs: conv_in, SiLU, blocks.0, SiLU, ..., conv_out
        if part == "conv_in":
            return f"input_hint_block.0.{param}"
        if part == "conv_out":
            return f"input_hint_block.{2 * (hint_blocks + 1)}.{param}"
        return f"input_hint_block.{2 * (int(part.removeprefix('blocks.')) + 1)}.{param}"
    return diffusers_to_ldm(key, unet_config)


def test_sd15_controlnet_keys_equal_the_diffusers_key_list():
    """Keys and shapes equal diffusers' SD1.5 ControlNet key list exactly."""
    ours = {k: list(v.shape) for k, v in ControlNet.from_unet(unet_on_meta("sd15")).state_dict().items()}

    assert ours == json.loads((FIXTURES / "diffusers_controlnet_sd15_keys.json").read_text())


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_controlnet_keys_map_one_to_one_onto_the_original_checkpoint(family):
    """Renamed the LDM way, keys and shapes equal those of control_sd15_ini / control_sd21_ini."""
    unet = unet_on_meta(family)
    control = ControlNet.from_unet(unet)
    hint_blocks = len(control.controlnet_cond_embedding.blocks)

    as_ldm = {"control_model." + ldm_control_name(k, unet.config, hint_blocks): list(v.shape)
              for k, v in control.state_dict().items()}

    assert as_ldm == json.loads((FIXTURES / f"control_{family}_keys.json").read_text())
