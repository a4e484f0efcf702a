"""One LLLite module (tinylllite/lllite.py): kohya parity, identity at init, depth maths, CFG tiling, errors."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from tinylllite.lllite import (LLLiteModule, depth_for_factor, embed_together, image_reduction,
                               kohya_hyperparameters, to_kohya_range)

FIXTURE = Path(__file__).parent / "fixtures" / "kohya_lllite_fixture.safetensors"
CASES = [f"d{depth}_{kind}" for depth in (1, 2, 3) for kind in ("plain", "half", "cfg")]


def random_module(depth=2, in_features=12, cond_emb_dim=8, mlp_dim=6, seed=0, **kw) -> LLLiteModule:
    """A module with a non-zero `up`, so Δ is not trivially zero."""
    torch.manual_seed(seed)
    module = LLLiteModule(in_features, cond_emb_dim, mlp_dim, depth, **kw)
    torch.nn.init.normal_(module.up[0].weight)
    torch.nn.init.normal_(module.up[0].bias)
    return module


@pytest.mark.parametrize("case", CASES)
def test_kohyas_own_module_outputs_are_reproduced_from_its_weights(case):
    """kohya's weights, image and tokens give kohya's embedding and wrapped output (float64, 1e-12)."""
    with safe_open(FIXTURE, "pt") as f:
        meta = f.metadata()
        tensors = {k[len(case) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(case + ".")}
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w.") and k != "w.org.weight"}
    hyper = kohya_hyperparameters(weights)
    assert hyper["depth"] == int(meta[f"{case}.depth"])
    module = LLLiteModule(**hyper).double()
    module.load_state_dict(weights, strict=True)
    module.multiplier = float(meta[f"{case}.multiplier"])

    module.embedding = module.embed(tensors["cond"])  # the fixture's image is already in kohya's [-1, 1]
    y = F.linear(tensors["x"] + module(tensors["x"]), tensors["w.org.weight"])

    torch.testing.assert_close(module.embedding, tensors["emb"], rtol=0, atol=1e-12)
    torch.testing.assert_close(y, tensors["y"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_fresh_module_adds_exactly_zero(depth):
    """up's weight AND bias start at zero (kohya keeps a random bias), so Δ is exactly 0."""
    module = LLLiteModule(in_features=12, cond_emb_dim=8, mlp_dim=6, depth=depth)
    side = image_reduction(depth)
    module.embedding = module.embed(torch.rand(1, 3, 2 * side, 2 * side) * 2 - 1)
    assert torch.equal(module(torch.randn(1, 4, 12)), torch.zeros(1, 4, 12))
    assert torch.count_nonzero(module.up[0].bias) == 0


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_embedding_grid_is_image_over_four_times_two_to_the_depth(depth):
    """A (3, 3) token grid needs an image of 3 · 4·2^depth pixels; depth_for_factor inverts it."""
    module = LLLiteModule(in_features=12, cond_emb_dim=8, mlp_dim=6, depth=depth)
    side = 4 * 2**depth
    assert image_reduction(depth) == side and depth_for_factor(side) == depth
    assert module.embed(torch.zeros(2, 3, 3 * side, 3 * side)).shape == (2, 9, 8)  # (B, h*w, C)


def test_embedding_all_modules_together_equals_embedding_each_alone():
    """embed_together's stacked and grouped convs give every module's own `embed` up to float rounding, and
    the same gradients to each module's own weights, for a mix of depths and widths in any order."""
    shapes = [(1, 8), (2, 8), (1, 8), (3, 8), (1, 4), (2, 8), (4, 8), (1, 8)]  # (depth, C)
    modules = [random_module(depth=d, cond_emb_dim=c, seed=i).double() for i, (d, c) in enumerate(shapes)]
    for m in modules:  # random conditioning weights, so no two modules agree by accident
        for p in m.conditioning1.parameters():
            torch.nn.init.normal_(p)
    cond = torch.rand(2, 3, 128, 64, dtype=torch.float64) * 2 - 1  # float64: rounding far below the tolerance

    together = embed_together(modules, cond)
    sum(e.square().sum() for e in together).backward()
    grads_together = [[p.grad.clone() for p in m.conditioning1.parameters()] for m in modules]
    for m in modules:
        m.zero_grad(set_to_none=True)
    alone = [m.embed(cond) for m in modules]
    sum(e.square().sum() for e in alone).backward()

    for m, a, b, grads in zip(modules, together, alone, grads_together):
        torch.testing.assert_close(a, b)
        for g, p in zip(grads, m.conditioning1.parameters()):
            torch.testing.assert_close(g, p.grad)  # the same sums in another order: equal up to rounding


def test_embedding_is_flattened_row_major_like_attention_tokens():
    """Token i·w + j of the embedding is pixel (i, j) of conditioning1's output grid."""
    module = random_module(depth=1)
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    grid = module.conditioning1(image)  # (1, C, 2, 3)
    assert torch.equal(module.embed(image)[0, 1 * 3 + 2], grid[0, :, 1, 2])


@pytest.mark.parametrize("factor", [4, 24, 128])
def test_no_depth_is_invented_for_grids_it_cannot_make(factor):
    """Factors that are not 8, 16, 32 or 64 are refused with the list of possible grids."""
    with pytest.raises(ValueError, match="no LLLite depth"):
        depth_for_factor(factor)


def test_the_public_zero_one_range_maps_to_kohyas_minus_one_one():
    """to_kohya_range sends 0 -> -1, 0.5 -> 0, 1 -> 1 and refuses images outside [0, 1]."""
    image = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert torch.equal(to_kohya_range(image).flatten(), torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_kohya_range(image * 2 - 1)
    with pytest.raises(ValueError, match="RGB"):
        to_kohya_range(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize("k", [2, 3])
def test_cfg_batch_reuses_each_conditioning_image_for_every_copy(k):
    """A latent batch k times the conditioning batch sees the embedding tiled [uncond; cond]."""
    module = random_module(depth=1)
    module.embedding = module.embed(torch.rand(2, 3, 16, 16) * 2 - 1)  # (2, 4, C)
    x = torch.randn(2, 4, 12)
    tiled = module(x.repeat(k, 1, 1))  # (k*2, 4, in)
    torch.testing.assert_close(tiled, module(x).repeat(k, 1, 1), rtol=0, atol=1e-6)


def test_latent_batch_not_a_multiple_of_the_conditioning_batch_raises():
    """3 latents for 2 conditioning images (1.5×) is an error, not a silent broadcast."""
    module = random_module(depth=1)
    module.embedding = module.embed(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of the conditioning batch"):
        module(torch.randn(3, 4, 12))


def test_token_count_mismatch_names_both_sizes():
    """A conditioning image of the wrong size for the latent is refused with both token counts."""
    module = random_module(depth=1)
    module.embedding = module.embed(torch.zeros(1, 3, 16, 16))  # 4 tokens
    with pytest.raises(ValueError, match="sees 9 tokens but the conditioning image gives 4"):
        module(torch.randn(1, 9, 12))


def test_forward_without_conditioning_says_to_call_set_conditioning():
    """No embedding set: the error names set_conditioning."""
    with pytest.raises(RuntimeError, match="set_conditioning"):
        random_module()(torch.randn(1, 4, 12))


def test_dropout_acts_only_in_training():
    """With dropout, train mode changes Δ and eval mode gives the dropout-free Δ."""
    module = random_module(depth=1, dropout=0.5)
    module.embedding = module.embed(torch.rand(1, 3, 16, 16) * 2 - 1)
    x = torch.randn(1, 4, 12)
    reference = random_module(depth=1)
    reference.embedding = module.embedding
    assert torch.equal(module.eval()(x), reference(x))
    assert not torch.equal(module.train()(x), reference(x))


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_sizes_and_depth_are_read_back_from_kohya_keys(depth):
    """in_features, C, M and depth are recovered from a module's own state_dict."""
    module = LLLiteModule(in_features=40, cond_emb_dim=8, mlp_dim=12, depth=depth)
    assert kohya_hyperparameters(module.state_dict()) == dict(in_features=40, cond_emb_dim=8, mlp_dim=12, depth=depth)
