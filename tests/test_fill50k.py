"""The Fill50K generator reproduces the real files' format facts and is deterministic per item."""
import json
from pathlib import Path

import numpy as np
import pytest

from tinylllite.data import fill50k
from tinylllite.errors import InputError
from tinylllite.data.fill50k import COLOURS, draw_parameters, make_pair, prompt_for, write_fill50k

FIXTURES = Path(__file__).parent / "fixtures"


def distances(pair):
    """(S, S) distance of every pixel centre to the pair's circle centre."""
    ys, xs = np.mgrid[0:pair.source.shape[0], 0:pair.source.shape[1]]
    return np.hypot(xs - pair.centre[0], ys - pair.centre[1])


def test_colours_are_the_140_reference_names_with_exact_rgb():
    """COLOURS equals the reference table name for name and value for value."""
    reference = json.loads((FIXTURES / "fill50k_colours.json").read_text())["colours"]
    assert len(COLOURS) == 140
    assert COLOURS == {name: tuple(rgb) for name, rgb in reference.items()}
    assert "gray" in COLOURS and "grey" not in COLOURS and "burly wood" in COLOURS


def test_prompt_template_is_exact():
    """The caption reads like the real item 1234: lowercase, no article, no period."""
    assert prompt_for("burly wood", "orange") == "burly wood circle with orange background"


def test_source_is_a_pure_white_ring_over_radii_r_minus_2_to_r_plus_2():
    """At 512 px the white pixels are exactly those whose rounded distance is r-2 .. r+2."""
    pair = make_pair(0, 7)
    assert pair.source.shape == (512, 512, 3) and pair.source.dtype == np.uint8
    assert set(np.unique(pair.source)) == {0, 255}
    rounded = np.round(distances(pair))
    expected = (rounded >= pair.radius - 2) & (rounded <= pair.radius + 2)
    assert np.array_equal(pair.source.all(axis=2), expected)
    assert np.array_equal(pair.source.any(axis=2), expected)  # pure white or pure black


def test_target_is_a_flat_disc_of_the_circle_colour_without_outline():
    """Disc pixels (rounded distance <= r) have the circle colour, every other pixel the background's."""
    pair = make_pair(0, 3)
    disc = np.round(distances(pair)) <= pair.radius
    expected = np.where(disc[..., None], COLOURS[pair.circle], COLOURS[pair.background])
    assert np.array_equal(pair.target, expected.astype(np.uint8))
    assert pair.prompt == prompt_for(pair.circle, pair.background)


def test_circle_parameters_cover_the_spec_ranges_roughly_uniformly():
    """Radius in [64, 256], centre in [96, 416], integers, means mid-range, about half clipped."""
    draws = [draw_parameters(0, i) for i in range(4000)]
    radius, x, y = (np.array([d[k] for d in draws]) for k in range(3))
    assert radius.min() == 64 and radius.max() == 256 and abs(radius.mean() - 160) < 5
    for centre in (x, y):
        assert centre.min() == 96 and centre.max() == 416 and abs(centre.mean() - 256) < 8
        assert abs(np.mean(centre < 256) - 0.5) < 0.05
    clipped = (x - radius - 2 < 0) | (x + radius + 2 > 511) | (y - radius - 2 < 0) | (y + radius + 2 > 511)
    assert 0.4 < clipped.mean() < 0.7
    circles, backgrounds = [d[3] for d in draws], [d[4] for d in draws]
    assert len(set(circles)) > 130 and len(set(backgrounds)) > 130
    same = np.mean([c == b for c, b in zip(circles, backgrounds)])
    assert same < 0.01  # independent draws: 1/140 on average


def test_item_depends_only_on_seed_and_index():
    """The same (seed, index) draws the same pair; another seed draws another."""
    first, again, other = make_pair(3, 11, 64), make_pair(3, 11, 64), make_pair(4, 11, 64)
    assert np.array_equal(first.target, again.target) and first.prompt == again.prompt
    assert (first.prompt, first.centre) != (other.prompt, other.centre)


def test_smaller_sizes_scale_the_circle_and_keep_a_ring():
    """At 64 px the disc matches the 512 px disc sampled every 8 pixels and the ring is a closed line."""
    big, small = make_pair(0, 5, 512), make_pair(0, 5, 64)
    assert small.prompt == big.prompt and small.radius == big.radius / 8
    big_disc = (big.target == COLOURS[big.circle]).all(2)[4::8, 4::8]  # (64, 64) samples
    small_disc = (small.target == COLOURS[small.circle]).all(2)
    assert np.mean(big_disc == small_disc) > 0.97
    ring = small.source.all(2)
    inside = distances(small) < small.radius
    # Every visible row that crosses the circle's interior meets the ring.
    rows = [row for row in range(64) if inside[row].any()]
    assert all(ring[row].any() for row in rows)


def test_prompt_json_is_json_lines_with_keys_source_target_prompt_in_order(tmp_path):
    """prompt.json holds one object per line, in Fill50K's key order and spelling."""
    write_fill50k(tmp_path / "fill50k", 4, size=32, workers=1)
    lines = (tmp_path / "fill50k" / "prompt.json").read_text().splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        item = json.loads(line)
        assert list(item) == ["source", "target", "prompt"]
        assert line.startswith(f'{{"source": "source/{i}.png", "target": "target/{i}.png", "prompt": "')
        assert item["prompt"] == make_pair(0, i, 32).prompt
        assert (tmp_path / "fill50k" / item["source"]).is_file()


def test_written_set_is_the_same_whatever_n_and_worker_count(tmp_path):
    """Item i has the same prompt and bytes with n=3 in one process and n=5 in two."""
    write_fill50k(tmp_path / "a", 3, size=32, seed=2, workers=1)
    write_fill50k(tmp_path / "b", 5, size=32, seed=2, workers=2)
    a_lines = (tmp_path / "a" / "prompt.json").read_text().splitlines()
    b_lines = (tmp_path / "b" / "prompt.json").read_text().splitlines()
    assert a_lines == b_lines[:3]
    for i in range(3):
        for folder in ("source", "target"):
            assert (tmp_path / "a" / folder / f"{i}.png").read_bytes() == \
                (tmp_path / "b" / folder / f"{i}.png").read_bytes()


def test_write_fill50k_refuses_a_non_empty_output_folder(tmp_path):
    """Writing over an existing set is refused with a message naming the folder."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists and is not empty"):
        write_fill50k(tmp_path / "out", 2, size=32, workers=1)


def test_an_interrupted_write_leaves_no_complete_looking_set(tmp_path, monkeypatch):
    """A run that dies half way leaves no output folder and no prompt.json."""
    real = fill50k.make_pair

    def dies_at_item_2(seed, index, size):
        if index == 2:
            raise KeyboardInterrupt
        return real(seed, index, size)

    monkeypatch.setattr(fill50k, "make_pair", dies_at_item_2)
    with pytest.raises(KeyboardInterrupt):
        write_fill50k(tmp_path / "out", 4, size=32, workers=1)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("prompt.json"))


def test_tiny_sizes_are_refused():
    """A size below 8 pixels raises a message naming the size."""
    with pytest.raises(ValueError, match="at least 8 pixels, got 4"):
        make_pair(0, 0, 4)
