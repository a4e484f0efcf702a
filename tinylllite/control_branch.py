"""One call that runs the UNet with whichever control branch is attached: ControlNet, LLLite or none.

Training (`training.py`) and sampling (`sample.py`) both need "the noise prediction of the base UNet
under this control at this strength", and the two branches reach the UNet differently:

- ControlNet (`controlnet.py`) is a separate network; its residuals are passed into the UNet by
  `controlled_unet_forward` (SPEC §2).
- LLLite (`lllite_unet.py`) lives inside the UNet's attention projections; it is told the
  conditioning image with `set_conditioning` and scaled with its `multiplier` (SPEC §5).

This file is only that switch, so the training loop and the sampler read the same for both. It
leaves out everything a branch does internally.
"""
from contextlib import contextmanager

import torch

from tinylllite.base import StableDiffusionBase


def control_kind(control) -> str | None:
    """"controlnet", "lllite" or None, from what the object can do (no import of either module)."""
    if control is None:
        return None
    if hasattr(control, "set_conditioning") and hasattr(control, "multiplier"):
        return "lllite"
    if hasattr(control, "controlnet_cond_embedding"):
        return "controlnet"
    raise TypeError(f"{type(control).__name__} is neither a ControlNet (controlnet.py) nor an LLLite (lllite_unet.py)")


@contextmanager
def lllite_setting(lllite, multiplier: float, enabled: bool = True):
    """Temporarily set an LLLite's multiplier and on/off switch; restores the caller's values after."""
    saved = (lllite.multiplier, lllite.enabled)
    lllite.multiplier, lllite.enabled = multiplier, enabled
    try:
        yield lllite
    finally:
        lllite.multiplier, lllite.enabled = saved


def unet_prediction(base: StableDiffusionBase, control, latents: torch.Tensor, timesteps: torch.Tensor,
                    hidden: torch.Tensor, added_cond_kwargs: dict | None = None, hint: torch.Tensor | None = None,
                    strength: float = 1.0, scales: list[float] | None = None, only_mid_control: bool = False,
                    lllite_multiplier: float = 1.0) -> torch.Tensor:
    """The UNet's output for noisy `latents` (B, 4, h, w) with `control` applied at `strength`.

    hint: (B, 3, H, W) in [0, 1], H = h * vae factor. strength 0 (or control None) is the plain base:
    the branch is not run at all, so "no control" is exactly the base model, not a near-zero residual.
    scales: ControlNet's per-residual multipliers (guess mode's ramp), None = all 1.
    """
    kind = control_kind(control)
    if kind is None or strength == 0.0:
        if kind == "lllite":
            with lllite_setting(control, control.multiplier, enabled=False):
                return base.unet(latents, timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
        return base.unet(latents, timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
    if kind == "controlnet":
        if hint is None:
            raise ValueError("a ControlNet needs a hint image (B, 3, H, W) in [0, 1]; got hint=None")
        from tinylllite.controlnet import controlled_unet_forward

        residuals = control(latents, timesteps, hidden, hint, added_cond_kwargs=added_cond_kwargs)
        return controlled_unet_forward(base.unet, latents, timesteps, hidden, residuals.scaled(scales, strength),
                                       only_mid_control=only_mid_control, added_cond_kwargs=added_cond_kwargs)
    # LLLite: a hint is embedded here and read by every wrapped layer; hint=None reuses the embedding set
    # before (a sampler embeds once for all its timesteps; without one, the wrapped layers raise).
    if hint is not None:
        control.set_conditioning(hint)
    with lllite_setting(control, lllite_multiplier * strength, enabled=True):
        return base.unet(latents, timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
