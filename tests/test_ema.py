"""--ema-decay: an exponential moving average of the trained weights, evaluated and exported (run/ema.py)."""
import pytest
import torch
from safetensors import safe_open
from test_training import tiny_fill50k, train

from tinylllite.files import checkpoint
from tinylllite.run.ema import WeightAverage


def test_the_average_moves_toward_the_weights_by_one_minus_the_warmed_up_decay():
    """avg += (1 - d)(w - avg) with d = min(decay, (1 + n) / (10 + n)): 0.1 at the first update, then rising."""
    w = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([w], decay=0.999)
    with torch.no_grad():
        w.fill_(1.0)
    average.update()  # d = 1/10
    torch.testing.assert_close(average.average[0], torch.full((3,), 0.9))
    average.update()  # d = 2/11
    torch.testing.assert_close(average.average[0], torch.full((3,), 0.9 + (1 - 2 / 11) * 0.1))


def test_applied_swaps_the_average_in_and_the_trained_weights_back():
    w = torch.nn.Parameter(torch.ones(2))
    average = WeightAverage([w], decay=0.5)
    average.average = [torch.zeros(2)]
    with average.applied():
        assert torch.equal(w.detach(), torch.zeros(2))
    assert torch.equal(w.detach(), torch.ones(2))


def test_a_decay_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        WeightAverage([torch.nn.Parameter(torch.zeros(1))], decay=1.0)


def control_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "control.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_a_run_with_ema_exports_the_average_and_resumes_training_the_trained_weights(tmp_path):
    """The checkpoint's control file is the average (its metadata says so); the run's trained weights are in
    training_state.pt; a run stopped at step 2 and resumed ends where the uninterrupted run ends, both sets."""
    data = tiny_fill50k(tmp_path / "fill50k_64")
    common = ["--batch-size", 2, "--checkpoint-every", 2, "--ema-decay", 0.9, "--keep-checkpoints", 5]
    whole = train(data, tmp_path / "whole", "--max-steps", 4, *common)
    train(data, tmp_path / "parts", "--max-steps", 2, *common)
    parts = train(data, tmp_path / "parts", "--max-steps", 4, "--resume-from", tmp_path / "parts", *common)

    saved, metadata = control_tensors(tmp_path / "whole" / "checkpoints" / "step_0000004")
    assert metadata["weights"] == "exponential moving average, decay 0.9"
    trained = {k: v.detach() for k, v in whole["control"].state_dict().items()}
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)  # the file is not the trained weights
    state = checkpoint.load_training_state(tmp_path / "whole" / "checkpoints" / "step_0000004" / checkpoint.STATE_FILE)
    assert state["ema"]["updates"] == 4
    resumed, _ = control_tensors(tmp_path / "parts" / "checkpoints" / "step_0000004")
    for k in saved:
        torch.testing.assert_close(resumed[k], saved[k], rtol=1e-5, atol=1e-7)
    for k, v in parts["control"].state_dict().items():
        torch.testing.assert_close(v.detach(), trained[k], rtol=1e-5, atol=1e-7)
