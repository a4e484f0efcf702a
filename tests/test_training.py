"""The training loop of tutorial_train.py on tiny CPU models: accumulation, caching, precision, NaN guard, SDXL, LLLite."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_base

import tutorial_train
from tinylllite import training
from tinylllite.run import batches
from tinylllite.errors import InputError
from tinylllite.data.fill50k import write_fill50k


LR = 1e-5  # the real-SD default the tiny random base gets
# Adam's first step is lr * g / (|g| + eps): where g is near eps, float rounding of the batch sum moves it visibly
ADAM_NOISE = 0.05 * LR



def tiny_fill50k(folder, n: int = 8):
    """A Fill50K-layout set of n pairs at 64 px (8x8 latents)."""
    if not (folder / "prompt.json").exists():
        write_fill50k(folder, n=n, size=64, seed=0, workers=1)
    return folder


def train(data, out, *extra, family: str = "sd1"):
    """Run tutorial_train.main on a tiny random base without image logs or evaluation; returns its summary."""
    argv = ["--data", str(data), "--out", str(out), "--logger-freq", "0", "--eval-every", "0", "--log-every", "1",
            "--checkpoint-every", "1000", "--data-workers", "0", "--cache-dir", str(Path(out).parent / "cache"),
            *map(str, extra)]
    return tutorial_train.main(argv, base=tiny_base(family))


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result["control"].state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fill50k(tmp_path_factory.mktemp("data") / "fill50k_64")


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """One optimizer step at batch 4, no accumulation, no caching: (run folder, weights)."""
    out = tmp_path_factory.mktemp("ref")
    return out, weights(train(data, out, "--max-steps", 1, "--batch-size", 4))


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[1]


def logged_loss(out, step: int = 1) -> float:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(e["loss"] for e in events if e["step"] == step and "loss" in e)


def test_two_accumulated_half_batches_update_like_one_full_batch(data, tmp_path, reference, reference_run, capsys):
    """Batch 2 x accumulation 2 is one optimizer step on the same 4 samples as batch 4, and says so."""
    result = train(data, tmp_path, "--max-steps", 1, "--batch-size", 2, "--gradient-accumulation", 2)
    assert "effective batch 4 = 2 per process x 2 accumulation x 1 processes" in capsys.readouterr().out
    assert result["step"] == 1
    # Adam's update ignores a constant factor on the gradient, the logged mean loss does not
    assert logged_loss(result["out"]) == pytest.approx(logged_loss(reference_run[0]), rel=1e-6)
    for key, value in weights(result).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=ADAM_NOISE, msg=lambda m: f"{key}: {m}")


def test_caching_latents_and_text_changes_speed_not_results(data, tmp_path, reference):
    """With --cache the latents are drawn with the same noise, so the update is the same; the cache is on disk."""
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 4, "--cache")
    for key, value in weights(result).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=ADAM_NOISE, msg=lambda m: f"{key}: {m}")
    assert len(list((tmp_path / "cache").glob("*/latents.safetensors"))) == 1


def test_a_second_run_reuses_the_cache_and_a_changed_image_rebuilds_it(data, tmp_path):
    """The cache key follows the data files: the same data reuses the folder, a touched image makes a new one."""
    import shutil

    copy = tmp_path / "fill50k_64"
    shutil.copytree(data, copy)
    train(copy, tmp_path / "a", "--max-steps", 1, "--batch-size", 2, "--cache")
    train(copy, tmp_path / "b", "--max-steps", 1, "--batch-size", 2, "--cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    (copy / "target" / "3.png").write_bytes((copy / "target" / "4.png").read_bytes())
    train(copy, tmp_path / "c", "--max-steps", 1, "--batch-size", 2, "--cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_worker_processes_decode_ahead_without_changing_results(data, tmp_path, reference):
    """--data-workers 2 draws every sample in a worker process from the same per-sample generator: same update."""
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 4, "--data-workers", 2)
    for key, value in weights(result).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=ADAM_NOISE, msg=lambda m: f"{key}: {m}")


def test_a_training_step_moves_the_zero_convs_first(reference):
    """After step 1 the zero convs moved away from zero (they alone get gradient at step 0: the paper, Sec. 3.1)."""
    assert reference["controlnet_mid_block.weight"].abs().sum() > 0
    assert all(reference[f"controlnet_down_blocks.{i}.weight"].abs().sum() > 0 for i in range(12))


def test_bf16_autocast_keeps_the_trainable_weights_in_fp32(data, tmp_path, reference):
    """--mixed-precision bf16 trains a step; the branch stays fp32 and lands near the fp32 update."""
    result = train(data, tmp_path, "--max-steps", 1, "--batch-size", 4, "--mixed-precision", "bf16")
    trained = weights(result)
    assert all(v.dtype == torch.float32 for v in trained.values())
    assert trained["controlnet_mid_block.weight"].abs().sum() > 0
    torch.testing.assert_close(trained["controlnet_mid_block.weight"], reference["controlnet_mid_block.weight"],
                               rtol=0, atol=2e-5)


def test_fp16_loss_scaling_runs_on_cpu_and_is_checkpointed(data, tmp_path):
    """--mixed-precision fp16 uses a GradScaler (CPU here) whose scale is saved for resuming."""
    train(data, tmp_path, "--max-steps", 2, "--batch-size", 2, "--mixed-precision", "fp16")
    state = torch.load(next((tmp_path / "checkpoints").iterdir()) / "training_state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["step"] == 2


def test_a_tiny_sdxl_shaped_base_trains_a_step(data, tmp_path):
    """SDXL's two text encoders, pooled embedding and time ids reach both the UNet and the ControlNet."""
    result = train(data, tmp_path, "--max-steps", 1, "--batch-size", 2, family="sdxl")
    assert result["control"].add_embedding is not None
    assert result["control"].controlnet_mid_block.weight.abs().sum() > 0


def test_lllite_trains_its_modules_and_refuses_controlnet_only_switches(data, tmp_path):
    """--control lllite trains the LLLite ups away from zero; --sd-locked false with it is an error."""
    result = train(data, tmp_path, "--max-steps", 1, "--batch-size", 2, "--control", "lllite")
    ups = [v for k, v in result["control"].kohya_state_dict().items() if k.endswith("up.0.weight")]
    assert ups and all(u.abs().sum() > 0 for u in ups)
    with pytest.raises(InputError, match="LLLite"):
        train(data, tmp_path / "x", "--max-steps", 1, "--control", "lllite", "--sd-locked", "false")


def test_nan_loss_stops_training_naming_the_loss_and_what_to_try(data, tmp_path, monkeypatch):
    """A NaN loss raises NonFiniteError at the next log line, saying where (forward pass, step) and what to try."""
    real = training.diffusion_loss
    monkeypatch.setattr(training, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(training.NonFiniteError, match=r"loss became NaN or inf at optimizer step 0 .*learning-rate"):
        train(data, tmp_path, "--max-steps", 1, "--batch-size", 2)


def test_a_nan_found_at_the_log_line_leaves_no_checkpoint_of_nan_weights(data, tmp_path, monkeypatch):
    """A loss that turns NaN at step 2 of 4 stops the run at the step-4 log line before any checkpoint is written."""
    real, calls = training.diffusion_loss, []

    def nan_from_step_2(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(training, "diffusion_loss", nan_from_step_2)
    with pytest.raises(training.NonFiniteError, match=r"optimizer step 2 "):
        train(data, tmp_path / "run", "--max-steps", 4, "--batch-size", 2, "--log-every", 4, "--checkpoint-every", 4)
    assert len(calls) == 4  # steps 3 and 4 ran without waiting for the device, and the check came with the log line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_gradient_check_names_the_parameter_whose_gradient_is_not_finite():
    """FiniteCheck keeps per-parameter flags on the device and names the parameter with an inf gradient on read."""
    good, bad = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    good.grad, bad.grad = torch.zeros(2), torch.tensor([0.0, float("inf"), 1.0])
    check = training.FiniteCheck([("controlnet.ok", good), ("controlnet.mid", bad)], torch.device("cpu"))
    for _ in range(7):
        check.next_step()
    check.add_gradients([good, bad])
    with pytest.raises(training.NonFiniteError, match=r"gradient of controlnet\.mid at optimizer step 7"):
        check.read()


def test_min_snr_weights_clip_high_snr_timesteps_only():
    """Min-SNR-5 leaves noisy timesteps at weight 1 and scales clean ones by 5 / SNR."""
    scheduler = training.training_scheduler(tiny_base())
    t = torch.tensor([999, 0])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    weights_ = training.min_snr_weights(scheduler, t, gamma=5.0)
    torch.testing.assert_close(weights_, torch.stack([torch.tensor(1.0), 5.0 / snr[1]]))


def test_x0_weighting_is_the_eps_loss_over_snr_clipped_at_gamma():
    """Clean-latent supervision: weight 1 / SNR (the x0 error of an eps prediction), at most gamma on noisy steps."""
    scheduler = training.training_scheduler(tiny_base())
    t = torch.tensor([999, 500, 0])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    weights_ = training.clean_latent_weights(scheduler, t, clip=5.0)
    torch.testing.assert_close(weights_, torch.clamp(1 / snr, max=5.0))
    assert weights_[0] == 5.0 and weights_[2] < 1e-3  # the noisiest step is clipped, the cleanest nearly ignored


def test_min_snr_x0_weighting_takes_the_larger_weight_at_each_timestep():
    """min-snr-x0: x0's weight at the noisy timesteps (up to gamma), Min-SNR's at the clean ones."""
    scheduler = training.training_scheduler(tiny_base())
    t = torch.arange(0, 1000, 37)
    both = training.min_snr_and_clean_latent_weights(scheduler, t, 5.0)
    torch.testing.assert_close(both, torch.maximum(training.min_snr_weights(scheduler, t, 5.0),
                                                   training.clean_latent_weights(scheduler, t, 5.0)))
    assert both[-1] == 5.0 and both[0] == training.min_snr_weights(scheduler, t, 5.0)[0]


def test_the_learning_rate_is_constant_then_falls_along_a_cosine_to_zero_over_the_last_fraction():
    assert [training.learning_rate_scale(p, 0.0) for p in (0.0, 0.9, 1.0)] == [1.0, 1.0, 1.0]
    assert training.learning_rate_scale(0.69, 0.3) == 1.0
    assert training.learning_rate_scale(0.85, 0.3) == pytest.approx(0.5)
    assert training.learning_rate_scale(1.0, 0.3) == pytest.approx(0.0)


def test_lr_decay_over_max_steps_ends_the_run_near_zero_and_records_each_rate(data, tmp_path):
    """--lr-decay 0.5 with --max-steps 8: the first half at the full rate, then down (step k trains at the rate of
    progress (k - 1) / 8, so the last at cos^2(3 pi / 8) of it); metrics.jsonl records the rate each step used."""
    train(data, tmp_path / "run", "--max-steps", "8", "--log-every", "1", "--lr-decay", "0.5")
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]
    full = rates[0]  # the preset's rate (this random base gets the sd15 preset)
    assert rates[:5] == [full] * 5
    assert rates[-1] == pytest.approx(full * math.cos(3 * math.pi / 8) ** 2)
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))


def test_the_optimizer_is_torchs_fused_adamw_on_the_cpu_too():
    """make_optimizer asks for the fused kernel wherever torch has one for the parameters' device (here the CPU)."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    optimizer = training.make_optimizer(params, 1e-3)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["weight_decay"] == 0.01


def test_lllite_training_embeds_in_grouped_stacks_and_sampling_module_by_module(monkeypatch):
    """The training loss embeds the hint with embed_together (one conv stack per depth); a UNet call outside
    training, as sampling makes it, keeps each module's own convs (kohya's sums)."""
    from tinylllite import control_branch, lllite_unet
    from tinylllite.lllite_unet import attach_lllite

    calls, real = [], lllite_unet.embed_together

    def counted(modules, image):
        calls.append(len(modules))
        return real(modules, image)

    monkeypatch.setattr(lllite_unet, "embed_together", counted)
    base = tiny_base()
    lllite = attach_lllite(base.unet, 8, 8, vae_scale_factor=base.vae_scale_factor)
    side = base.unet.config.sample_size
    batch = dict(latents=torch.randn(2, 4, side, side), noise=torch.randn(2, 4, side, side),
                 timesteps=torch.tensor([10, 900]), hidden=base.encode_prompt(["a", "b"])[0], added_cond_kwargs=None,
                 hint=torch.rand(2, 3, side * base.vae_scale_factor, side * base.vae_scale_factor))

    training.diffusion_loss(base, lllite, training.training_scheduler(base), batch)
    assert calls == [len(lllite)]
    with torch.no_grad():
        control_branch.unet_prediction(base, lllite, batch["latents"], batch["timesteps"], batch["hidden"],
                                       hint=batch["hint"])
    assert calls == [len(lllite)]  # not called again


def test_ctrl_c_finishes_the_step_saves_and_exits(data, tmp_path, monkeypatch):
    """SIGINT during step 2 ends the run after that step with a checkpoint at step 2."""
    real, calls = training.diffusion_loss, []

    def loss_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(training, "diffusion_loss", loss_then_interrupt)
    result = train(data, tmp_path, "--max-steps", 50, "--batch-size", 2)
    assert result["step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_update(data, tmp_path, reference, monkeypatch):
    """--gradient-checkpointing runs blocks under torch.utils.checkpoint and changes memory, not the result."""
    import torch.utils.checkpoint

    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = train(data, tmp_path, "--max-steps", 1, "--batch-size", 4, "--gradient-checkpointing")
    assert len(calls) > 0
    for key, value in weights(result).items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=ADAM_NOISE, msg=lambda m: f"{key}: {m}")


def test_the_data_order_visits_each_of_the_first_n_items_once_per_epoch():
    """dataset_index: a fresh permutation of the first n items (--max-train-samples) every epoch, fixed by the seed."""
    first, second = ([batches.dataset_index(0, k, 5) for k in range(e * 5, e * 5 + 5)] for e in (0, 1))
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4]
    assert first != second
    assert [batches.dataset_index(0, k, 5) for k in range(5)] == first


def test_8bit_adam_without_bitsandbytes_says_what_to_install(monkeypatch):
    """--use-8bit-adam on a machine without bitsandbytes stops with the pip command."""
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails
    with pytest.raises(SystemExit, match="pip install bitsandbytes"):
        training.make_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, use_8bit=True)


def test_a_run_folder_loads_back_with_its_branch_and_unlocked_decoder(data, tmp_path):
    """load_control(base, run) rebuilds the trained ControlNet and puts the trained, unlocked decoder back."""
    from safetensors.torch import load_file

    from tinylllite.files.checkpoint import list_checkpoints, load_control

    result = train(data, tmp_path, "--max-steps", 1, "--sd-locked", "false")
    base = tiny_base()
    control = load_control(base, result["out"])
    decoder = load_file(list_checkpoints(result["out"])[-1] / "unet_decoder.safetensors")
    assert all(torch.equal(control.state_dict()[k], v) for k, v in weights(result).items())
    assert torch.equal(base.unet.conv_out.weight, decoder["conv_out.weight"])
    assert not torch.equal(tiny_base().unet.conv_out.weight, decoder["conv_out.weight"])
