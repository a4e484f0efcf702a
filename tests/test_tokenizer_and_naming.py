"""The offline CLIP tokenizer and the diffusers -> LDM module-path map."""

import json
from pathlib import Path

import pytest

from tinylllite.sd.naming import diffusers_to_ldm
from tinylllite.sd.tokenizer import clip_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def test_offline_clip_tokenizer_matches_clips_own_ids():
    """'a photo of a cat' gives CLIP's published ids, with no download."""
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_tokenizer_pads_prompts_to_77_tokens():
    """Prompts are padded with <|endoftext|> to CLIP's 77-token context."""
    ids = clip_tokenizer()("red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_every_sd15_unet_key_maps_to_its_ldm_name():
    """All 686 SD1.5 UNet tensors get the LDM names of the real checkpoint."""
    keymap = json.loads((FIXTURES / "sd15_ldm_to_diffusers_keymap.json").read_text())["unet"]
    config = json.loads((FIXTURES / "sd15_component_configs.json").read_text())["unet"]
    wrong = {ldm: diffusers_to_ldm(diff, config) for ldm, (diff, *_) in keymap.items()
             if "model.diffusion_model." + diffusers_to_ldm(diff, config) != ldm}
    assert len(keymap) == 686 and wrong == {}


def test_unknown_unet_path_is_refused_by_name():
    """A path outside the UNet layout raises a KeyError that names it."""
    config = json.loads((FIXTURES / "sd15_component_configs.json").read_text())["unet"]
    with pytest.raises(KeyError, match="not_a_block"):
        diffusers_to_ldm("not_a_block.weight", config)
