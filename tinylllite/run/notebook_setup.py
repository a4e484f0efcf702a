"""The notebooks' one switch: the tiny SD on a CPU, or the user's Stable Diffusion 1.5 on a GPU.

Notebooks 05-07 open with a cell holding two settings,

    SD15_PATH = None     # or "models/v1-5-pruned.safetensors", or a diffusers folder
    DEVICE = "cpu"       # or "cuda"

and hand them to `notebook_setup`. Without a path they run the package's tiny SD (64 px Fill50K, what
every cell is timed for on a laptop CPU); with a path and a CUDA device they run the real model on 512 px
Fill50K, the original tutorial's setting (lllyasviel/ControlNet `docs/train.md`). The image size is not
a setting: it is the base's latent side times its VAE factor (8 x 8 = 64 for the tiny SD, 64 x 8 = 512
for SD1.5). Left out: SD2.x and SDXL (their notebooks would need other prompts, sizes and presets).
"""
from dataclasses import dataclass

import torch

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.errors import InputError
from tinylllite.files.sd_loading import load_base_or_tiny


@dataclass
class NotebookSetup:
    base: StableDiffusionBase  # loaded on the CPU; the notebook moves it with `base.to(setup.device)`
    device: torch.device
    image_size: int  # pixels per side: the UNet's latent side times the VAE factor
    tiny: bool  # True for the package's tiny SD, which tutorial_train.py's top block is tuned for

    def describe(self) -> str:
        name = "the tiny SD" if self.tiny else f"SD1.5 ({self.base.family})"
        return f"{name} on {self.device}, Fill50K at {self.image_size} px"


def check_device(device: str) -> torch.device:
    """A torch device this machine has; a CUDA device on a machine without one is refused in one line."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise InputError(f"DEVICE = {device!r} is not a torch device: use 'cpu' or 'cuda' ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"DEVICE = {str(device)!r} but torch sees no CUDA GPU here: set DEVICE = 'cpu' "
                         f"(with SD15_PATH = None) or install a CUDA build of torch")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"DEVICE = {str(device)!r}: the notebooks are written for 'cpu' or 'cuda'")
    return device


def notebook_setup(sd15_path=None, device: str = "cpu") -> NotebookSetup:
    """The base, device and image size a notebook runs with (see the module docstring)."""
    device = check_device(device)
    tiny = sd15_path is None
    if not tiny and device.type != "cuda":
        raise InputError(f"SD15_PATH = {str(sd15_path)!r} needs DEVICE = 'cuda': SD1.5 on a CPU takes minutes "
                         f"per image; set SD15_PATH = None to run the tiny SD on the CPU")
    base = load_base_or_tiny("tiny" if tiny else sd15_path)
    if not tiny:
        if base.family != "sd1":
            raise InputError(f"SD15_PATH = {str(sd15_path)!r} holds a {base.family} base; these notebooks are "
                             f"written for SD1.x (Fill50K at 512 px, the original tutorial's setting)")
    image_size = base.unet.config.sample_size * base.vae_scale_factor
    return NotebookSetup(base, device, image_size, tiny)
