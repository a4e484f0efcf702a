"""tutorial_train.py as a user meets it: the config block it runs, presets, flags, and the run folder it writes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import tiny_fill50k, train
from tiny_models import tiny_base

import tutorial_train
from tinylllite.run import image_log, stopping
from tinylllite.errors import InputError
from tinylllite.files.control_io import save_lllite


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fill50k(tmp_path_factory.mktemp("data") / "fill50k_64")


@pytest.mark.parametrize("control, block", [("controlnet", tutorial_train.CONTROLNET), ("lllite", tutorial_train.LLLITE)])
def test_the_default_run_records_exactly_the_config_block_at_the_top(control, block, tmp_path, monkeypatch):
    """`python tutorial_train.py [--control lllite]` writes config.json whose settings are the top block, unchanged."""
    from tinylllite.data import fill50k
    from tinylllite.sd.tiny_sd import load_tiny_sd

    monkeypatch.chdir(tmp_path)
    real_write = fill50k.write_fill50k
    monkeypatch.setattr(fill50k, "write_fill50k", lambda out, n, **kw: real_write(out, n=8, **kw))  # not 10,000
    monkeypatch.setattr(image_log.RunLog, "after_step", lambda self, step: None)  # no step-0 evaluation
    monkeypatch.setattr(stopping.StopRule, "should_stop", lambda self, *a, **k: True)  # stop before step 1
    argv = [] if control == "controlnet" else ["--control", "lllite"]
    result = tutorial_train.main(argv, base=load_tiny_sd())
    config = json.loads((result["out"] / "config.json").read_text())
    assert config["settings"] == block
    assert config["control"] == control and config["preset"] is None and config["base"] == "tiny"
    convs = [p for p in result["control"].parameters() if p.ndim == 4]  # the block's channels-last layout
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_a_real_sd_base_runs_the_original_values_as_the_sd15_preset(data, tmp_path, capsys):
    """Any base but the tiny SD gets the sd15 preset (batch 4, lr 1e-5, CFG 9), printed at the start."""
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2)
    config = json.loads((result["out"] / "config.json").read_text())
    assert config["preset"] == "sd15"
    assert config["settings"]["learning_rate"] == 1e-5 and config["settings"]["eval_cfg"] == 9.0
    assert config["settings"]["batch_size"] == 2  # a flag overrides the preset
    assert capsys.readouterr().out.startswith("sd15 settings (controlnet)")


def test_a_run_that_ends_before_its_first_metrics_line_trains_saves_and_exits_cleanly(data, tmp_path):
    """--max-steps 4 with the loss logged every 10 steps and no evaluation: a checkpoint, no metrics.png, no error."""
    result = train(data, tmp_path / "run", "--max-steps", 4, "--batch-size", 2, "--log-every", 10)
    assert result["step"] == 4
    assert (result["out"] / "checkpoints" / "step_0000004").is_dir()
    assert not (result["out"] / "metrics.png").exists()


def test_out_onto_an_existing_run_is_refused_and_the_run_is_untouched(data, tmp_path):
    """A second run with the same --out stops before training and leaves the first run's files as they were."""
    first = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2)["out"]
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=r"--out .*run already holds files.*--resume-from"):
        train(data, first, "--max-steps", 2, "--batch-size", 2)
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before


def test_resuming_keeps_config_json_and_writes_the_new_call_beside_it(data, tmp_path):
    """--resume-from leaves config.json as the first call wrote it and adds config_resume_<step>.json."""
    run = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2)["out"]
    original = (run / "config.json").read_text()
    train(data, run, "--max-steps", 2, "--batch-size", 2, "--resume-from", run)
    assert (run / "config.json").read_text() == original
    resumed = json.loads((run / "config_resume_1.json").read_text())
    assert resumed["settings"]["max_steps"] == 2 and resumed["resume_from"] == str(run)


def test_a_missing_data_folder_is_refused_and_not_created(tmp_path):
    """--data naming a folder that does not exist stops with advice; nothing is written there."""
    missing = tmp_path / "fill50k_typo"
    with pytest.raises(InputError, match=r"fill50k_typo"):
        tutorial_train.main(["--data", str(missing), "--out", str(tmp_path / "run"), "--max-steps", "1"],
                            base=tiny_base())
    assert not missing.exists()


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "0"], "--batch-size"),
    (["--gradient-accumulation", "0"], "--gradient-accumulation"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--prompt-dropout", "1.5"], "--prompt-dropout"),
    (["--sd-locked", "flase"], "--sd-locked"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--snr-gamma", "-1"], "--snr-gamma"),
    (["--validation-prompt", "a red circle"], "--validation-image"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--lr-decay", "1.5"], "--lr-decay"),
    (["--loss-weighting", "x1"], "--loss-weighting"),
    (["--fit-memory", "maybe"], "--fit-memory"),
])
def test_bad_flags_are_refused_where_they_are_parsed(flags, named, capsys):
    """Counts below 1, numbers out of range, a misspelt true/false and an unpaired validation prompt exit 2 naming the flag."""
    with pytest.raises(SystemExit) as stopped:
        tutorial_train.parse_args(flags)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err


def test_snr_gamma_0_turns_the_tiny_defaults_min_snr_off_and_trains_on_plain_mse():
    """The tiny block weights the loss with Min-SNR-5; `--snr-gamma 0` gives the unweighted loss, bit for bit."""
    from tinylllite import training
    from tinylllite.sd.tiny_sd import load_tiny_sd

    default, _ = tutorial_train.resolve_settings(tutorial_train.parse_args([]), tiny=True)
    off, _ = tutorial_train.resolve_settings(tutorial_train.parse_args(["--snr-gamma", "0"]), tiny=True)
    assert default["snr_gamma"] == 5.0 and off["snr_gamma"] == 0.0
    base = load_tiny_sd()
    scheduler = training.training_scheduler(base)
    torch.manual_seed(0)
    batch = dict(latents=torch.randn(2, 4, 8, 8), noise=torch.randn(2, 4, 8, 8), timesteps=torch.tensor([10, 900]),
                 hidden=base.encode_prompt(["red circle with blue background"] * 2)[0], added_cond_kwargs=None,
                 hint=torch.rand(2, 3, 64, 64))
    weighted = training.diffusion_loss(base, None, scheduler, batch, off["snr_gamma"])
    plain = training.diffusion_loss(base, None, scheduler, batch, None)
    assert torch.equal(weighted, plain)
    assert not torch.equal(training.diffusion_loss(base, None, scheduler, batch, default["snr_gamma"]), plain)


def test_edge_f1_evaluation_keeps_its_pairs_out_of_training_and_logs_the_score(data, tmp_path, capsys):
    """--eval-metric edge-f1 holds out the last 5 % of the user's pairs (1 of 8), trains on 7 and logs edge_f1."""
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2, "--eval-metric", "edge-f1",
                   "--eval-every", 1, "--eval-steps", 2)
    assert "(7 pairs)" in capsys.readouterr().out
    events = image_log.MetricsLog(result["out"], append=True, keep_until=10 ** 9).events()
    scores = [e["edge_f1"] for e in events if "edge_f1" in e]
    assert len(scores) == 2 and all(0.0 <= f <= 1.0 for f in scores)  # step 0 and step 1


def test_the_summary_and_plot_mark_the_step_where_control_arrives(tmp_path):
    """The first evaluation with IoU >= 0.5 is named in the run's last line and marked in metrics.png."""
    log = image_log.MetricsLog(tmp_path)
    for step, iou in [(0, 0.27), (250, 0.41), (500, 0.66), (750, 0.81)]:
        log.write(step=step, loss=0.1, fidelity_iou=iou)
    assert log.take_off(log.events()) == ("fidelity_iou", 500)
    assert "IoU 0.270 -> 0.810, first >= 0.5 at step 500; loss 0.1000 -> 0.1000" in log.summary()
    assert log.plot().is_file()


def test_a_run_that_never_reaches_iou_0_5_gets_no_take_off_marker(tmp_path, monkeypatch):
    """metrics.png draws the "IoU >= 0.5 at step N" line only for a run that got there."""
    log = image_log.MetricsLog(tmp_path)
    for step, iou in [(0, 0.27), (250, 0.41), (500, 0.49)]:
        log.write(step=step, loss=0.1, fidelity_iou=iou)
    lines = []
    from matplotlib.axes import Axes

    monkeypatch.setattr(Axes, "axvline", lambda self, *a, **k: lines.append(a))
    assert log.take_off(log.events()) is None and "not yet >= 0.5" in log.summary()
    assert log.plot().is_file() and lines == []
    log.write(step=750, loss=0.1, fidelity_iou=0.6)
    log.plot()
    assert lines == [(750,)] * 2  # one line on each of the two panels (loss, IoU)


def test_the_final_step_gets_an_image_log_even_between_intervals(data, tmp_path):
    """With --logger-freq 3 and 4 steps, images are written at steps 0, 3 and the last step, 4."""
    result = train(data, tmp_path / "run", "--max-steps", 4, "--batch-size", 2, "--logger-freq", 3)
    logged = sorted(p.name for p in (result["out"] / "image_log").glob("control_gs-*.png"))
    assert logged == ["control_gs-000000.png", "control_gs-000003.png", "control_gs-000004.png"]


def test_a_labelled_grid_has_a_header_row_and_a_label_column(tmp_path):
    """The held-out grid adds one row of prompts on top and one column of row names on the left."""
    base = tiny_base()
    hints = np.zeros((2, 64, 64, 3), np.uint8)
    path = tmp_path / "grid.png"
    image_log.log_pairs_grid(base, None, ["a", "b"], hints, path, steps=2, cfg=1.0, targets=hints, hint_name="outline")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * 64 + 3 * 2, 3 * 64 + 2 * 2, 3)  # header + outline/sample/target rows, label + 2 columns


def own_jsonl(data, tmp_path):
    """A JSON Lines file of the user's own: the tiny Fill50K images under captions that are not Fill50K prompts."""
    lines = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines()]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(source=str(data / e["source"]), target=str(data / e["target"]),
                                            prompt="a photo of a ring")) + "\n" for e in lines))
    return path


def test_a_json_lines_file_of_ones_own_trains_like_a_fill50k_folder(data, tmp_path):
    """--data takes the JSON Lines layout that dataset_check accepts; without Fill50K captions, evaluation is off."""
    result = train(own_jsonl(data, tmp_path), tmp_path / "run", "--max-steps", 1, "--batch-size", 2,
                   "--eval-metric", "none")
    assert result["step"] == 1


def test_fill50k_iou_on_data_that_is_not_fill50k_is_refused_before_training(data, tmp_path):
    """Asking for Fill50K's IoU on other captions stops up front and names the other metrics."""
    with pytest.raises(InputError, match=r"pairs\.jsonl is not Fill50K.*--eval-metric edge-f1"):
        train(own_jsonl(data, tmp_path), tmp_path / "run", "--max-steps", 1, "--eval-every", 5)
    assert not (tmp_path / "run").exists()


def marked_controlnet(base):
    """A ControlNet whose middle zero conv holds 0.5 everywhere: a value training at lr 1e-5 barely moves."""
    from tinylllite.controlnet import ControlNet

    control = ControlNet.from_unet(base.unet)
    with torch.no_grad():
        control.controlnet_mid_block.weight.fill_(0.5)
    return control


@pytest.mark.parametrize("layout, name", [("original", "control.ckpt"), ("diffusers", "control_diffusers")])
def test_resume_path_starts_from_an_original_ckpt_or_a_diffusers_folder(layout, name, data, tmp_path):
    """--resume-path reads the original's .ckpt layout and a diffusers ControlNet folder into the fresh branch."""
    from tinylllite.files.control_io import save_controlnet

    base = tiny_base()
    save_controlnet(marked_controlnet(base), base.unet, tmp_path / name, layout=layout)
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2, "--resume-path", tmp_path / name)
    torch.testing.assert_close(result["control"].controlnet_mid_block.weight,
                               torch.full_like(result["control"].controlnet_mid_block.weight, 0.5), rtol=0, atol=1e-4)


def test_resume_path_starts_an_lllite_from_a_kohya_file(data, tmp_path):
    """--control lllite --resume-path takes kohya's lllite_unet_* file."""
    from tinylllite.lllite_unet import attach_lllite

    unet = tiny_base().unet
    lllite = attach_lllite(unet)
    tensors = {k: torch.full_like(v, 0.25) if k.endswith("up.0.weight") else v for k, v in lllite.kohya_state_dict().items()}
    lllite.load_kohya_state_dict(tensors)
    save_lllite(lllite, unet, tmp_path / "kohya.safetensors")
    result = train(data, tmp_path / "run", "--max-steps", 1, "--batch-size", 2, "--control", "lllite",
                   "--resume-path", tmp_path / "kohya.safetensors")
    ups = [v for k, v in result["control"].kohya_state_dict().items() if k.endswith("up.0.weight")]
    assert all(torch.allclose(u, torch.full_like(u, 0.25), atol=1e-3) for u in ups)  # lr 2e-4, one step


def test_a_checkpoint_converted_to_the_original_layout_resumes_training(data, tmp_path):
    """A run's control.safetensors converts with `python -m tinylllite.convert`, and --resume-path takes the result."""
    from tinylllite.files import convert

    first = train(data, tmp_path / "first", "--max-steps", 1, "--batch-size", 2)
    step_file = first["out"] / "checkpoints" / "step_0000001" / "control.safetensors"
    assert convert.main([str(step_file), str(tmp_path / "a1111.safetensors"), "--to", "original"]) == 0
    second = train(data, tmp_path / "second", "--max-steps", 1, "--batch-size", 2, "--resume-path",
                   tmp_path / "a1111.safetensors", "--learning-rate", "1e-12")
    for key, value in first["control"].state_dict().items():
        torch.testing.assert_close(second["control"].state_dict()[key], value, rtol=0, atol=1e-9)


def test_resume_path_with_an_lllite_file_for_a_controlnet_is_refused_before_training(data, tmp_path):
    """A kohya LLLite file given to a ControlNet run stops with a sentence naming the file; no run folder."""
    from tinylllite.lllite_unet import attach_lllite

    other = tiny_base()
    save_lllite(attach_lllite(other.unet), other.unet, tmp_path / "kohya.safetensors")
    with pytest.raises(InputError, match="kohya.safetensors"):
        train(data, tmp_path / "run", "--max-steps", 1, "--resume-path", tmp_path / "kohya.safetensors")


def test_an_unreadable_validation_image_is_refused_before_training(data, tmp_path):
    """--validation-image is read when the run starts, not at its first image log: a text file is named at once."""
    (tmp_path / "hint.png").write_text("not an image")
    with pytest.raises(InputError, match=r"--validation-image .*hint\.png cannot be read"):
        train(data, tmp_path / "run", "--max-steps", 1, "--validation-prompt", "a red circle",
              "--validation-image", tmp_path / "hint.png")
    assert not (tmp_path / "run").exists()


def test_data_far_larger_than_the_base_is_refused_up_front(tmp_path):
    """512 px pairs on the 64 px tiny-SD-sized base would train for minutes on a useless size: refused, named."""
    from tinylllite.data.fill50k import write_fill50k

    big = tmp_path / "fill50k_512"
    write_fill50k(big, n=2, size=512, seed=0, workers=1)
    with pytest.raises(InputError, match=r"--data .*fill50k_512.* resize"):
        train(big, tmp_path / "run", "--max-steps", 1)


def test_the_loop_stops_early_enough_for_a_whole_final_evaluation_and_the_checkpoint():
    """The time the loop keeps for the end: the slowest evaluation and image log so far, a quarter more, and
    the checkpoint's reserve (a final evaluation cut short would score fewer pairs than the run's setting)."""
    from tinylllite.run import image_log

    log = image_log.RunLog.__new__(image_log.RunLog)
    log.evaluation_seconds, log.image_seconds = 8.0, 2.0
    assert log.final_seconds == image_log.FINAL_MARGIN * 10.0 + image_log.SAVE_RESERVE_SECONDS
    assert image_log.FINAL_MARGIN > 1 and image_log.SAVE_RESERVE_SECONDS > 0
