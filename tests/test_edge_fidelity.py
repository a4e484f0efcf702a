"""Edge F1, the control-fidelity number for a user's own Canny data: true images score high, wrong ones low."""
import numpy as np
import pytest

from tinylllite.data.canny import canny
from tinylllite.data.edge_fidelity import dilate, edge_f1, sample_edge_f1


def shapes_image(size: int = 64) -> np.ndarray:
    """A grey square and a bright disc on a dark background: an image with clear edges."""
    y, x = np.mgrid[:size, :size]
    image = np.full((size, size, 3), 30, np.uint8)
    image[10:30, 8:28] = 140
    image[(y - 42) ** 2 + (x - 40) ** 2 < 12 ** 2] = 230
    return image


def test_the_image_that_made_the_hint_scores_one():
    """The detector run again with the same thresholds on the source image finds exactly the hint's edges."""
    image = shapes_image()
    assert sample_edge_f1(image, canny(image, 100, 200), 100, 200) == 1.0


def test_a_blank_sample_scores_zero():
    """An image without edges has none of the hint's edges."""
    image = shapes_image()
    assert sample_edge_f1(np.full_like(image, 128), canny(image)) == 0.0


def test_a_shifted_sample_scores_low():
    """The same shapes 6 px to the side share few edge pixels with the hint, even with 1 px tolerance."""
    image = shapes_image()
    assert sample_edge_f1(np.roll(image, 6, axis=1), canny(image)) < 0.3


def test_a_one_pixel_shift_is_forgiven_only_with_tolerance():
    """A 1 px shift keeps F1 high at tolerance 1 and lowers it sharply at tolerance 0 (ControlNet++'s protocol)."""
    edges = canny(shapes_image())[..., 0] > 0
    moved = np.roll(edges, 1, axis=0)
    assert edge_f1(edges, moved, tolerance=1) > 0.95
    assert edge_f1(edges, moved, tolerance=0) < 0.6


def test_dilation_grows_a_pixel_into_its_square_neighbourhood():
    """dilate by 1 turns one pixel into a 3 x 3 block."""
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 1)[1:4, 1:4].all()


def test_images_of_different_sizes_are_refused():
    """A sample and a hint of different sizes cannot be compared pixel by pixel."""
    with pytest.raises(ValueError, match="differ in size"):
        sample_edge_f1(np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
