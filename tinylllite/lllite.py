"""The ControlNet-LLLite module: a tiny conditioning MLP that nudges the input of one Linear layer.

Mirrors `LLLiteModule` of kohya's sd-scripts (`networks/control_net_lllite.py`), maths and saved key
names unchanged so kohya's files load and give kohya's outputs. One module sits in front of one
Linear of the UNet's attention (`attn1.to_q/k/v`, `attn2.to_q`, chosen in lllite_unet.py), and
`LLLiteLinear` at the end of this file is that Linear:

    emb = flatten(conditioning1(image))                    # once per conditioning image
    Δ   = up(mid(cat([emb, down(x)], -1))) · multiplier    # the embedding comes FIRST
    y   = W (x + Δ) + b                                    # Δ moves the wrapped layer's INPUT

With C = cond_emb_dim, M = mlp_dim and `in` = the wrapped layer's in_features:
`conditioning1` is a stack of unpadded convs whose kernel equals their stride, so an image of side S
becomes a grid of side S / (4·2^depth); `down` = Linear(in→M), ReLU; `mid` = Linear(M+C→M), ReLU;
`up` = Linear(M→in).

Differences from kohya, all deliberate:
- `up`'s bias is zeroed as well as its weight. kohya zeroes only the weight, so a fresh kohya
  module adds its random `up` bias and is not an exact identity; here a fresh module is.
- depth 4 (image/64, the middle block of SD1.5/SD2.x) is this project's own; kohya stops at 3.
- images enter the public API in [0, 1] like ControlNet's hint; `to_kohya_range` below is the one
  place that maps them to the [−1, 1] kohya trained on. `LLLiteModule.embed` takes [−1, 1].
- no module-level flags, no patched forward: the module returns Δ and `LLLiteLinear`, a real
  nn.Linear holding the module as its child, adds it (kohya replaces the Linear's `forward`).
Left out: kohya's experimental variants (other insertion points, batch_cond_only, etc.).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from tinylllite.hint import check_hint

# Kernel (= stride) of each conv of `conditioning1`, per depth. kohya's depths 1-3, and the
# project's depth 4. The first conv always divides by 4; the rest by 2^depth in total.
CONDITIONING_KERNELS = {1: (4, 2), 2: (4, 4), 3: (4, 4, 2), 4: (4, 4, 4)}


def image_reduction(depth: int) -> int:
    """How many image pixels one embedding token covers per side: the product of the strides."""
    if depth not in CONDITIONING_KERNELS:
        raise ValueError(f"LLLite depth {depth} is not one of {sorted(CONDITIONING_KERNELS)}")
    return math.prod(CONDITIONING_KERNELS[depth])


def depth_for_factor(image_factor: int) -> int:
    """The depth whose embedding grid equals the token grid of a block seeing image/`image_factor`.

    conditioning1 divides the image by 4 (first conv) then by 2^depth (the others), so its grid
    is image / (4·2^depth) = image / 2^(depth+2). Setting that equal to image / image_factor gives
        depth = log2(image_factor) − 2
    e.g. SDXL's 1/16 blocks → 2, its 1/32 blocks → 3, SD1.5's 1/64 middle block → 4.
    """
    depth = round(math.log2(image_factor)) - 2
    if 2 ** (depth + 2) != image_factor or depth not in CONDITIONING_KERNELS:
        raise ValueError(f"no LLLite depth gives an image/{image_factor} grid: depths "
                         f"{sorted(CONDITIONING_KERNELS)} give image/8, /16, /32, /64")
    return depth


def to_kohya_range(image01: torch.Tensor) -> torch.Tensor:
    """THE place where conditioning images change range: [0, 1] (public API) -> [−1, 1] (kohya).

    kohya's trainer, inference script and ComfyUI node all feed [−1, 1]; the weights expect it.
    """
    check_hint(image01)  # (B, 3, H, W) in [0, 1], the same check as ControlNet's hint
    return image01 * 2.0 - 1.0


def conditioning_stack(cond_emb_dim: int, depth: int) -> nn.Sequential:
    """conditioning1: Conv(3→C/2), ReLU, [Conv(C/2→C/2), ReLU,] Conv(→C); kernel = stride, no padding.

    Convs sit at Sequential indices 0, 2[, 4]; these indices are part of kohya's saved key names.
    """
    kernels = CONDITIONING_KERNELS[depth]
    half = cond_emb_dim // 2
    channels = [3] + [half] * (len(kernels) - 1) + [cond_emb_dim]
    layers: list[nn.Module] = []
    for i, k in enumerate(kernels):
        layers.append(nn.Conv2d(channels[i], channels[i + 1], kernel_size=k, stride=k, padding=0))
        if i < len(kernels) - 1:  # no activation after the last conv
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LLLiteModule(nn.Module):
    """Δ for one wrapped Linear. Call `embed` (or let `LLLite.set_conditioning` do it), then forward."""

    def __init__(self, in_features: int, cond_emb_dim: int, mlp_dim: int, depth: int, dropout: float = 0.0):
        super().__init__()
        if cond_emb_dim % 2:
            raise ValueError(f"cond_emb_dim must be even (conditioning1 uses C/2 channels); got {cond_emb_dim}")
        self.in_features, self.cond_emb_dim, self.mlp_dim, self.depth = in_features, cond_emb_dim, mlp_dim, depth
        self.dropout = dropout
        self.conditioning1 = conditioning_stack(cond_emb_dim, depth)
        self.down = nn.Sequential(nn.Linear(in_features, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_features))
        # Zero weight AND bias: Δ = 0 at initialisation, so the wrapped layer's output is unchanged.
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)

        self.multiplier = 1.0  # scales Δ; 0 means "skip this module"
        self.enabled = True  # False means "skip this module"
        self.embedding: torch.Tensor | None = None  # (Bc, h*w, C), set once per conditioning image

    @property
    def active(self) -> bool:
        """Whether the wrapped layer should add Δ at all (off or multiplier 0 → the plain layer)."""
        return self.enabled and self.multiplier != 0.0

    def check_image_size(self, cond: torch.Tensor) -> None:
        side = image_reduction(self.depth)
        if cond.shape[-2] % side or cond.shape[-1] % side:
            raise ValueError(f"conditioning image {tuple(cond.shape[-2:])}: sides must be multiples of "
                             f"{side} for an LLLite module of depth {self.depth}")

    def embed(self, cond: torch.Tensor) -> torch.Tensor:
        """Conditioning image in kohya's [−1, 1] -> token embedding, row-major like the attention tokens."""
        self.check_image_size(cond)
        weight = self.conditioning1[0].weight
        emb = self.conditioning1(cond.to(device=weight.device, dtype=weight.dtype))  # (Bc, C, h, w)
        return emb.flatten(2).transpose(1, 2)  # (Bc, C, h, w) -> (Bc, h*w, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, in) -> Δ (B, T, in). B may be any multiple k of the conditioning batch (CFG)."""
        emb = self.embedding
        if emb is None:
            raise RuntimeError("an LLLite-wrapped layer ran without a conditioning image: call "
                               "lllite.set_conditioning(image) (or use `with lllite.conditioned(image):`) "
                               "before running the UNet, or set lllite.enabled = False")
        if x.shape[0] % emb.shape[0]:
            raise ValueError(f"latent batch {x.shape[0]} is not a multiple of the conditioning batch "
                             f"{emb.shape[0]}: pass one conditioning image per prompt (CFG batches may "
                             f"be k times larger, laid out [uncond; cond])")
        if x.shape[1] != emb.shape[1]:
            raise ValueError(f"the layer sees {x.shape[1]} tokens but the conditioning image gives "
                             f"{emb.shape[1]}: the image must be the latent size × the VAE factor")
        emb = emb.repeat(x.shape[0] // emb.shape[0], 1, 1)  # (Bc, T, C) -> (k·Bc, T, C), [uncond; cond]
        h = torch.cat([emb, self.down(x)], dim=-1)  # (B, T, C + M), embedding first as in kohya
        h = self.mid(h)  # (B, T, M)
        h = F.dropout(h, self.dropout, self.training)
        return self.up(h) * self.multiplier  # (B, T, in)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, image/{image_reduction(self.depth)} -> tokens"


def embed_together(modules: list[LLLiteModule], cond: torch.Tensor) -> list[torch.Tensor]:
    """`[m.embed(cond) for m in modules]`, computed with one conv stack per depth instead of one per module.

    Every module embeds the same image, so the modules of one depth (and width) can run as one stack:
    their first convs all read the image's 3 channels, so their filters stack into one conv with
    n·C/2 outputs; each later conv reads only its own module's channels, which is a grouped conv with
    n groups. Same weights and the same sums, added in another order: equal to the per-module loop up to
    float rounding (tests/test_lllite_module.py), in a handful of convolutions instead of dozens. Training
    pays for the embedding in every step, forward and backward: for the tiny SD's 40 modules on the 2-core
    CPU, 37 ms against 61 ms module by module (bench/step_parts.py).
    """
    groups: dict[tuple, list[int]] = {}  # modules that can share a stack -> their positions in `modules`
    for i, m in enumerate(modules):
        m.check_image_size(cond)
        weight = m.conditioning1[0].weight
        groups.setdefault((m.depth, m.cond_emb_dim, weight.dtype, weight.device), []).append(i)
    embeddings: list[torch.Tensor | None] = [None] * len(modules)
    for positions in groups.values():
        stacks = [modules[i].conditioning1 for i in positions]
        first = stacks[0][0].weight
        x = cond.to(device=first.device, dtype=first.dtype)  # (B, 3, H, W)
        for index, layer in enumerate(stacks[0]):
            if isinstance(layer, nn.ReLU):
                x = F.relu(x)
                continue
            weight = torch.cat([stack[index].weight for stack in stacks])  # (n·C_out, C_in, k, k)
            bias = torch.cat([stack[index].bias for stack in stacks])
            x = F.conv2d(x, weight, bias, stride=layer.stride, groups=1 if index == 0 else len(stacks))
        # (B, n·C, h, w) -> n × (B, C, h, w) -> n × (B, h·w, C), as `embed` returns them
        for i, emb in zip(positions, x.chunk(len(stacks), dim=1)):
            embeddings[i] = emb.flatten(2).transpose(1, 2)
    return embeddings


def kohya_hyperparameters(tensors: dict[str, torch.Tensor], name: str = "module") -> dict:
    """in_features, C, M and depth of one module, read from its kohya keys (`down.0.weight`, ...).

    As kohya-style loaders do: C = 2 · conditioning1.0 out channels, M = down.0 out features,
    depth from how many conditioning1 convs exist and the kernel of the last one:
    two convs → depth 1 (last kernel 2) or 2 (4); three convs → depth 3 (last kernel 2) or 4 (4).
    """
    needed = ("conditioning1.0.weight", "conditioning1.2.weight", "down.0.weight")
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise KeyError(f"{name}: missing LLLite keys {missing}")
    if "conditioning1.4.weight" in tensors:
        depth = {2: 3, 4: 4}.get(tensors["conditioning1.4.weight"].shape[-1])
    else:
        depth = {2: 1, 4: 2}.get(tensors["conditioning1.2.weight"].shape[-1])
    if depth is None:
        raise ValueError(f"{name}: conditioning1 kernels do not match any LLLite depth {sorted(CONDITIONING_KERNELS)}")
    down = tensors["down.0.weight"]  # (M, in)
    return dict(in_features=down.shape[1], cond_emb_dim=tensors["conditioning1.0.weight"].shape[0] * 2,
                mlp_dim=down.shape[0], depth=depth)


class LLLiteLinear(nn.Linear):
    """nn.Linear whose input is moved by its child `.lllite` first: y = W (x + Δ) + b.

    kohya's `LLLiteModule.forward` computes the same: `self.org_forward(x + cx)`.
    """

    def __init__(self, linear: nn.Linear, lllite: LLLiteModule):
        # Build the placeholder parameters on the meta device, then take the original ones over:
        # the same Parameter objects (not copies), so optimisers, dtypes and devices are kept.
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.lllite = lllite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lllite.active:
            # The module may be kept in a wider dtype than the UNet (e.g. float32 on a float16 UNet).
            delta = self.lllite(x.to(self.lllite.down[0].weight.dtype)).to(x.dtype)
            x = x + delta  # (B, T, in): Δ moves the layer's input, not its output
        return super().forward(x)

    def unwrap(self) -> nn.Linear:
        """The plain nn.Linear again, holding the same weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear
