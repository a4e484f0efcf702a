"""The peak-memory estimator (tinylllite/run/memory.py): against the H200 measurements, and its parts on the tiny SD."""
import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tinylllite.run import memory

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "gpu_peaks_h200.json").read_text())
MEASURED = {(control, checkpointing): FIXTURE["peaks"][control + ("_gradient_checkpointing" if checkpointing else "")]
            for control in ("controlnet", "lllite") for checkpointing in (False, True)}
TOLERANCE = 0.15
TINY = memory.RunConfig(family="tiny", control="lllite", batch_size=4, resolution=64,
                        lllite_blocks="input,middle,output")  # tutorial_train.py's tiny LLLite


def trained_parameters(config: memory.RunConfig) -> list:
    with memory.as_if_on_cuda():
        return memory.build_run(config).params


@pytest.fixture(scope="module")
def fixture_estimates():
    """The four fixture configurations, each estimated once for the tests that compare with them."""
    cache = {}

    def get(control, checkpointing):
        if (control, checkpointing) not in cache:
            cache[control, checkpointing] = memory.estimate(memory.fixture_configuration(control, checkpointing))
        return cache[control, checkpointing]
    return get


@pytest.fixture(scope="module")
def tiny_estimate():
    """Estimates of tiny-SD runs, each made once."""
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = memory.estimate(config)
        return cache[config]
    return get


@pytest.mark.parametrize("control,checkpointing", list(MEASURED))
def test_the_estimate_is_within_15_percent_of_each_measured_h200_peak(fixture_estimates, control, checkpointing):
    """SD1.5, 512 px, batch 4, bf16: the estimated step peak is within 15 % of torch.cuda.max_memory_allocated."""
    estimated = fixture_estimates(control, checkpointing).step_peak / memory.GIB
    measured = MEASURED[control, checkpointing]
    assert abs(estimated - measured) <= TOLERANCE * measured, f"estimated {estimated:.2f} GiB, measured {measured} GiB"


@pytest.mark.parametrize("control,checkpointing", list(MEASURED))
def test_the_traced_tensors_alone_stay_below_each_measured_peak(fixture_estimates, control, checkpointing):
    """The trace sees a subset of what the GPU allocates, so without the stated workspace it must come out lower."""
    assert fixture_estimates(control, checkpointing).traced_peak / memory.GIB < MEASURED[control, checkpointing]


def test_the_fixture_step_holds_a_bf16_base_and_an_fp32_controlnet_with_two_adam_states(fixture_estimates):
    """SD1.5 ControlNet: UNet, VAE and CLIP weights (859.5M + 83.7M + 123.1M) in bf16, the 361.3M trained in fp32."""
    e = fixture_estimates("controlnet", False)
    assert e.frozen == 2 * (859_520_964 + 83_653_863 + 123_060_480) + 616  # + CLIP's int64 position ids
    assert e.parameters == 4 * 361_279_120
    assert e.optimizer_state == 2 * e.parameters + 4 * len(trained_parameters(e.config))  # + fp32 step counters


def test_8bit_adam_keeps_two_bytes_per_parameter_plus_an_fp32_absmax_per_256_block(tiny_estimate):
    """The 8-bit state is bitsandbytes' layout: uint8 x2 per element, fp32 absmax x2 per block, fp32 x2 under 4096."""
    assert memory.AdamW8bitLayout.state_bytes(4096) == 2 * 4096 + 2 * 4 * 16
    assert memory.AdamW8bitLayout.state_bytes(4097) == 2 * 4097 + 2 * 4 * 17
    assert memory.AdamW8bitLayout.state_bytes(4095) == 2 * 4 * 4095
    expected = sum(memory.AdamW8bitLayout.state_bytes(p.numel()) for p in trained_parameters(TINY))
    assert tiny_estimate(replace(TINY, use_8bit_adam=True)).optimizer_state == expected


def test_adamw_keeps_two_fp32_states_per_trained_parameter_and_a_step_counter(tiny_estimate):
    """torch's fused AdamW: exp_avg and exp_avg_sq of each parameter's size, plus one fp32 step tensor per parameter."""
    e = tiny_estimate(TINY)
    count = len(trained_parameters(TINY))
    assert e.optimizer_state == 2 * e.parameters + 4 * count


class OpDtypes(TorchDispatchMode):
    """Records the dtype of the first input of the ops whose precision autocast decides."""

    WATCHED = {torch.ops.aten.convolution.default: "conv", torch.ops.aten.mm.default: "matmul",
               torch.ops.aten.addmm.default: "matmul", torch.ops.aten.bmm.default: "matmul",
               torch.ops.aten.native_group_norm.default: "norm", torch.ops.aten.native_layer_norm.default: "norm"}

    def __init__(self):
        super().__init__()
        self.seen = {"conv": set(), "matmul": set(), "norm": set()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.WATCHED:
            self.seen[self.WATCHED[func]].add(args[0].dtype if func is not torch.ops.aten.addmm.default else
                                              args[1].dtype)
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_convolutions_and_matmuls_run_in_bf16_and_norms_in_fp32():
    """CUDA autocast's policy reaches the meta tensors: the tiny ControlNet step runs as it would on a GPU."""
    config = memory.RunConfig(family="tiny", control="controlnet", batch_size=2, resolution=64, batch_in_memory=True)
    recorder = OpDtypes()
    with memory.as_if_on_cuda():
        run = memory.build_run(config)
        with recorder:
            run.step()
    assert recorder.seen == {"conv": {torch.bfloat16}, "matmul": {torch.bfloat16}, "norm": {torch.float32}}


def test_bf16_attention_runs_flash_and_wider_heads_or_fp32_the_memory_efficient_kernel():
    """The SDPA kernel is CUDA's: flash for bf16 heads up to 256, memory-efficient otherwise, never the N x N math."""
    rules = memory.CudaRules()
    q = torch.zeros(2, 8, 4096, 40, device="meta", dtype=torch.bfloat16)
    wide = torch.zeros(2, 1, 4096, 512, device="meta", dtype=torch.bfloat16)
    with rules:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.nn.functional.scaled_dot_product_attention(wide, wide, wide)
        torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float())
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert rules.sdpa_kernels == {"flash": 1, "efficient": 2}


def test_gradient_checkpointing_recomputes_under_autocast_and_saves_activations(tiny_estimate):
    """With checkpointing the step still traces (the recomputation sees the same casts) and keeps fewer activations."""
    plain, checkpointed = tiny_estimate(TINY), tiny_estimate(replace(TINY, gradient_checkpointing=True))
    assert checkpointed.activations < plain.activations
    assert checkpointed.frozen == plain.frozen and checkpointed.parameters == plain.parameters


def test_only_fp16_with_8bit_adam_reads_back_from_the_device_its_grad_scalers_found_inf(tiny_estimate):
    """Host reads are answered and listed: none for bf16, none for fp16 with fused AdamW (it takes found_inf on the
    device), the GradScaler's found_inf read for fp16 with 8-bit Adam."""
    assert tiny_estimate(TINY).host_reads == []
    assert tiny_estimate(replace(TINY, mixed_precision="fp16")).host_reads == []
    reads = tiny_estimate(replace(TINY, mixed_precision="fp16", use_8bit_adam=True)).host_reads
    assert reads and all("grad_scaler.py" in where for where in reads), reads


def test_without_the_cache_the_vae_and_text_encoder_run_inside_the_step(tiny_estimate):
    """Without --cache the VAE's attention runs in the step (its mid block); with --cache only the UNet's does."""
    uncached, cached = tiny_estimate(TINY), tiny_estimate(replace(TINY, cache=True))
    assert sum(cached.attention_kernels.values()) < sum(uncached.attention_kernels.values())


def test_check_fits_is_none_when_it_fits_and_names_both_sizes_when_not():
    """check_fits keeps the allocator's margin free and says what is needed against what is free."""
    assert memory.check_fits(8 * memory.GIB, 9 * memory.GIB) is None
    message = memory.check_fits(8 * memory.GIB, int(8.5 * memory.GIB))
    assert message is not None and "8.8 GiB" in message and "8.5 GiB free" in message


def linear_model(per_sample_gib: dict[tuple, float], base_gib: float = 1.0):
    """A made-up `estimate`: base_gib plus per_sample_gib[(checkpointing, 8-bit)] per sample, as the step peak."""
    def fake(config):
        per_sample = per_sample_gib[config.gradient_checkpointing, config.use_8bit_adam]
        step = int((base_gib + per_sample * config.batch_size) * memory.GIB) - memory.KERNEL_WORKSPACE_BYTES
        return memory.Estimate(config, 0, 0, 0, 0, 0, traced_peak=step, load_peak=0, half_load_peak=0)
    return fake


def test_what_would_fit_names_the_fewest_switches_then_a_smaller_batch(monkeypatch):
    """Ways to fit are the cheapest switch sets (no superset of one found), else a smaller batch with accumulation."""
    monkeypatch.setattr(memory, "estimate", linear_model({(False, False): 1.0, (True, False): 0.5,
                                                          (False, True): 0.9, (True, True): 0.4}))
    config = memory.RunConfig(family="tiny", batch_size=8)  # peaks: 9 GiB; checkpointing 5; both 4.2; 8-bit 8.2
    assert memory.what_would_fit(config, int(6 * memory.GIB)) == ["--gradient-checkpointing (5.0 GiB)"]
    assert memory.what_would_fit(config, int(3 * memory.GIB)) == [
        "--batch-size 4 --gradient-accumulation 2 --cache --gradient-checkpointing --use-8bit-adam (2.6 GiB)"]


def test_config_from_training_reads_tutorial_train_settings_and_the_base_family():
    """The training script's parsed args and resolved settings become the RunConfig the estimate runs."""
    args = argparse.Namespace(control="lllite", base="sd15", batch_size=None, mixed_precision=None)
    settings = dict(batch_size=2, mixed_precision="bf16", gradient_checkpointing=True, use_8bit_adam=False,
                    cache=True, gradient_accumulation=3, max_grad_norm=1.0, cond_emb_dim=16, mlp_dim=32,
                    lllite_blocks="input,middle", channels_last=False, snr_gamma=None)
    config = memory.config_from_training(args, settings, resolution=768)
    assert (config.family, config.control, config.batch_size, config.side) == ("sd1", "lllite", 2, 768)
    assert (config.gradient_checkpointing, config.cache, config.gradient_accumulation) == (True, True, 3)
    assert (config.cond_emb_dim, config.mlp_dim, config.lllite_blocks) == (16, 32, "input,middle")


def test_a_resolution_the_unet_cannot_halve_is_refused_in_one_line(capsys):
    """SD1.5's UNet halves the latent three times: 500 px is refused, naming the multiple of 64 it needs."""
    assert memory.main(["--base", "sd15", "--resolution", "500"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "multiple of 64" in error and "--resolution 500" in error


def test_a_base_that_is_neither_a_name_nor_a_file_is_refused(capsys):
    """--base must be sd15, sd21, sdxl, tiny or an existing checkpoint: anything else is one line, exit status 1."""
    assert memory.main(["--base", "sd3-medium"]) == 1
    assert "--base sd3-medium" in capsys.readouterr().err


def test_the_command_prints_every_part_as_json(capsys):
    """--json prints the configuration and each part in bytes and GiB; the parts at the peak sum to the traced peak."""
    assert memory.main(["--base", "tiny", "--control", "lllite", "--batch-size", "2", "--resolution", "64",
                        "--cache", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    parts = report["bytes"]
    assert report["config"]["family"] == "tiny" and report["config"]["cache"] is True
    assert parts["step_peak"] == sum(parts[k] for k in ("frozen", "parameters", "gradients", "optimizer_state",
                                                         "activations", "kernel_workspace"))
    assert parts["peak"] == max(parts["step_peak"], parts["half_load_peak"]) and report["gib"]["cuda_context"] == 0.5


def test_sdxl_has_a_controlnet_copied_from_its_unet_encoder():
    """The project's ControlNet supports SDXL (its text_time embedding is copied): 1.25B trained parameters."""
    from tinylllite import control_branch

    with memory.as_if_on_cuda():
        base = memory.meta_base("sdxl")
        control = control_branch.build("controlnet", base)
    assert control.add_embedding is not None
    assert 1.2e9 < sum(p.numel() for p in control.parameters()) < 1.3e9


def test_the_table_takes_the_largest_batch_with_every_switch_then_drops_the_switches_it_does_not_need(monkeypatch):
    """fits_table on a made-up linear model: 1 GiB + 1 GiB per sample, 0.25 GiB with checkpointing, 8-bit no help."""
    monkeypatch.setattr(memory, "estimate", linear_model({(False, False): 1.0, (True, False): 0.25,
                                                          (False, True): 1.0, (True, True): 0.25}))
    table = memory.fits_table(cards=(8, 2), setups=(("Tiny", "tiny", 64),), controls=("lllite",))
    # (8 GiB - 0.5 GiB context) / 1.1 = 6.8 GiB for the peak: 23 samples with checkpointing; 2 GB: 1.3 GiB, 1 sample
    assert table.splitlines()[-2:] == ["| 8 GB | 23 (GC) |", "| 2 GB | 1 (GC) |"]


def tiny_training_settings(*flags):
    import tutorial_train

    args = tutorial_train.parse_args(list(flags))
    settings, _ = tutorial_train.resolve_settings(args, tiny=True)
    return args, dict(settings, batch_size=8)


def test_on_cuda_the_training_script_refuses_a_run_that_would_not_fit_naming_the_switches_that_would(monkeypatch):
    """tutorial_train.fit_memory (called on CUDA before the data is cached): over the card's free memory is one
    line naming what would fit and --fit-memory; nothing is changed silently."""
    import tutorial_train
    from tinylllite.errors import InputError

    monkeypatch.setattr(memory, "estimate", linear_model({(False, False): 1.0, (True, False): 0.5,
                                                          (False, True): 0.9, (True, True): 0.4}))
    args, settings = tiny_training_settings()
    base = argparse.Namespace(family="tiny")
    with pytest.raises(InputError) as refused:
        tutorial_train.fit_memory(args, settings, base, 64, int(6 * memory.GIB))
    message = str(refused.value)
    assert "\n" not in message and "--gradient-checkpointing (5.0 GiB)" in message and "--fit-memory" in message
    assert tutorial_train.fit_memory(args, settings, base, 64, int(10 * memory.GIB)) is settings  # 9 GiB fits


def test_fit_memory_turns_on_the_cheapest_switches_that_fit_and_warn_runs_as_asked(monkeypatch, capsys):
    """--fit-memory picks gradient checkpointing (5 GiB of 6 free) and says so; --fit-memory warn changes nothing."""
    import tutorial_train

    monkeypatch.setattr(memory, "estimate", linear_model({(False, False): 1.0, (True, False): 0.5,
                                                          (False, True): 0.9, (True, True): 0.4}))
    base = argparse.Namespace(family="tiny")
    args, settings = tiny_training_settings("--fit-memory")
    picked = tutorial_train.fit_memory(args, settings, base, 64, int(6 * memory.GIB))
    assert picked == dict(settings, gradient_checkpointing=True)
    assert "--fit-memory: turning on --gradient-checkpointing" in capsys.readouterr().out
    args, settings = tiny_training_settings("--fit-memory", "warn")
    assert tutorial_train.fit_memory(args, settings, base, 64, int(6 * memory.GIB)) == settings
    assert "warning:" in capsys.readouterr().out


def test_the_training_scripts_memory_check_estimates_the_real_tiny_run():
    """Unpatched: the tiny run's real estimate fits a 1 GiB card, and not a 1 MiB one (refused in one line)."""
    import tutorial_train
    from tinylllite.errors import InputError

    args, settings = tiny_training_settings()
    base = argparse.Namespace(family="tiny")
    assert tutorial_train.fit_memory(args, settings, base, 64, memory.GIB) is settings
    with pytest.raises(InputError, match="GiB free"):
        tutorial_train.fit_memory(args, settings, base, 64, 2 ** 20)
