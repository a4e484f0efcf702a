"""tutorial_train.py as a user meets it: the config block it runs, presets, flags, and the run folder it writes."""
import json

import pytest
from test_training import tiny_fill50k, train
from tiny_models import tiny_base

import tutorial_train
from tinylllite import image_log, stopping
from tinylllite.errors import InputError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fill50k(tmp_path_factory.mktemp("data") / "fill50k_64")


@pytest.mark.parametrize("control, block", [("controlnet", tutorial_train.CONTROLNET), ("lllite", tutorial_train.LLLITE)])
def test_the_default_run_records_exactly_the_config_block_at_the_top(control, block, tmp_path, monkeypatch):
    """`python tutorial_train.py [--control lllite]` writes config.json whose settings are the top block, unchanged."""
    from tinylllite import fill50k
    from tinylllite.tiny_sd import load_tiny_sd

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
    (["--validation-prompt", "a red circle"], "--validation-image"),
])
def test_bad_flags_are_refused_where_they_are_parsed(flags, named, capsys):
    """Counts below 1, numbers out of range, a misspelt true/false and an unpaired validation prompt exit 2 naming the flag."""
    with pytest.raises(SystemExit) as stopped:
        tutorial_train.parse_args(flags)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
