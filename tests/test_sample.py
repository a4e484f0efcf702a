"""sample(): the control knobs (strength, window, guess mode, LLLite multiplier), wildcards, PNG prompts, the command."""
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_base

import tinylllite.sample as sample_module
from tinylllite import controlnet
from tinylllite.controlnet import ControlNet, guess_mode_scales
from tinylllite.lllite_unet import attach_lllite
from tinylllite.sample import expand_wildcards, in_window, sample, synthesize_dataset

PROMPT = "red circle with blue background"
SIZE = 64  # 8x8 latents for the tiny VAE (factor 8)



@pytest.fixture(scope="module")
def base():
    return tiny_base()


@pytest.fixture(scope="module")
def hint():
    ring = np.zeros((SIZE, SIZE, 3), np.uint8)
    ring[16:48, 16] = ring[16:48, 47] = ring[16, 16:48] = ring[47, 16:48] = 255
    return ring


@pytest.fixture(scope="module")
def trained_like_controlnet(base):
    """A ControlNet whose zero convs are no longer zero, so control visibly changes the output."""
    torch.manual_seed(0)
    control = ControlNet.from_unet(base.unet)
    with torch.no_grad():
        for zero in [*control.controlnet_down_blocks, control.controlnet_mid_block]:
            zero.weight.normal_(std=0.5)
    return control.eval()


def test_strength_zero_gives_the_base_output(base, hint, trained_like_controlnet):
    """strength=0 samples exactly what the base alone samples; strength 1 differs."""
    plain = sample(base, [PROMPT], steps=2, height=SIZE, width=SIZE)
    off = sample(base, [PROMPT], trained_like_controlnet, hint, steps=2, strength=0.0)
    on = sample(base, [PROMPT], trained_like_controlnet, hint, steps=2, strength=1.0)
    assert np.array_equal(off, plain)
    assert not np.array_equal(on, plain)


def test_the_control_window_runs_the_branch_only_inside_it(base, hint, trained_like_controlnet, monkeypatch):
    """control_start 0.25, control_end 0.75 over 4 steps: the ControlNet runs at steps 1 and 2 only (x2 for CFG)."""
    calls = []
    forward = ControlNet.forward
    monkeypatch.setattr(ControlNet, "forward", lambda self, x, t, *a, **k: calls.append(int(t[0])) or forward(self, x, t, *a, **k))
    sample(base, [PROMPT], trained_like_controlnet, hint, steps=4, cfg=2.0, control_start=0.25, control_end=0.75)
    timesteps = sample_module.make_sampler(base)
    timesteps.set_timesteps(4)
    inside = [int(t) for t in timesteps.timesteps[1:3]]
    assert calls == [inside[0], inside[0], inside[1], inside[1]]
    assert [in_window(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]


def test_an_empty_window_gives_the_base_output(base, hint, trained_like_controlnet):
    """control_end=0 applies control at no step, so the image is the base's."""
    plain = sample(base, [PROMPT], steps=2, height=SIZE, width=SIZE)
    assert np.array_equal(sample(base, [PROMPT], trained_like_controlnet, hint, steps=2, control_end=0.0), plain)


def test_guess_mode_ramps_the_residuals_and_skips_the_unconditional_half(base, hint, trained_like_controlnet,
                                                                         monkeypatch):
    """Guess mode: one ControlNet call per step (conditional half only), scaled by logspace(-1, 0, 13)."""
    seen = []
    scaled = controlnet.ControlResiduals.scaled
    monkeypatch.setattr(controlnet.ControlResiduals, "scaled",
                        lambda self, scales=None, strength=1.0: seen.append(scales) or scaled(self, scales, strength))
    sample(base, [PROMPT], trained_like_controlnet, hint, steps=3, cfg=9.0, guess_mode=True)
    assert len(seen) == 3
    assert seen[0] == guess_mode_scales(trained_like_controlnet.num_residuals)
    assert seen[0][0] == pytest.approx(0.1) and seen[0][-1] == pytest.approx(1.0)


def test_lllite_multiplier_zero_gives_the_base_output_and_is_restored(hint):
    """An LLLite at multiplier 0 (or outside its window) samples the base image; its own multiplier is kept."""
    base = tiny_base()
    plain = sample(base, [PROMPT], steps=2, cfg=1.0, height=SIZE, width=SIZE)
    lllite = attach_lllite(base.unet)
    with torch.no_grad():
        for name, tensor in lllite.state_dict().items():
            if name.endswith("up.0.weight"):
                tensor.normal_(std=0.5)
    lllite.multiplier = 0.7
    assert np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0, lllite_multiplier=0.0), plain)
    assert np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0, control_start=1.0), plain)
    assert not np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0), plain)
    assert lllite.multiplier == 0.7 and lllite.enabled


def test_lllite_embeds_the_hint_once_per_sample_call_not_per_timestep(hint):
    """Sampling 3 steps with CFG runs the UNet 6 times but computes each module's hint embedding once."""
    base = tiny_base()
    lllite = attach_lllite(base.unet)
    module = next(iter(lllite.values()))
    embeddings = []
    module.conditioning1.register_forward_hook(lambda *_: embeddings.append(1))
    unet_calls = []
    base.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    sample(base, [PROMPT], lllite, hint, steps=3, cfg=2.0)
    assert len(unet_calls) == 6 and len(embeddings) == 1


def test_unipc_and_ddim_both_make_images_of_the_hint_size(base, hint, trained_like_controlnet):
    """Both samplers return uint8 (B, H, W, 3) at the hint's size; image i depends on seed + i only."""
    for sampler in ("ddim", "unipc"):
        pair = sample(base, [PROMPT, "x"], trained_like_controlnet, hint, steps=2, cfg=1.0, sampler=sampler, seed=5)
        single = sample(base, ["x"], trained_like_controlnet, hint, steps=2, cfg=1.0, sampler=sampler, seed=6)
        assert pair.shape == (2, SIZE, SIZE, 3) and pair.dtype == np.uint8
        assert np.abs(pair[1].astype(int) - single[0]).max() <= 2  # batch size changes only float rounding


def test_a_hint_outside_zero_one_is_refused(base, trained_like_controlnet):
    """A float hint in [-1, 1] is a mistake worth an error, not a silent rescale."""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample(base, [PROMPT], trained_like_controlnet, torch.full((1, 3, SIZE, SIZE), -1.0), steps=1)


def test_wildcards_expand_to_every_combination():
    """{a|b} groups multiply out in reading order."""
    assert expand_wildcards("{red|blue} circle with {white|black} background") == [
        "red circle with white background", "red circle with black background",
        "blue circle with white background", "blue circle with black background"]
    assert expand_wildcards("plain") == ["plain"]


def test_a_synthesized_dataset_stores_each_prompt_in_its_png(base, tmp_path):
    """N images per expanded prompt, each PNG carrying its prompt in the 'prompt' text chunk."""
    paths = synthesize_dataset(base, ["{red|blue} circle"], tmp_path, n_per_prompt=2, steps=1, cfg=1.0,
                               height=SIZE, width=SIZE)
    assert [Image.open(p).text["prompt"] for p in paths] == ["red circle"] * 2 + ["blue circle"] * 2


def test_the_command_writes_pngs(base, tmp_path, monkeypatch, hint):
    """python -m tinylllite.sample with a saved ControlNet and a hint writes one PNG per prompt."""
    from safetensors.torch import save_file

    monkeypatch.setattr(sample_module, "load_base_or_tiny", lambda path: base)
    control_file = tmp_path / "control.safetensors"
    save_file(ControlNet.from_unet(base.unet).state_dict(), control_file)
    Image.fromarray(hint).save(tmp_path / "hint.png")
    sample_module.main(["--control", str(control_file), "--hint", str(tmp_path / "hint.png"), "--prompt",
                        "{red|blue} circle", "--steps", "1", "--out", str(tmp_path / "out.png")])
    assert [Image.open(tmp_path / f"out_{i}.png").text["prompt"] for i in range(2)] == ["red circle", "blue circle"]


def test_the_image_log_writes_the_original_panels_and_metrics_plot(base, tmp_path, trained_like_controlnet):
    """control, reconstruction, conditioning, samples_cfg_scale_9.00 per log step; metrics.jsonl + metrics.png."""
    from tinylllite.fill50k import make_pair
    from tinylllite.image_log import MetricsLog, log_training_panels

    pairs = [make_pair(0, i, size=SIZE) for i in range(2)]
    items = [dict(jpg=p.target / 127.5 - 1, txt=p.prompt, hint=p.source / 255.0) for p in pairs]
    paths = log_training_panels(base, trained_like_controlnet, items, 300, tmp_path, steps=2)
    assert [p.name for p in paths] == ["control_gs-000300.png", "reconstruction_gs-000300.png",
                                       "conditioning_gs-000300.png", "samples_cfg_scale_9.00_gs-000300.png"]
    assert Image.open(paths[-1]).size == (2 * SIZE + 2, SIZE)
    metrics = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        metrics.write(step=step, loss=1.0 / step, lr=1e-5)
    assert metrics.plot().is_file()
    assert [e["step"] for e in MetricsLog(tmp_path, append=True, keep_until=2).events()] == [1, 2]
