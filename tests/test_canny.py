"""The numpy Canny finds thin edges where they are, and a folder becomes kohya-style training data."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tinylllite.data.canny import canny, canny_folder, png_prompt
from tinylllite.data.fill50k import make_pair


def test_a_vertical_step_gives_a_one_pixel_wide_white_line():
    """A dark-to-bright step yields exactly one white column at the step, black elsewhere."""
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 200
    edges = canny(image)
    assert edges.shape == (32, 32, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    columns = np.nonzero(edges[:, :, 0].any(axis=0))[0]
    assert len(columns) == 1 and columns[0] in (15, 16)
    assert edges[:, columns[0], 0].all()


def test_a_weak_step_below_the_low_threshold_gives_no_edge():
    """A step of 20 grey levels stays under the 100 / 200 thresholds."""
    image = np.zeros((32, 32), np.uint8)
    image[:, 16:] = 20
    assert canny(image).max() == 0


def test_edges_of_a_fill50k_disc_trace_its_circle():
    """On a Fill50K target every edge pixel lies within 1.5 px of the circle."""
    pair = make_pair(0, 2, 256)
    ys, xs = np.nonzero(canny(pair.target)[:, :, 0])
    distance = np.hypot(xs - pair.centre[0], ys - pair.centre[1])
    assert len(xs) > pair.radius  # more than a sixth of the circumference
    assert np.abs(distance - pair.radius).max() < 1.5


def test_hysteresis_keeps_weak_edges_only_when_connected_to_strong_ones():
    """A step fading from strong to weak is kept whole; the same weak step alone is dropped."""
    image = np.full((32, 32), 250, np.uint8)
    image[:, :16] = np.linspace(0, 180, 32)[:, None].astype(np.uint8)  # step 250 at the top, 70 below
    strong_only = canny(image, low=600, high=600)[:, :, 0].any(axis=1)
    assert strong_only[:4].all() and not strong_only[16:].any()
    assert canny(image, low=150, high=600)[:, :, 0].any(axis=1).all()
    image[:, :16] = 180  # only the weak step
    assert canny(image, low=150, high=600).max() == 0


def test_thresholds_out_of_order_are_refused():
    """low > high raises a message naming both."""
    with pytest.raises(ValueError, match="low=200, high=100"):
        canny(np.zeros((8, 8), np.uint8), low=200, high=100)


def make_images(folder, with_prompt=True):
    folder.mkdir()
    for i in range(2):
        info = PngInfo()
        if with_prompt or i == 0:
            info.add_text("prompt", f"a photo number {i}")
        Image.fromarray(make_pair(0, i, 64).target).save(folder / f"img{i}.png", pnginfo=info)


def test_canny_folder_writes_edge_maps_and_captions_from_png_prompts(tmp_path):
    """Every image gets <name>.png edges and, from its PNG prompt, <name>.txt beside it."""
    make_images(tmp_path / "images")
    done = canny_folder(tmp_path / "images", tmp_path / "cond")
    assert done == dict(images=2, captions_written=2, without_caption=[])
    assert (tmp_path / "images" / "img1.txt").read_text() == "a photo number 1\n"
    edges = np.asarray(Image.open(tmp_path / "cond" / "img1.png"))
    assert edges.shape == (64, 64, 3) and edges.max() == 255
    assert png_prompt(tmp_path / "images" / "img0.png") == "a photo number 0"


def test_images_without_prompt_or_caption_are_reported(tmp_path):
    """An image with no PNG prompt and no caption is named in the result."""
    make_images(tmp_path / "images", with_prompt=False)
    done = canny_folder(tmp_path / "images", tmp_path / "cond", random_thresholds=True, seed=3)
    assert done["without_caption"] == ["img1.png"] and done["captions_written"] == 1


def test_canny_command_runs_and_reports(tmp_path):
    """`python -m tinylllite.canny IMAGES COND` prints what it wrote."""
    make_images(tmp_path / "images")
    result = subprocess.run([sys.executable, "-m", "tinylllite.canny", str(tmp_path / "images"),
                             str(tmp_path / "cond")], capture_output=True, text=True, check=True)
    assert "2 edge maps" in result.stdout and "2 captions" in result.stdout
