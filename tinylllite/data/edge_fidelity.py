"""Control fidelity for the user's own edge data: does the sample have the hint's edges?

Fill50K has its disc IoU (`fidelity.py`). For a Canny dataset of one's own, the question "does the
image follow the condition?" is answered as ControlNet++ (Li et al. 2024, Sec. 4) answers it: run the
same edge detector, with the same thresholds that made the hints, on the generated image, and compare
the two edge maps with an F1 score. ControlNet++ counts a pixel as matched only at the same place (no
tolerance). Here a predicted edge pixel also counts when a hint edge lies within `tolerance` pixels
(default 1), and the other way round: at the small sizes a CPU run samples (64 px) a one-pixel shift
from the VAE would otherwise decide the score. `tolerance=0` gives ControlNet++'s protocol.

A pure metric: the evaluation loop that samples the images is `tinylllite.run.image_log.evaluate`.
Left out: other detectors (HED, depth); the hint is taken as given, white edges on black.
"""
import numpy as np

from tinylllite.data.canny import canny


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Boolean (H, W) grown by `radius` pixels in the 8-neighbourhood (a square structuring element)."""
    grown = mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[dy:dy + h, dx:dx + w]
    return grown


def edge_f1(reference: np.ndarray, predicted: np.ndarray, tolerance: int = 1) -> float:
    """F1 of two boolean (H, W) edge maps; a pixel matches if the other map has an edge within `tolerance`."""
    if not reference.any() and not predicted.any():
        return 1.0  # nothing to draw, nothing drawn
    if not reference.any() or not predicted.any():
        return 0.0
    precision = (predicted & dilate(reference, tolerance)).sum() / predicted.sum()
    recall = (reference & dilate(predicted, tolerance)).sum() / reference.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def hint_edges(hint: np.ndarray) -> np.ndarray:
    """A Canny hint (H, W, 3) uint8, white on black -> boolean (H, W)."""
    return hint.mean(axis=-1) > 127


def sample_edge_f1(image: np.ndarray, hint: np.ndarray, low: float = 100, high: float = 200,
                   tolerance: int = 1) -> float:
    """Edges found again in a generated (H, W, 3) uint8 image, with the hint's thresholds, against the hint."""
    if image.shape != hint.shape:
        raise ValueError(f"image {image.shape} and hint {hint.shape} differ in size")
    return edge_f1(hint_edges(hint), hint_edges(canny(image, low, high)), tolerance)

