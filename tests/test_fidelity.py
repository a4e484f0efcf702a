"""The Fill50K fidelity metric is sane: truth scores high, wrong discs low, tints only cost colour."""
import numpy as np
import pytest

from tinylllite.data.fidelity import (chance_colour_error, distinguishable, evaluation_pairs, fill50k_fidelity,
                                 fit_circle, prompt_colours)
from tinylllite.data.fill50k import COLOURS, make_pair


def swapped_colours(pair):
    """The target with circle and background colours exchanged."""
    disc = (pair.target == COLOURS[pair.circle]).all(axis=2, keepdims=True)
    return np.where(disc, COLOURS[pair.background], COLOURS[pair.circle]).astype(np.uint8)


@pytest.mark.parametrize("size, count", [(64, 120), (512, 4)])
def test_ground_truth_targets_score_iou_at_least_098_and_no_colour_error(size, count):
    """Every true target, clipped circles included, scores IoU >= 0.98 and colour error 0."""
    for pair in evaluation_pairs(count, size):
        score = fill50k_fidelity(pair.target, pair.source, pair.prompt)
        assert score["iou"] >= 0.98, (pair.prompt, pair.centre, pair.radius)
        assert score["colour_error"] == 0.0


@pytest.mark.parametrize("size", [64, 512])
def test_a_disc_shifted_by_its_radius_scores_low_iou(size):
    """Moving the right disc by one radius keeps its colours but drops IoU below 0.5."""
    for pair in evaluation_pairs(3, size):
        shift = int(round(pair.radius))
        moved = np.roll(pair.target, shift, axis=1)
        moved[:, :shift] = COLOURS[pair.background]  # no wrap-around of the disc
        score = fill50k_fidelity(moved, pair.source, pair.prompt)
        assert score["iou"] < 0.5 and score["colour_error"] < 1.0


@pytest.mark.parametrize("size", [64, 512])
def test_a_colour_swapped_disc_scores_low_iou(size):
    """The right shape in swapped colours is not credited: the prompt decides which colour is the circle."""
    for pair in evaluation_pairs(3, size):
        score = fill50k_fidelity(swapped_colours(pair), pair.source, pair.prompt)
        assert score["iou"] < 0.05


@pytest.mark.parametrize("size", [64, 512])
def test_a_slightly_tinted_noisy_correct_disc_scores_high_iou(size):
    """A tint of (+20, -15, +10) plus pixel noise keeps IoU >= 0.95; the colour error shows the tint."""
    rng = np.random.default_rng(0)
    for pair in evaluation_pairs(4, size):
        noisy = pair.target + np.array([20, -15, 10]) + rng.normal(0, 8, pair.target.shape)
        score = fill50k_fidelity(np.clip(noisy, 0, 255).astype(np.uint8), pair.source, pair.prompt)
        assert score["iou"] >= 0.95
        assert 10 < score["colour_error"] < 40


def test_colour_error_does_not_depend_on_where_the_disc_is():
    """The same colours drawn anywhere give the same colour error."""
    pair, elsewhere = make_pair(0, 1, 64), make_pair(5, 1, 64)
    moved = np.where((elsewhere.target == COLOURS[elsewhere.circle]).all(2, keepdims=True),
                     COLOURS[pair.circle], COLOURS[pair.background]).astype(np.uint8)
    assert fill50k_fidelity(moved, pair.source, pair.prompt)["colour_error"] == 0.0


def test_wrong_colours_score_near_chance_and_chance_is_about_163():
    """Random colour pairs sit near the simulated chance level, far above a tinted image's error."""
    chance = chance_colour_error(samples=20_000)
    assert 150 < chance < 175
    names = list(COLOURS)
    rng = np.random.default_rng(1)
    errors = []
    for pair in evaluation_pairs(20, 64):
        circle, background = (COLOURS[names[i]] for i in rng.integers(len(names), size=2))
        disc = (pair.target == COLOURS[pair.circle]).all(2, keepdims=True)
        recoloured = np.where(disc, circle, background).astype(np.uint8)
        errors.append(fill50k_fidelity(recoloured, pair.source, pair.prompt)["colour_error"])
    assert np.mean(errors) > 80


def test_circle_fit_recovers_a_clipped_outline():
    """A ring mostly outside the image still gives its centre and radius within half a pixel."""
    pairs = (make_pair(0, i, 512) for i in range(200))
    pair = next(p for p in pairs if p.centre[0] - p.radius < -100)  # clipped on the left
    x, y, r = fit_circle(pair.source)
    assert abs(x - pair.centre[0]) < 0.5 and abs(y - pair.centre[1]) < 0.5 and abs(r - pair.radius) < 0.5


def test_close_colour_pairs_are_left_out_of_evaluation():
    """Colours under 60 apart are not distinguishable; far apart ones are."""
    assert not distinguishable("white circle with snow background")
    assert distinguishable("black circle with white background")


def test_evaluation_pairs_are_held_out_and_distinguishable():
    """evaluation_pairs gives n pairs, none closer than 60 in colour, drawn from a seed other than 0."""
    pairs = evaluation_pairs(30, size=32)
    assert len(pairs) == 30 and all(distinguishable(p.prompt) for p in pairs)
    assert pairs[0].prompt != make_pair(0, 0, 32).prompt


def test_bad_inputs_are_refused_with_a_message():
    """Malformed prompts, unknown colours, empty outlines and mismatched shapes raise clear errors."""
    pair = make_pair(0, 0, 64)
    with pytest.raises(ValueError, match="not of the form"):
        prompt_colours("a red circle")
    with pytest.raises(ValueError, match="unknown colour name"):
        prompt_colours("blurple circle with white background")
    with pytest.raises(ValueError, match="no circle outline"):
        fill50k_fidelity(pair.target, np.zeros_like(pair.source), pair.prompt)
    with pytest.raises(ValueError, match="must both be"):
        fill50k_fidelity(pair.target[:32], pair.source, pair.prompt)
