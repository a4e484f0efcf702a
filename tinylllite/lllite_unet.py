"""Putting LLLite modules (lllite.py) into a diffusers UNet2DConditionModel, and kohya's file format.

Mirrors `ControlNetLLLite` of kohya's sd-scripts (`networks/control_net_lllite_for_train.py` and
`control_net_lllite.py`), written the explicit way:

- each wrapped layer becomes an `LLLiteLinear` (lllite.py): an nn.Linear that keeps the very same `weight` and
  `bias` and holds its LLLite module as the child `.lllite`. No patched forward, no global state.
  The UNet's own state_dict keys and tensors are unchanged; the LLLite tensors appear beside them as
  `<layer>.lllite.<key>` (`unet_base_state_dict` gives the plain UNet keys back);
- wrapped layers: `attn1.to_q`, `attn1.to_k`, `attn1.to_v` and `attn2.to_q` of every transformer block
  of the chosen blocks (attn2's k/v read the text, not the image tokens, so they are never wrapped);
- each block's depth comes from walking the UNet: a block behind n net downsamplers sees tokens of
  image / (vae_scale_factor · 2^n), and `depth_for_factor` picks the conditioning1 with that grid. kohya
  uses block-index arithmetic instead, which is right for SDXL only;
- `LLLite` is an nn.ModuleDict keyed by kohya's module names, so its state_dict is kohya's file
  format (`lllite_unet_<LDM path with . → _>.<param>`) and `lllite.parameters()` only LLLite's.

Default block set = kohya's: input blocks, plus the middle block when its depth is one kohya defined
(≤ 3). That is input + middle for SDXL, input only for SD1.5/SD2.x (their middle block sees image/64
and needs this project's depth 4, which kohya-style loaders reject).
Left out: kohya's other experimental insertion points and its process-wide Linear replacement.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tinylllite.lllite import (LLLiteLinear, LLLiteModule, depth_for_factor, embed_together, image_reduction,
                               kohya_hyperparameters, to_kohya_range)
from tinylllite.sd.naming import diffusers_to_ldm

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")  # per transformer block
KOHYA_MAX_DEPTH = 3  # kohya and the loaders built on it define depths 1-3
KIND_OF_LDM_PREFIX = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
BLOCK_KINDS = tuple(KIND_OF_LDM_PREFIX.values())


@dataclass
class AttentionBlock:
    """One Transformer2DModel of the UNet and the image downsampling its tokens see."""

    path: str  # diffusers path, e.g. "down_blocks.1.attentions.0"
    kind: str  # "input", "middle" or "output"
    factor: int  # image pixels per token side, e.g. 16 for SDXL's down_blocks.1
    module: nn.Module  # the Transformer2DModel itself


def attention_blocks(unet: nn.Module, vae_scale_factor: int = 8) -> list[AttentionBlock]:
    """Every attention block in execution order, with its image factor.

    factor = vae_scale_factor · 2^(downsamplers − upsamplers that ran before it), counted by walking the
    blocks in the order the UNet runs them; no table of block indices.
    """
    stages = [(f"down_blocks.{i}", "input", block) for i, block in enumerate(unet.down_blocks)]
    stages += [("mid_block", "middle", unet.mid_block)]
    stages += [(f"up_blocks.{i}", "output", block) for i, block in enumerate(unet.up_blocks)]
    found, levels = [], 0
    for prefix, kind, block in stages:
        for j, attention in enumerate(getattr(block, "attentions", None) or []):
            found.append(AttentionBlock(f"{prefix}.attentions.{j}", kind, vae_scale_factor * 2**levels, attention))
        if getattr(block, "downsamplers", None):  # a block's resampler runs after its attentions
            levels += 1
        if getattr(block, "upsamplers", None):
            levels -= 1
    return found


def default_blocks(found: list[AttentionBlock]) -> set[str]:
    """kohya's default: input blocks, plus the middle block when every middle depth is ≤ 3 (kohya-loadable)."""
    middle_factors = [b.factor for b in found if b.kind == "middle"]
    if middle_factors and max(middle_factors) <= image_reduction(KOHYA_MAX_DEPTH):
        return {"input", "middle"}
    return {"input"}


def kohya_name(path: str, unet_config) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `lllite_unet_input_blocks_4_1_..._attn1_to_q`."""
    return "lllite_unet_" + diffusers_to_ldm(path, unet_config).replace(".", "_")


class LLLite(nn.ModuleDict):
    """The LLLite modules attached to one UNet, keyed by kohya name. Its state_dict is kohya's format."""

    def __init__(self, modules: dict[str, LLLiteModule], diffusers_paths: dict[str, str]):
        super().__init__(modules)
        self.diffusers_paths = diffusers_paths  # kohya name -> path of the wrapped Linear in the UNet
        self._multiplier, self._enabled = 1.0, True

    @property
    def multiplier(self) -> float:
        """Strength of every module's Δ (kohya's `multiplier`); 0 gives the plain UNet."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float):
        self._multiplier = float(value)
        for module in self.values():
            module.multiplier = self._multiplier

    @property
    def enabled(self) -> bool:
        """False switches every wrapped layer back to its plain Linear (no conditioning needed)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool):
        self._enabled = bool(value)
        for module in self.values():
            module.enabled = self._enabled

    def set_conditioning(self, image01: torch.Tensor, together: bool = False):
        """Embed the conditioning image (B, 3, H, W) in [0, 1] once; every UNet call reuses it.

        H, W = the latent size × the VAE factor. Training: call it in each step (gradients reach
        conditioning1) with together=True: every module of one depth embeds in one conv stack
        (`embed_together`: far fewer, larger convolutions; equal to each module's own `embed` up to float
        rounding). Sampling: call it once under torch.no_grad(), before the denoising loop; the default
        runs each module's own convs, the exact sums kohya's code does.
        The embeddings live where the modules are: move the UNet first, then set the conditioning.
        """
        image = to_kohya_range(image01)  # (B, 3, H, W) in [-1, 1]
        modules = list(self.values())
        embeddings = embed_together(modules, image) if together else [m.embed(image) for m in modules]
        for module, embedding in zip(modules, embeddings):
            module.embedding = embedding  # (B, h*w, C), its own grid per depth

    def clear_conditioning(self):
        for module in self.values():
            module.embedding = None

    @contextmanager
    def conditioned(self, image01: torch.Tensor):
        """`with lllite.conditioned(image): unet(...)`: set the conditioning, clear it afterwards."""
        self.set_conditioning(image01)
        try:
            yield self
        finally:
            self.clear_conditioning()

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """`{"lllite_unet_<ldm path>.<param>": tensor}`: only LLLite tensors, as kohya saves them."""
        return dict(self.state_dict())

    def load_kohya_state_dict(self, state_dict: dict[str, torch.Tensor]):
        """Copy a kohya-format state dict in, strictly: every key present, no extra, every shape equal."""
        own = self.state_dict()
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        wrong = [f"{k}: file {tuple(state_dict[k].shape)}, expected {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(_mismatch_report(self, state_dict, missing, unexpected, wrong))
        with torch.no_grad():
            for key, tensor in own.items():  # state_dict tensors share storage with the parameters
                tensor.copy_(state_dict[key])

    def describe(self) -> str:
        """One line: module count, C, M, depths."""
        return _describe({name: dict(in_features=m.in_features, cond_emb_dim=m.cond_emb_dim, mlp_dim=m.mlp_dim,
                                     depth=m.depth) for name, m in self.items()})


def _describe(hyper: dict[str, dict]) -> str:
    """`{name: kohya_hyperparameters}` -> "136 modules, C=[32], M=[64], depths=[2, 3]"."""
    seen = {field: sorted({h[field] for h in hyper.values()}) for field in ("cond_emb_dim", "mlp_dim", "depth")}
    return f"{len(hyper)} modules, C={seen['cond_emb_dim']}, M={seen['mlp_dim']}, depths={seen['depth']}"


def group_kohya_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{"lllite_unet_X.down.0.weight": t}` -> `{"lllite_unet_X": {"down.0.weight": t}}`."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".")
        groups.setdefault(name, {})[param] = tensor
    return groups


def _mismatch_report(lllite: LLLite, state_dict, missing, unexpected, wrong) -> str:
    lines = ["the LLLite file does not match this LLLite:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            lines.append(f"  {len(items)} {title}, e.g. " + "; ".join(items[:5]))
    try:
        file_hyper = {n: kohya_hyperparameters(t, n) for n, t in group_kohya_keys(state_dict).items()}
        lines.append(f"  file: {_describe(file_hyper)}")
    except (KeyError, ValueError) as error:
        lines.append(f"  file: not readable as LLLite modules ({error})")
    lines.append(f"  this LLLite: {lllite.describe()}")
    lines.append("  build a matching one with attach_lllite_from_kohya(unet, state_dict) "
                 "or attach_lllite(unet, cond_emb_dim=..., mlp_dim=..., blocks=...)")
    return "\n".join(lines)


def attach_lllite(unet: nn.Module, cond_emb_dim: int = 32, mlp_dim: int = 64, blocks: set[str] | None = None,
                  dropout: float = 0.0, vae_scale_factor: int = 8, dtype: torch.dtype | None = None) -> LLLite:
    """Wrap the attention Linears of the chosen blocks ("input", "middle", "output"; None = kohya's default).

    New modules live on the wrapped layer's device (meta stays meta, e.g. for counting) and in `dtype`
    (None: the layer's; float32 on a half-precision UNet keeps the trained weights in full precision).
    """
    if any(isinstance(m, LLLiteLinear) for m in unet.modules()):
        raise ValueError("this UNet already has LLLite attached: call detach_lllite(unet) first")
    found = attention_blocks(unet, vae_scale_factor)
    chosen = default_blocks(found) if blocks is None else set(blocks)
    if not chosen or not chosen <= set(BLOCK_KINDS):
        raise ValueError(f"blocks={blocks!r}: choose a non-empty subset of {BLOCK_KINDS} (or None for kohya's default)")
    modules, paths = {}, {}
    for block in found:
        if block.kind not in chosen:
            continue
        depth = depth_for_factor(block.factor)
        for t in range(len(block.module.transformer_blocks)):
            for target in TARGETS:
                path = f"{block.path}.transformer_blocks.{t}.{target}"
                linear = unet.get_submodule(path)
                if type(linear) is not nn.Linear:
                    raise TypeError(f"{path} is a {type(linear).__name__}, not an nn.Linear (fused projections?)")
                with torch.device(linear.weight.device):
                    module = LLLiteModule(linear.in_features, cond_emb_dim, mlp_dim, depth, dropout)
                module.to(dtype or linear.weight.dtype)
                unet.set_submodule(path, LLLiteLinear(linear, module))
                name = kohya_name(path, unet.config)
                modules[name], paths[name] = module, path
    if not modules:
        raise ValueError(f"no attention blocks among the {sorted(chosen)} blocks of this UNet: nothing to wrap")
    return LLLite(modules, paths)


def attach_lllite_from_kohya(unet: nn.Module, state_dict: dict[str, torch.Tensor], dropout: float = 0.0,
                             vae_scale_factor: int = 8) -> LLLite:
    """Attach an LLLite shaped like a kohya file (C, M, blocks, depths read from its keys) and load it."""
    hyper = {name: kohya_hyperparameters(t, name) for name, t in group_kohya_keys(state_dict).items()}
    sizes = {(h["cond_emb_dim"], h["mlp_dim"]) for h in hyper.values()}
    if len(sizes) != 1:
        raise ValueError(f"the file mixes (C, M) sizes {sorted(sizes)}; one size per file is supported")
    (cond_emb_dim, mlp_dim), = sizes
    blocks = set()
    for name in hyper:
        kind = next((k for p, k in KIND_OF_LDM_PREFIX.items() if name.startswith(f"lllite_unet_{p}_")), None)
        if kind is None:
            raise ValueError(f"{name}: not an LLLite module name (expected lllite_unet_<input_blocks|middle_block|"
                             f"output_blocks>_...)")
        blocks.add(kind)
    lllite = attach_lllite(unet, cond_emb_dim, mlp_dim, blocks, dropout, vae_scale_factor)
    try:
        for name, h in hyper.items():
            if name in lllite and lllite[name].depth != h["depth"]:
                raise ValueError(f"{name}: the file has depth {h['depth']} but this UNet's block sees image/"
                                 f"{image_reduction(lllite[name].depth)} (depth {lllite[name].depth}): "
                                 f"the file was trained for another base model")
        lllite.load_kohya_state_dict(state_dict)
    except ValueError:
        detach_lllite(unet)  # leave the UNet as it was
        raise
    return lllite


def detach_lllite(unet: nn.Module) -> int:
    """Put plain nn.Linear layers (same weight and bias) back; returns how many were unwrapped."""
    wrapped = [name for name, m in unet.named_modules() if isinstance(m, LLLiteLinear)]
    for name in wrapped:
        unet.set_submodule(name, unet.get_submodule(name).unwrap())
    return len(wrapped)


def unet_base_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state_dict without the LLLite children: the same keys as before attaching."""
    prefixes = tuple(f"{name}.lllite." for name, m in unet.named_modules() if isinstance(m, LLLiteLinear))
    return {k: v for k, v in unet.state_dict().items() if not k.startswith(prefixes)}


def set_trainable(unet: nn.Module, lllite: LLLite) -> list[nn.Parameter]:
    """Freeze the whole UNet, then unfreeze only the LLLite modules; returns the parameters to optimise."""
    unet.requires_grad_(False)
    lllite.requires_grad_(True)
    return list(lllite.parameters())
