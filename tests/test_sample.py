"""sample(): the control knobs (strength, window, guess mode, LLLite multiplier), wildcards, PNG prompts, the command."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import diffusers_pipeline, tiny_base

import tinylllite.sample as sample_module
from tinylllite import controlnet
from tinylllite.controlnet import ControlNet, guess_mode_scales
from tinylllite.errors import InputError
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
    """control_start 0.25, control_end 0.75 over 4 steps: the ControlNet runs at steps 1 and 2 only, once per step
    on both CFG halves together."""
    calls = []
    forward = ControlNet.forward
    monkeypatch.setattr(ControlNet, "forward",
                        lambda self, x, t, *a, **k: calls.append((int(t[0]), len(x))) or forward(self, x, t, *a, **k))
    sample(base, [PROMPT], trained_like_controlnet, hint, steps=4, cfg=2.0, control_start=0.25, control_end=0.75)
    timesteps = sample_module.make_sampler(base)
    timesteps.set_timesteps(4)
    inside = [int(t) for t in timesteps.timesteps[1:3]]
    assert calls == [(inside[0], 2), (inside[1], 2)]
    assert [in_window(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.75, 0.25), (-0.1, 1.0), (0.0, 1.5), (0.6, 0.9)])
def test_a_control_window_that_holds_no_step_is_refused(base, hint, trained_like_controlnet, window):
    """An empty, reversed or out-of-range window (or one between two steps) would silently sample without control."""
    with pytest.raises(InputError, match="control window"):
        sample(base, [PROMPT], trained_like_controlnet, hint, steps=2, control_start=window[0], control_end=window[1])


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
    """An LLLite at multiplier 0 (or strength 0) samples the base image; its own multiplier is kept."""
    base = tiny_base()
    plain = sample(base, [PROMPT], steps=2, cfg=1.0, height=SIZE, width=SIZE)
    lllite = attach_lllite(base.unet)
    with torch.no_grad():
        for name, tensor in lllite.state_dict().items():
            if name.endswith("up.0.weight"):
                tensor.normal_(std=0.5)
    lllite.multiplier = 0.7
    assert np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0, lllite_multiplier=0.0), plain)
    assert np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0, strength=0.0), plain)
    assert not np.array_equal(sample(base, [PROMPT], lllite, hint, steps=2, cfg=1.0), plain)
    assert lllite.multiplier == 0.7 and lllite.enabled


def test_lllite_embeds_the_hint_once_per_sample_call_not_per_timestep(hint):
    """Sampling 3 steps with CFG runs the UNet 3 times (both halves batched) and embeds the hint once."""
    base = tiny_base()
    lllite = attach_lllite(base.unet)
    module = next(iter(lllite.values()))
    embeddings = []
    module.conditioning1.register_forward_hook(lambda *_: embeddings.append(1))
    unet_calls = []
    base.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    sample(base, [PROMPT], lllite, hint, steps=3, cfg=2.0)
    assert len(unet_calls) == 3 and len(embeddings) == 1


def test_unipc_and_ddim_both_make_images_of_the_hint_size(base, hint, trained_like_controlnet):
    """Both samplers return uint8 (B, H, W, 3) at the hint's size; image i depends on seed + i only."""
    for sampler in ("ddim", "unipc"):
        pair = sample(base, [PROMPT, "x"], trained_like_controlnet, hint, steps=2, cfg=1.0, sampler=sampler, seed=5)
        single = sample(base, ["x"], trained_like_controlnet, hint, steps=2, cfg=1.0, sampler=sampler, seed=6)
        assert pair.shape == (2, SIZE, SIZE, 3) and pair.dtype == np.uint8
        assert np.abs(pair[1].astype(int) - single[0]).max() <= 2  # batch size changes only float rounding


@pytest.fixture(scope="module")
def hint_reading_controlnet(trained_like_controlnet):
    """trained_like_controlnet with a hint encoder whose output depends visibly on the hint (at random
    initialisation it barely does, and its last conv is zero)."""
    control = copy.deepcopy(trained_like_controlnet)
    with torch.no_grad():
        for conv in control.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(std=0.2)
    return control


@pytest.mark.parametrize("hints", ["uint8 arrays", "a permuted float tensor"])
@pytest.mark.parametrize("knobs", [dict(), dict(cfg=1.0), dict(guess_mode=True),
                                   dict(strength=0.8, control_start=0.25, control_end=0.75)],
                         ids=["cfg", "cfg-1", "guess-mode", "window"])
def test_sampling_matches_diffusers_controlnet_pipeline(base, hint, hint_reading_controlnet, knobs, hints):
    """Same weights, DDIM, CFG, seeds and knobs as StableDiffusionControlNetPipeline: the same images, to the last bit,
    whether the hints come as uint8 arrays or as a permuted float tensor (made contiguous, as the pipeline does)."""
    pipe = diffusers_pipeline(base, hint_reading_controlnet)
    images = np.stack([hint, np.roll(hint, 12, axis=1)])  # (2, H, W, 3)
    permuted = torch.from_numpy(images).permute(0, 3, 1, 2) / 255  # (2, 3, H, W), strides of (2, H, W, 3)
    prompts = [PROMPT, "blue circle with red background"]
    knobs = dict(knobs)
    cfg = knobs.pop("cfg", 9.0)
    ours = sample(base, prompts, hint_reading_controlnet, images if hints == "uint8 arrays" else permuted, steps=4,
                  cfg=cfg, seed=3, **knobs)
    theirs = pipe(prompts, image=permuted.contiguous(), num_inference_steps=4, guidance_scale=cfg, eta=0.0,
                  output_type="np", generator=[torch.Generator().manual_seed(3 + i) for i in range(2)], height=SIZE,
                  width=SIZE, controlnet_conditioning_scale=knobs.get("strength", 1.0),
                  guess_mode=knobs.get("guess_mode", False), control_guidance_start=knobs.get("control_start", 0.0),
                  control_guidance_end=knobs.get("control_end", 1.0)).images
    theirs = np.round(theirs * 255).astype(np.uint8)
    differ = ours != theirs
    assert not differ.any(), f"{differ.any(axis=-1).sum()} pixels differ, by up to " \
                             f"{np.abs(ours.astype(int) - theirs).max()} levels"
    assert not np.array_equal(ours[0], ours[1])


def test_lllite_pairs_each_hint_with_its_own_prompt_in_both_cfg_halves(hint):
    """Two prompts with two hints in one guided batch give the images each pair gives alone (rounding aside)."""
    base = tiny_base()
    lllite = attach_lllite(base.unet)
    with torch.no_grad():
        for name, tensor in lllite.state_dict().items():
            if name.endswith("up.0.weight"):
                tensor.normal_(std=0.5)
    hints = np.stack([hint, np.roll(hint, 12, axis=1)])
    both = sample(base, [PROMPT, "x"], lllite, hints, steps=2, cfg=9.0, seed=1)
    first = sample(base, [PROMPT], lllite, hints[:1], steps=2, cfg=9.0, seed=1)
    second = sample(base, ["x"], lllite, hints[1:], steps=2, cfg=9.0, seed=2)
    assert np.abs(both.astype(int) - np.concatenate([first, second])).max() <= 2


def test_guided_and_guess_mode_sampling_run_on_sdxl():
    """SDXL's extra conditioning (pooled text, time ids) is split into the CFG halves correctly."""
    base = tiny_base("sdxl")
    control = ControlNet.from_unet(base.unet).eval()
    hint = torch.rand(1, 3, SIZE, SIZE)
    for guess_mode in (False, True):
        images = sample(base, [PROMPT, "x"], control, hint, steps=2, cfg=9.0, guess_mode=guess_mode)
        assert images.shape == (2, SIZE, SIZE, 3)


def test_a_hint_outside_zero_one_is_refused(base, trained_like_controlnet):
    """A float hint in [-1, 1] is a mistake worth an error, not a silent rescale."""
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample(base, [PROMPT], trained_like_controlnet, torch.full((1, 3, SIZE, SIZE), -1.0), steps=1)


BAD_SETTINGS = {
    "no steps": (dict(steps=0), "steps=0"),
    "negative steps": (dict(steps=-3), "steps=-3"),
    "no prompts": (dict(prompts=[]), "no prompts"),
    "negative strength": (dict(strength=-0.5), "strength=-0.5"),
    "negative cfg": (dict(cfg=-1.0), "cfg=-1.0"),
    "NaN cfg": (dict(cfg=float("nan")), "cfg=nan"),
    "NaN in the hint": (dict(hint=torch.full((1, 3, SIZE, SIZE), float("nan"))), "NaN"),
    "inf in the hint": (dict(hint=torch.full((1, 3, SIZE, SIZE), float("inf"))), r"\[0, 1\]"),
    "hint without control": (dict(control=None), "without a control"),
    "control without hint": (dict(hint=None), "needs a hint"),
    "hint 8x the native size": (dict(hint=np.zeros((8 * SIZE, 8 * SIZE, 3), np.uint8)), f"resize it to {SIZE}x{SIZE}"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS, ids=list(BAD_SETTINGS))
def test_bad_sampling_settings_are_refused_up_front(base, hint, trained_like_controlnet, case, monkeypatch):
    """Each setting that would fail late, run for minutes or silently do nothing raises InputError naming it."""
    overrides, message = BAD_SETTINGS[case]
    monkeypatch.setattr(sample_module, "make_sampler", lambda *a: pytest.fail("refused only after setup began"))
    kwargs = dict(prompts=[PROMPT], control=trained_like_controlnet, hint=hint, steps=2) | overrides
    with pytest.raises(InputError, match=message):
        sample(base, **kwargs)


def test_the_command_replaces_an_existing_png_only_with_overwrite(base, tmp_path, monkeypatch):
    """--out onto an existing file is refused (the file untouched); with --overwrite it becomes the new PNG."""
    monkeypatch.setattr(sample_module, "load_base_or_tiny", lambda path: base)
    out = tmp_path / "picture.png"
    out.write_bytes(b"my own picture")
    argv = ["--prompt", PROMPT, "--steps", "1", "--out", str(out)]
    with pytest.raises(InputError, match=r"--out .*picture.png already exists.*--overwrite"):
        sample_module.main(argv)
    assert out.read_bytes() == b"my own picture"
    sample_module.main(argv + ["--overwrite"])
    assert Image.open(out).text["prompt"] == PROMPT


def test_synthesize_with_overwrite_replaces_the_set_and_leaves_no_stale_captions(base, tmp_path, monkeypatch):
    """A second, smaller set over a first one: refused without --overwrite; with it only the new files remain."""
    monkeypatch.setattr(sample_module, "load_base_or_tiny", lambda path: base)
    out = tmp_path / "set"
    argv = ["--synthesize", "--steps", "1", "--cfg", "1", "--out", str(out)]
    sample_module.main(argv + ["--prompt", "{red|blue} circle", "--n-per-prompt", "2"])
    with pytest.raises(InputError, match=r"already holds 8 entries.*--overwrite"):
        sample_module.main(argv + ["--prompt", "green square"])
    sample_module.main(argv + ["--prompt", "green square", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "0.txt"]
    assert (out / "0.txt").read_text().strip() == Image.open(out / "0.png").text["prompt"] == "green square"


def test_wildcards_expand_to_every_combination():
    """{a|b} groups multiply out in reading order."""
    assert expand_wildcards("{red|blue} circle with {white|black} background") == [
        "red circle with white background", "red circle with black background",
        "blue circle with white background", "blue circle with black background"]
    assert expand_wildcards("plain") == ["plain"]


def test_a_synthesized_dataset_stores_each_prompt_in_its_png(base, tmp_path):
    """N images per expanded prompt, each PNG carrying its prompt in its 'prompt' text chunk and its .txt caption."""
    paths = synthesize_dataset(base, ["{red|blue} circle"], tmp_path, n_per_prompt=2, steps=1, cfg=1.0,
                               height=SIZE, width=SIZE)
    assert [Image.open(p).text["prompt"] for p in paths] == ["red circle"] * 2 + ["blue circle"] * 2
    assert [p.with_suffix(".txt").read_text().strip() for p in paths] == ["red circle"] * 2 + ["blue circle"] * 2


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
    from tinylllite.data.fill50k import make_pair
    from tinylllite.run.image_log import MetricsLog, log_training_panels

    pairs = [make_pair(0, i, size=SIZE) for i in range(2)]
    items = [dict(jpg=p.target / 127.5 - 1, txt=p.prompt, hint=p.source / 255.0) for p in pairs]
    paths = log_training_panels(base, trained_like_controlnet, items, 300, tmp_path, steps=2)
    assert [p.name for p in paths] == ["control_gs-000300.png", "reconstruction_gs-000300.png",
                                       "conditioning_gs-000300.png", "samples_cfg_scale_9.00_gs-000300.png"]
    assert Image.open(paths[-1]).size == (3 * SIZE + 4, SIZE)  # a label panel, then the two samples
    metrics = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        metrics.write(step=step, loss=1.0 / step, lr=1e-5)
    assert metrics.plot().is_file()
    assert [e["step"] for e in MetricsLog(tmp_path, append=True, keep_until=2).events()] == [1, 2]
