"""The one switch between the two control branches: ControlNet, LLLite, or none.

Training, sampling and checkpoints all need the same few answers from "the branch", and the two
branches give them differently:

- ControlNet (`controlnet.py`, the paper's sec. 3.2) is a separate network: its residuals enter the
  UNet through `controlled_unet_forward`, its state dict has diffusers' ControlNetModel keys, and
  `sd_locked=False` may unlock the UNet decoder as well (lllyasviel/ControlNet `cldm.py`,
  `ControlLDM.configure_optimizers`).
- LLLite (`lllite_unet.py`, kohya's `networks/control_net_lllite.py`) lives inside the UNet's
  attention projections: it is told the conditioning image with `set_conditioning`, scaled with its
  `multiplier`, and saved under kohya's `lllite_unet_*` keys.

Every question is asked here, by type (`isinstance`), so no other file names the kinds and a third
branch would be added in this file only. Left out: everything a branch does internally.
"""
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.controlnet import ControlNet, controlled_unet_forward
from tinylllite.controlnet import guess_mode_scales as logspace_scales
from tinylllite.controlnet import set_trainable as controlnet_set_trainable
from tinylllite.lllite_unet import LLLite, attach_lllite
from tinylllite.lllite_unet import set_trainable as lllite_set_trainable


KINDS = ("controlnet", "lllite")


def build(kind: str, base: StableDiffusionBase, cond_emb_dim: int = 32, mlp_dim: int = 64,
          lllite_blocks: str | None = None):
    """A fresh branch of `kind` on `base`: a ControlNet copied from its UNet's encoder, or LLLite modules attached
    to the UNet ("input,middle,output" names the blocks; None = kohya's default set)."""
    if kind == "controlnet":
        return ControlNet.from_unet(base.unet, vae_scale_factor=base.vae_scale_factor)
    if kind == "lllite":
        blocks = set(lllite_blocks.split(",")) if lllite_blocks else None
        return attach_lllite(base.unet, cond_emb_dim, mlp_dim, blocks, vae_scale_factor=base.vae_scale_factor)
    raise ValueError(f"unknown control branch {kind!r}; one of {KINDS}")


def control_kind(control) -> str | None:
    """"controlnet", "lllite", or None for no branch."""
    if control is None:
        return None
    if isinstance(control, ControlNet):
        return "controlnet"
    if isinstance(control, LLLite):
        return "lllite"
    raise TypeError(f"{type(control).__name__} is neither a ControlNet (controlnet.py) nor an LLLite (lllite_unet.py)")


def set_trainable(unet, control, sd_locked: bool = True) -> list[torch.nn.Parameter]:
    """Freeze the UNet, unfreeze exactly the branch (and, for a ControlNet with sd_locked=False, the decoder).

    Returns the parameters to hand to the optimizer.
    """
    if control_kind(control) == "controlnet":
        return controlnet_set_trainable(unet, control, sd_locked)
    if not sd_locked:
        raise ValueError("sd_locked=False unlocks the UNet decoder for a ControlNet; LLLite trains only its modules")
    return lllite_set_trainable(unet, control)


def branch_state_dict(control) -> dict[str, torch.Tensor]:
    """The branch's tensors under the names its ecosystem uses: diffusers' for a ControlNet, kohya's for LLLite."""
    return control.state_dict() if control_kind(control) == "controlnet" else control.kohya_state_dict()


def load_branch_state_dict(control, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `branch_state_dict`: every key must be present and of the same shape."""
    if control_kind(control) == "controlnet":
        control.load_state_dict(tensors)
    else:
        control.load_kohya_state_dict(tensors)


def enable_gradient_checkpointing(unet, control) -> None:
    """Recompute block activations in backward: diffusers' switch on the UNet, the same attribute on a ControlNet.

    An LLLite's modules sit inside the UNet's blocks, so the UNet's switch covers them.
    """
    unet.enable_gradient_checkpointing()
    if control_kind(control) == "controlnet":
        for module in control.modules():  # the copied diffusers down/mid blocks carry the flag
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)


@contextmanager
def lllite_setting(lllite, multiplier: float, enabled: bool = True):
    """Temporarily set an LLLite's multiplier and on/off switch; restores the caller's values after."""
    saved = (lllite.multiplier, lllite.enabled)
    lllite.multiplier, lllite.enabled = multiplier, enabled
    try:
        yield lllite
    finally:
        lllite.multiplier, lllite.enabled = saved


@contextmanager
def conditioned(control, hint: torch.Tensor | None):
    """`with conditioned(control, hint) as step_hint:` for a whole sampling loop; pass `step_hint` at every step.

    An LLLite embeds the hint once here and its wrapped layers reuse the embedding at every timestep
    (step_hint is None); a ControlNet reads the hint at every call (step_hint is the hint).
    """
    if control_kind(control) != "lllite" or hint is None:
        yield hint
        return
    with control.conditioned(hint):
        yield None


def guess_mode_scales(control) -> list[float]:
    """Guess mode's ramp, one scale per ControlNet residual (SD: 12 encoder skips + 1 middle)."""
    if control_kind(control) != "controlnet":
        raise ValueError("guess_mode scales ControlNet residuals; it has no meaning for LLLite or no control")
    return logspace_scales(control.num_residuals)


def unet_prediction(base: StableDiffusionBase, control, latents: torch.Tensor, timesteps: torch.Tensor,
                    hidden: torch.Tensor, added_cond_kwargs: dict | None = None, hint: torch.Tensor | None = None,
                    strength: float = 1.0, scales: list[float] | None = None, only_mid_control: bool = False,
                    lllite_multiplier: float = 1.0, guess_mode: bool = False) -> torch.Tensor:
    """The UNet's output for noisy `latents` (B, 4, h, w) with `control` applied at `strength`.

    hint: (B, 3, H, W) in [0, 1], H = h * vae_scale_factor. strength 0 (or control None) is the plain base:
    the branch is not run at all, so "no control" is exactly the base model, not a near-zero residual.
    scales: ControlNet's per-residual multipliers (guess mode's ramp), None = all 1.
    guess_mode: the batch is a CFG batch [uncond; cond] and only its conditional half sees the ControlNet (hint:
    one per conditional sample); the unconditional half gets zero residuals, as in diffusers' pipeline.
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
        if guess_mode:
            half = latents.shape[0] // 2  # [uncond; cond]: the ControlNet reads the conditional half only
            added_c = None if added_cond_kwargs is None else {k: v[half:] for k, v in added_cond_kwargs.items()}
            residuals = control(latents[half:], timesteps[half:], hidden[half:], hint, added_cond_kwargs=added_c)
            residuals = residuals.scaled(scales, strength).with_zero_unconditional()  # (B, ...) -> (2B, ...)
        else:
            residuals = control(latents, timesteps, hidden, hint, added_cond_kwargs=added_cond_kwargs)
            residuals = residuals.scaled(scales, strength)
        return controlled_unet_forward(base.unet, latents, timesteps, hidden, residuals,
                                       only_mid_control=only_mid_control, added_cond_kwargs=added_cond_kwargs)
    # LLLite: a hint is embedded here and read by every wrapped layer; hint=None reuses the embedding set
    # before (a sampler embeds once for all its timesteps; without one, the wrapped layers raise).
    if hint is not None:
        control.set_conditioning(hint)
    with lllite_setting(control, lllite_multiplier * strength, enabled=True):
        return base.unet(latents, timesteps, hidden, added_cond_kwargs=added_cond_kwargs).sample
