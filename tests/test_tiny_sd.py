"""The tiny SD that ships with the package: loads offline from the committed weights and generates."""
import math

import numpy as np
import pytest
import torch

from tinylllite.sample import sample
from tinylllite.sd.tiny_sd import (TEXT_ENCODER_CONFIG, TINY_IMAGE_SIZE, UNET_CONFIG, VAE_CONFIG, WEIGHTS_DIR,
                                build_tiny_parts, load_tiny_sd)

PROMPT = "red circle with blue background"



@pytest.fixture(scope="module")
def base():
    return load_tiny_sd()


def test_tiny_sd_loads_offline_from_the_committed_weights(base, monkeypatch):
    """Every part loads with from_pretrained from the package folder, with the hub switched off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_tiny_sd()
    assert base.family == "tiny" and again.family == "tiny"
    for name, module in base.parts().items():
        assert not module.training, f"{name} should load in eval mode"
        assert next(module.parameters()).dtype == torch.float32


def test_tiny_sd_keeps_sds_latent_geometry(base):
    """VAE factor 8 and 4 latent channels, so the hint encoder and LLLite depths apply unchanged."""
    assert base.vae_scale_factor == 8
    assert base.unet.config.in_channels == base.vae.config.latent_channels == 4
    assert base.unet.config.sample_size * base.vae_scale_factor == TINY_IMAGE_SIZE
    # every UNet level has cross-attention, at latent factors 8, 16, 32: LLLite depths 1, 2, 3 (depth = log2 - 2)
    factors = [base.vae_scale_factor * 2 ** level for level in range(len(base.unet.down_blocks))]
    assert [int(math.log2(f)) - 2 for f in factors] == [1, 2, 3]
    assert all(hasattr(block, "attentions") for block in base.unet.down_blocks)
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) == 49408


def test_committed_weights_match_the_configs_the_script_trains(base):
    """The pretraining script builds its parts from the same configs the committed weights carry."""
    for module, config in ((base.vae, VAE_CONFIG), (base.unet, UNET_CONFIG)):
        for key, value in config.items():
            stored = module.config[key]
            assert (list(stored) if isinstance(stored, (list, tuple)) else stored) == (
                list(value) if isinstance(value, tuple) else value), key
    for key, value in TEXT_ENCODER_CONFIG.items():
        assert getattr(base.text_encoder.config, key) == value, key
    fresh = build_tiny_parts(seed=0)
    for trained, untrained in zip(base.parts().values(), (fresh[1], fresh[0], fresh[2])):
        assert trained.state_dict().keys() == untrained.state_dict().keys()


def test_tiny_sd_generates_deterministic_images_of_the_tiny_size(base):
    """A few DDIM steps from a prompt give (B, 64, 64, 3) uint8 images, the same for the same seed."""
    first = sample(base, [PROMPT, ""], steps=4, cfg=9.0, seed=3)
    second = sample(base, [PROMPT, ""], steps=4, cfg=9.0, seed=3)
    other = sample(base, [PROMPT, ""], steps=4, cfg=9.0, seed=4)
    assert first.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_tiny_vae_reconstructs_a_flat_disc(base):
    """The VAE round trip of a Fill50K target keeps its two colours (a loose check; the gate measures it)."""
    from tinylllite.data.fill50k import make_pair

    pair = make_pair(seed=5, index=0, size=TINY_IMAGE_SIZE)
    image = torch.from_numpy(pair.target).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, S, S)
    with torch.no_grad():
        recon = base.vae.decode(base.vae.encode(image).latent_dist.mode()).sample
    assert (recon - image).abs().mean() < 0.1


def test_load_tiny_sd_says_how_to_make_missing_weights(tmp_path):
    """An empty weights folder fails loudly, naming the part and the script that trains it."""
    with pytest.raises(FileNotFoundError, match="pretrain_tiny_sd.py"):
        load_tiny_sd(weights_dir=tmp_path)
    assert (WEIGHTS_DIR / "unet" / "config.json").is_file()
