"""The convergence lab (bench/convergence.py): its variants are real command lines, its thresholds read right.

The lab's runs take minutes each; here only what they are built from is checked: every named variant is
a flag set `tutorial_train.py` accepts, and the first crossing of a threshold is read from a run's
metrics.jsonl as the lab reports it ("not reached" as None).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import convergence  # noqa: E402
import tutorial_train  # noqa: E402


@pytest.mark.parametrize("name", list(convergence.VARIANTS))
def test_every_lab_variant_is_a_command_line_tutorial_train_accepts(name):
    """The variant's flags, with the lab's speed flags, parse; the plain-MSE variants really turn Min-SNR off."""
    branch, flags, _ = convergence.VARIANTS[name]
    args = tutorial_train.parse_args(["--control", branch, *convergence.LAB_SPEED, *flags])
    settings, preset = tutorial_train.resolve_settings(args, tiny=True)

    assert preset is None and settings["threads"] == 1 and settings["cache"] is False
    assert settings["snr_gamma"] == (0.0 if flags[:2] == convergence.MSE else 5.0)


def test_the_first_crossing_is_the_first_evaluation_at_or_above_the_threshold():
    """Steps and samples of the first evaluation with IoU >= the threshold; loss lines are ignored."""
    events = [{"step": 0, "minutes": 0.3, "fidelity_iou": 0.30}, {"step": 10, "loss": 0.02},
              {"step": 200, "minutes": 2.0, "fidelity_iou": 0.50}, {"step": 400, "minutes": 4.0, "fidelity_iou": 0.81}]

    assert convergence.first_crossing(events, 0.5, batch=16) == dict(step=200, samples=3200, minutes=2.0)
    assert convergence.first_crossing(events, 0.8, batch=8) == dict(step=400, samples=3200, minutes=4.0)
    assert convergence.first_crossing(events, 0.9, batch=16) is None
