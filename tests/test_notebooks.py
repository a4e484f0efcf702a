"""The notebooks: each runs top to bottom in a fresh kernel, and their GPU switch picks the base it is given."""

from pathlib import Path

import nbformat
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from nbclient import NotebookClient
from transformers import CLIPTextConfig, CLIPTextModel

from tinylllite.errors import InputError
from tinylllite.run.notebook_setup import notebook_setup
from tinylllite.files.sd_loading import family_config

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    """The notebook executes cell by cell in a fresh kernel, from the notebooks/ folder."""
    notebook = nbformat.read(path, as_version=4)
    run_here = {"metadata": {"path": str(path.parent)}}  # notebooks open files relative to notebooks/
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources=run_here).execute()


def test_there_are_seven_notebooks_in_reading_order():
    """01 to 07 are all present, so a missing notebook cannot pass by not being collected."""
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 8)]


def write_small_sd15_folder(folder: Path) -> None:
    """A random-weight diffusers folder with SD1.5's layout from the shipped config, narrowed to run on a CPU.

    Kept from sd1.json: the block types, layers per block, latent side 64, the 4-level (factor 8) VAE and the
    768-wide cross-attention that names the family. Narrowed: channel widths and the text encoder's depth.
    """
    config = family_config("sd1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(config["unet"], block_out_channels=(32, 32, 64, 64), norm_num_groups=8))
    vae = AutoencoderKL(**dict(config["vae"], block_out_channels=(8, 8, 16, 16), norm_num_groups=4))
    text = CLIPTextModel(CLIPTextConfig(**dict(config["text_encoder"], num_hidden_layers=1, intermediate_size=64)))
    for name, part in dict(unet=unet, vae=vae, text_encoder=text).items():
        part.save_pretrained(folder / name)


def test_switch_without_a_path_runs_the_tiny_sd_on_the_cpu_at_64_px():
    """SD15_PATH = None, DEVICE = 'cpu': the shipped tiny SD, 64 px images (8 x 8 latents x VAE factor 8)."""
    setup = notebook_setup(None, "cpu")

    assert setup.tiny and setup.base.family == "tiny"
    assert setup.device == torch.device("cpu") and setup.image_size == 64


def test_switch_with_an_sd15_folder_and_cuda_picks_it_at_512_px(tmp_path, monkeypatch):
    """SD15_PATH = an SD1.5-layout folder, DEVICE = 'cuda': that base, 512 px, the CUDA device (not run here)."""
    write_small_sd15_folder(tmp_path / "sd15")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    setup = notebook_setup(tmp_path / "sd15", "cuda")

    assert not setup.tiny and setup.base.family == "sd1"
    assert setup.image_size == 512 and setup.device == torch.device("cuda")
    assert list(setup.base.unet.config.block_out_channels) == [32, 32, 64, 64]  # the folder's UNet


def test_switch_refuses_sd15_on_the_cpu_and_cuda_without_a_gpu(tmp_path, monkeypatch):
    """An SD1.5 path with DEVICE = 'cpu', or 'cuda' where torch has no GPU, is refused with a sentence."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    with pytest.raises(InputError, match="needs DEVICE = 'cuda'"):
        notebook_setup(tmp_path / "sd15", "cpu")
    with pytest.raises(InputError, match="no CUDA GPU"):
        notebook_setup(None, "cuda")
