"""Checkpoints: resume reproduces the uninterrupted run, saves are atomic, only trained weights, last K kept."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import tiny_fill50k, train
from tiny_models import tiny_base

from tinylllite.files import checkpoint
from tinylllite.controlnet import ControlNet, set_trainable

REPO = Path(__file__).resolve().parent.parent
TRAIN_IN_SUBPROCESS = ("import sys; sys.path[:0] = ['tests', '.']; from tiny_models import tiny_base; "
                       "import tutorial_train; tutorial_train.main(sys.argv[1:], base=tiny_base())")



def losses(run: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if "loss" in e}


def test_a_run_stopped_at_step_2_and_resumed_gives_the_uninterrupted_losses(tmp_path):
    """A subprocess stopped after step 2 (its checkpoint on disk), resumed, logs the same losses for steps 3 and 4."""
    data = tiny_fill50k(tmp_path / "fill50k_64")
    common = ["--batch-size", 2, "--checkpoint-every", 1000]
    train(data, tmp_path / "whole", "--max-steps", 4, *common)
    argv = ["--data", data, "--out", tmp_path / "parts", "--logger-freq", 0, "--eval-every", 0, "--log-every", 1,
            "--max-steps", 2, "--threads", 1, *common]
    subprocess.run([sys.executable, "-c", TRAIN_IN_SUBPROCESS, *map(str, argv)], cwd=REPO, check=True,
                   capture_output=True)
    assert [p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()] == ["step_0000002"]
    train(data, tmp_path / "parts", "--max-steps", 4, "--resume-from", tmp_path / "parts", *common)
    whole, parts = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert sorted(parts) == [1, 2, 3, 4]
    assert [parts[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]


def fake_weights(value: float) -> dict:
    return {"control": {"w": torch.full((3,), value)}}


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """If writing step 2 dies after its weights, step 1 is still the newest complete, loadable checkpoint."""
    checkpoint.save_checkpoint(tmp_path, 1, fake_weights(1.0), {"step": 1})

    def die(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.torch, "save", die)
        with pytest.raises(OSError, match="simulated"):
            checkpoint.save_checkpoint(tmp_path, 2, fake_weights(2.0), {"step": 2})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000001"]
    weights, state = checkpoint.load_checkpoint(tmp_path)
    assert state == {"step": 1} and torch.equal(weights["control"]["w"], torch.ones(3))
    checkpoint.save_checkpoint(tmp_path, 2, fake_weights(2.0), {"step": 2})  # the half-written folder is replaced
    assert checkpoint.load_checkpoint(tmp_path)[1] == {"step": 2}


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    """keep_last=2 leaves the two newest step folders."""
    for step in range(1, 5):
        checkpoint.save_checkpoint(tmp_path, step, fake_weights(step), {"step": step}, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_checkpoints_hold_only_the_trained_weights():
    """Locked: the ControlNet alone, in diffusers' keys; unlocked: plus exactly the UNet decoder."""
    base = tiny_base()
    control = ControlNet.from_unet(base.unet)
    set_trainable(base.unet, control, sd_locked=True)
    locked = checkpoint.trainable_weights(base, control)
    assert list(locked) == ["control"] and locked["control"].keys() == control.state_dict().keys()
    set_trainable(base.unet, control, sd_locked=False)
    decoder = checkpoint.trainable_weights(base, control)["unet_decoder"]
    assert decoder and all(k.startswith(("up_blocks.", "conv_norm_out.", "conv_out.")) for k in decoder)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_failed_save_leaves_no_tmp_folder_and_names_the_checkpoint(tmp_path, monkeypatch, writer):
    """Disk full in either writer: no step_N.tmp/ is left, the error names step_N, step 1 still loads."""
    from safetensors import SafetensorError

    from tinylllite.files import state_dicts

    checkpoint.save_checkpoint(tmp_path, 1, fake_weights(1.0), {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device") if writer == "torch.save" else SafetensorError("IoError")

    target = (checkpoint.torch, "save") if writer == "torch.save" else (state_dicts, "save_file")
    with monkeypatch.context() as patch:
        patch.setattr(*target, disk_full)
        with pytest.raises(OSError, match=r"step_0000002 .*step_0000001 is intact"):
            checkpoint.save_checkpoint(tmp_path, 2, fake_weights(2.0), {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    assert checkpoint.load_checkpoint(tmp_path)[1] == {"step": 1}
