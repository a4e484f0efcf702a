"""Will it fit my card? The peak GPU memory of a training run, estimated on a machine without a GPU.

    python -m tinylllite.memory --base sd15 --control controlnet --batch-size 4 --mixed-precision bf16
    python -m tinylllite.memory --base sdxl --control lllite --resolution 1024 --gradient-checkpointing --json
    python -m tinylllite.memory --table          # the "fits your card" table of docs/memory.md

How: the run's real modules (built from the shipped configs, `tinylllite/sd/configs/*.json`, or the family
of a given checkpoint) are made on torch's `meta` device, which has every tensor's shape, dtype and size but
no storage, so SD1.5 and SDXL cost no memory and no time to build. Then one training step of
tutorial_train.py runs on them, through the project's own code: `control_branch.build`,
`training.prepare_trainable`, `cast_frozen_weights_to_half`, `make_optimizer`, `TrainingLoss`,
`FiniteCheck`, `optimizer_step`, and without `--cache` the VAE and text encoders of `BatchEncoder`.
`PeakTracker` follows every tensor storage's lifetime through the step (what torch's `MemTracker`,
torch/distributed/_tools/mem_tracker.py, does, tagging parameters / gradients / optimizer state /
activations; MemTracker itself refuses models with frozen parameters, see `trace_step`) and keeps the
breakdown at the peak. The optimizer's state is made first, as a run's first step makes it.
The meta device stands for the GPU. What CUDA decides and a CPU-only torch cannot run is imitated here,
each in one place (`CudaRules`, `as_if_on_cuda`):
- autocast: torch.autocast("cuda") sets its usual thread-local state (its "is CUDA there?" check is
  answered yes), and `CudaRules` applies CUDA autocast's per-op policy to the meta tensors: the op lists of
  aten/src/ATen/autocast_mode.h (convolutions and matmuls in bf16/fp16; norms, losses, exp, upsampling in
  fp32; softmax/sum in fp32; a few ops at the widest input type), with its cache of the lower-precision
  copies of trainable fp32 weights (kept until the autocast region ends). Gradient checkpointing's
  recomputation re-enters the same state, as on a GPU;
- attention: `F.scaled_dot_product_attention` runs the kernel CUDA would pick (torch.nn.attention
  SDPBackend): FlashAttention for fp16/bf16 with head size <= 256 and no mask, else memory-efficient
  attention, else the math fallback, which stores the attention matrix;
- torch's fused AdamW (what `make_optimizer` builds on CUDA) on meta parameters;
- host reads (`.item()`, `.tolist()`): answered 0 and listed in `host_reads`. A training step of
  tutorial_train.py reads nothing back, except fp16 with 8-bit Adam: the GradScaler reads found_inf (0 here,
  the step is taken); torch's fused AdamW takes found_inf on the device instead;
- 8-bit Adam: bitsandbytes is CUDA-only, so a stand-in with AdamW8bit's state layout runs instead
  (Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
  bitsandbytes `Optimizer2State`): per parameter two uint8 states of its shape plus one fp32 absmax per
  256-element block for each, and the plain fp32 pair for tensors under 4096 elements.

Not seen by the trace: cuBLAS/cuDNN workspaces (a stated allowance, `KERNEL_WORKSPACE_BYTES`, is added to
the step's peak), the CUDA context and library handles (`CUDA_CONTEXT_BYTES`, outside
`torch.cuda.max_memory_allocated`; counted only against a card's memory), the caching allocator's rounding
and fragmentation (`check_fits` keeps `ALLOCATOR_MARGIN` free for them).
The estimate follows tutorial_train.py; `fixture_configuration` is the bench/train_step.py step the
measured fixtures (tests/fixtures/gpu_peaks_h200.json) come from. Left out: multi-GPU (per process the same
as one GPU, plus DDP's gradient buckets), torch.compile, EMA.
"""
import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import sys
import traceback
import types
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tinylllite.errors import InputError

GIB = 2**30
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + library handles (CUDA 12, H100/H200): outside torch's allocator
# Kernel workspaces the trace cannot see but torch.cuda.max_memory_allocated counts: cuBLAS's (32 MiB per handle on
# Hopper; the forward and the autograd thread each have one) and cuDNN's, whose convolution algorithms are picked
# at run time. 384 MiB is what the four H200 measurements exceed the trace by (0.37-0.44 GiB, and 0.85 with the
# ControlNet's gradient checkpointing; tests/fixtures/gpu_peaks_h200.json).
KERNEL_WORKSPACE_BYTES = 384 * 2**20
ALLOCATOR_MARGIN = 0.10  # the caching allocator reserves more than it hands out (rounding, fragmentation)
BASES = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}  # --base name -> family of the shipped config
RESOLUTIONS = {"sd1": 512, "sd2": 768, "sdxl": 1024}  # each family's training resolution (SD2.1: 768-v)
CONTROLS = ("controlnet", "lllite")
PRECISIONS = {"no": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}  # --mixed-precision -> training's name
META = torch.device("meta")


# ---- CUDA's rules, on the meta device -------------------------------------------------------------------------

# aten/src/ATen/autocast_mode.h, the op lists every autocast backend shares (CUDA's registrations use all four)
LOWER_PRECISION_OPS = ("_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm",
                       "mv", "linalg_vecdot", "vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
                       "linalg_multi_dot", "multi_dot", "scaled_dot_product_attention", "__matmul__", "__rmatmul__")
FP32_OPS = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
            "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm", "group_norm",
            "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
            "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
            "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
            "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
            "norm", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
            "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d")
FP32_SET_DTYPE_OPS = ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "vector_norm",
                      "linalg_matrix_norm", "matrix_norm", "sum")
PROMOTE_OPS = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sample", "grid_sampler",
               "index_put", "tensordot", "scatter_add")
INTERPOLATE_FP32_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")  # upsample_* above


def _python_entries(names) -> list:
    """Every public Python callable that reaches these aten ops: torch.X, Tensor.X, F.X, torch._C._nn.X, linalg.X."""
    found = []
    for name in names:
        for namespace in (torch, torch.Tensor, F, torch._C._nn, torch.linalg):
            entry = getattr(namespace, name, None)
            if callable(entry) and entry not in found:
                found.append(entry)
    return found


AUTOCAST_POLICY = {**{f: "lower" for f in _python_entries(LOWER_PRECISION_OPS)},
                   **{f: "fp32" for f in _python_entries(FP32_OPS)},
                   **{f: "fp32_dtype" for f in _python_entries(FP32_SET_DTYPE_OPS)},
                   **{f: "promote" for f in _python_entries(PROMOTE_OPS)},
                   F.interpolate: "interpolate"}


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


class CudaRules(TorchFunctionMode):
    """CUDA autocast's op policy and CUDA's attention kernel choice, applied to meta tensors (see the module doc).

    The policy is read from autocast's own state for "cuda" (`torch.is_autocast_enabled("cuda")`), which
    `torch.autocast("cuda")` and checkpoint's recomputation set as on a GPU. `casts` is autocast's weight
    cache: the lower-precision copy of each trainable fp32 leaf, alive until the outermost autocast exits.
    """

    def __init__(self):
        super().__init__()
        self.casts: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self.sdpa_kernels: dict[str, int] = {}  # which attention kernel ran how often, for the report

    def _cast(self, x, dtype: torch.dtype):
        if not _floating(x) or x.dtype == dtype:
            return x
        cacheable = (dtype != torch.float32 and x.dtype == torch.float32 and x.requires_grad and x.is_leaf
                     and torch.is_autocast_cache_enabled())
        if cacheable and id(x) in self.casts and self.casts[id(x)][0]() is x:
            return self.casts[id(x)][1]
        cast = x.to(dtype)
        if cacheable:
            self.casts[id(x)] = (weakref.ref(x), cast)
        return cast

    def clear_cache(self) -> None:
        self.casts.clear()

    def _apply_policy(self, func, args, kwargs):
        policy = AUTOCAST_POLICY.get(func)
        if policy is None or not torch.is_autocast_enabled("cuda"):
            return args, kwargs
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if policy == "interpolate":
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            policy = "fp32" if mode in INTERPOLATE_FP32_MODES else None
        if policy == "lower":
            dtype = torch.get_autocast_dtype("cuda")
        elif policy == "fp32":
            dtype = torch.float32
        elif policy == "promote":
            floats = [x.dtype for x in tensors if _floating(x)]
            dtype = max(floats, key=lambda d: torch.finfo(d).bits) if floats else None
        elif policy == "fp32_dtype":  # no dtype given and a floating first input: compute and return fp32
            first = tensors[0] if tensors else None
            given = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
            if _floating(first) and not given:
                kwargs = dict(kwargs, dtype=torch.float32)
            return args, kwargs
        else:
            return args, kwargs
        if dtype is None:
            return args, kwargs
        return torch.utils._pytree.tree_map(lambda x: self._cast(x, dtype), (args, kwargs))

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        """The SDPA kernel CUDA picks on an sm80+ GPU (torch/nn/attention, sdp_utils.cpp): flash, efficient, math."""
        head = query.shape[-1]
        four_d = query.dim() == key.dim() == value.dim() == 4 and not enable_gqa
        half = query.dtype in (torch.float16, torch.bfloat16) and query.dtype == key.dtype == value.dtype
        if four_d and half and attn_mask is None and head <= 256 and head % 8 == 0 and value.shape[-1] == head:
            self.sdpa_kernels["flash"] = self.sdpa_kernels.get("flash", 0) + 1
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                      scale=scale)[0]
        if four_d and head % (8 if half else 4) == 0 and value.shape[-1] % (8 if half else 4) == 0:
            self.sdpa_kernels["efficient"] = self.sdpa_kernels.get("efficient", 0) + 1
            bias = attn_mask
            if bias is not None and bias.dtype == torch.bool:
                bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, -math.inf)
            if bias is not None:
                bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, grad, dropout_p,
                                                                          is_causal, scale=scale)[0]
        self.sdpa_kernels["math"] = self.sdpa_kernels.get("math", 0) + 1
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)

    def _backward(self, loss: torch.Tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """`loss.backward()` with these rules still on: a mode is switched off while it handles a call, but
        gradient checkpointing recomputes blocks inside the backward pass. So the engine is called directly, as
        torch.autograd.backward does once its own __torch_function__ check has passed."""
        from torch.autograd.graph import _engine_run_backward

        grad = torch.ones_like(loss) if gradient is None else gradient
        with self:
            _engine_run_backward((loss,), (grad,), create_graph if retain_graph is None else retain_graph,
                                 create_graph, tuple(inputs or ()), allow_unreachable=True, accumulate_grad=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = self._apply_policy(func, args, kwargs or {})
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is torch.Tensor.backward:
            return self._backward(*args, **kwargs)
        return func(*args, **kwargs)


class HostReads(TorchDispatchMode):
    """Answers every device -> host read (`.item()`, `.tolist()`, `bool(t)`) with 0 and notes where it came from."""

    INTERNAL = ("torch/_tensor.py", "torch/utils/_python_dispatch.py", "torch/_ops.py", "torch/overrides.py",
                "torch/_dynamo", "torch/_compile.py", "torch/utils/_contextlib.py", "contextlib.py", "run/memory.py")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    @classmethod
    def where(cls) -> str:
        """The read and the project's call that led to it: "grad_scaler.py:461 _maybe_opt_step, from training.py:164
        optimizer_step"."""
        frames = [f for f in traceback.extract_stack() if not any(part in f.filename for part in cls.INTERNAL)]
        if not frames:
            return "?"
        name = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}"  # noqa: E731
        ours = [f for f in frames if "tinylllite" in f.filename or "tutorial_train" in f.filename]
        return name(frames[-1]) + (f", from {name(ours[-1])}" if ours and ours[-1] is not frames[-1] else "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            where = self.where()
            if where not in self.reads:
                self.reads.append(where)
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


class AdamW8bitLayout(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as far as memory goes: its state tensors, allocated at the first step, updated in
    place (Dettmers et al. 2022, block-wise quantisation; bitsandbytes `Optimizer2State`, blocksize 256)."""

    BLOCK = 256  # elements per absmax block of the 8-bit optimizer states
    MIN_8BIT_SIZE = 4096  # smaller tensors keep 32-bit states

    def __init__(self, params, lr=1e-3, weight_decay=0.01, **unused):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @staticmethod
    def state_bytes(numel: int) -> int:
        """Bytes of AdamW8bit's state for one parameter of `numel` elements."""
        if numel < AdamW8bitLayout.MIN_8BIT_SIZE:
            return 2 * 4 * numel  # exp_avg, exp_avg_sq in fp32
        blocks = -(-numel // AdamW8bitLayout.BLOCK)
        return 2 * numel + 2 * 4 * blocks  # state1, state2 uint8 + absmax1, absmax2 fp32

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.numel() < self.MIN_8BIT_SIZE:
                        state["state1"], state["state2"] = torch.zeros_like(p), torch.zeros_like(p)
                    else:
                        blocks = -(-p.numel() // self.BLOCK)
                        state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["step"] += 1
                p.add_(p.grad, alpha=-group["lr"])  # the update is one fused kernel in place: no temporaries
        return None


@contextlib.contextmanager
def as_if_on_cuda():
    """Run the project's CUDA path on meta tensors: yields (CudaRules, HostReads) for the report.

    Each patch answers one question a CPU-only torch answers "no" to; all are undone on exit.
    """
    from tinylllite import training

    rules, reads = CudaRules(), HostReads()
    clear_autocast_cache = torch.clear_autocast_cache

    def clear_both():  # torch.autocast clears its weight cache when the outermost region exits; so does ours
        clear_autocast_cache()
        rules.clear_cache()

    fused = getattr(training, "FUSED_ADAMW_DEVICES", ())
    bitsandbytes = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bitLayout))
    with contextlib.ExitStack() as stack:
        for target, value in (
                ("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),  # torch.autocast("cuda")
                ("torch.cuda.is_bf16_supported", lambda *a, **k: True),
                ("torch.clear_autocast_cache", clear_both),
                ("torch.optim.optimizer._get_fused_kernels_supported_devices",  # fused AdamW on meta params
                 lambda: ["cuda", "meta"]),
                ("torch.utils.checkpoint._infer_device_type", lambda *args: "cuda")):  # recompute under cuda autocast
            stack.enter_context(mock.patch(target, value))
        if "cuda" in fused:  # make_optimizer's rule for cuda, applied to the meta device that stands for it
            stack.enter_context(mock.patch.object(training, "FUSED_ADAMW_DEVICES", (*fused, "meta")))
        stack.enter_context(mock.patch.dict(sys.modules, {"bitsandbytes": bitsandbytes}))
        stack.enter_context(rules)
        stack.enter_context(reads)
        yield rules, reads


# ---- the run: what tutorial_train.py builds, on the meta device -------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """One training run, as tutorial_train.py's settings name it (defaults: the sd15 preset)."""

    family: str = "sd1"  # "sd1", "sd2", "sdxl" or "tiny"
    control: str = "controlnet"  # "controlnet" or "lllite"
    batch_size: int = 4
    resolution: int | None = None  # pixels per side; None = the family's own
    mixed_precision: str = "bf16"  # "fp32", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    cache: bool = False  # --cache: latents and text embeddings from disk, no VAE/text encoder in the step
    gradient_accumulation: int = 1
    max_grad_norm: float | None = None
    sd_locked: bool = True
    only_mid_control: bool = False
    snr_gamma: float | None = None
    cond_emb_dim: int = 32
    mlp_dim: int = 64
    lllite_blocks: str | None = None  # None = kohya's default set
    channels_last: bool = False
    batch_in_memory: bool = False  # bench/train_step.py: an fp32 batch already on the device (the fixtures)

    @property
    def side(self) -> int:
        return self.resolution or RESOLUTIONS.get(self.family, 64)

    def describe(self) -> str:
        switches = [name for name, on in (("gradient checkpointing", self.gradient_checkpointing),
                                          ("8-bit Adam", self.use_8bit_adam), ("cache", self.cache)) if on]
        return (f"{self.family} {self.control}, batch {self.batch_size}, {self.side} px, {self.mixed_precision}"
                + (f", {', '.join(switches)}" if switches else ""))


def fixture_configuration(control: str, gradient_checkpointing: bool) -> RunConfig:
    """The step bench/gpu_suite.sh measured: bench/train_step.py --shape sd15 --precision bf16 --batch 4, SD1.5
    shapes at 512 px, frozen parts in bf16, the batch (fp32 latents, noise, text, hint) already on the GPU so no
    VAE or text encoder runs, NCHW, clipping at 1.0, make_optimizer's fused AdamW, no fp16 scaler."""
    return RunConfig(family="sd1", control=control, batch_size=4, resolution=512, mixed_precision="bf16",
                     gradient_checkpointing=gradient_checkpointing, max_grad_norm=1.0, batch_in_memory=True)


def family_of(base: str) -> str:
    """--base sd15 / sd21 / sdxl / tiny, or a checkpoint file or diffusers folder (its family read from the weights)."""
    if base in BASES:
        return BASES[base]
    if base == "tiny":
        return "tiny"
    path = Path(base)
    if not path.exists():
        raise InputError(f"--base {base}: neither one of {', '.join([*BASES, 'tiny'])} nor an existing file or folder")
    from tinylllite.files.identify import identify

    info = identify(path)
    if info.kind != "sd" and info.layout != "full":
        raise InputError(f"--base {base} holds {info.describe()}, not a Stable Diffusion base")
    if info.family not in ("sd1", "sd2", "sdxl"):
        raise InputError(f"--base {base}: its family {info.family!r} has no shipped config; use sd15, sd21 or sdxl")
    return info.family


def meta_base(family: str):
    """The family's VAE, UNet and text encoder(s) from the shipped configs, on the meta device (no memory)."""
    from tinylllite.sd.base import StableDiffusionBase
    from tinylllite.sd.tokenizer import clip_tokenizer

    if family == "tiny":
        from tinylllite.sd import tiny_sd

        with torch.device(META), torch.random.fork_rng(devices=[]):
            vae, unet, text_encoder = tiny_sd.build_tiny_parts()
        return StableDiffusionBase(family="tiny", unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                                   tokenizer=clip_tokenizer(), scheduler_config=dict(tiny_sd.SCHEDULER_CONFIG))
    return config_base(family, torch.device(META))


def config_base(family: str, device: torch.device):
    """An SD1/SD2/SDXL base built from the family's shipped config with random weights, created on `device`
    (the meta device here: no memory; bench/common.py: the GPU it is timed on)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tinylllite.files.sd_loading import family_config
    from tinylllite.sd.base import StableDiffusionBase
    from tinylllite.sd.tokenizer import clip_tokenizer

    config = family_config(family)
    with device:
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])).eval()
                          if family == "sdxl" else None)
    return StableDiffusionBase(
        family=family, unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(config["pad_token"]), text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(config["pad_token_2"]) if family == "sdxl" else None,
        prediction_type=config["scheduler"]["prediction_type"], scheduler_config=config["scheduler"])


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors' storages (a meta storage has a size but no address: told apart by tensor)."""
    distinct = {id(t): t for t in tensors if t is not None}
    return sum(t.untyped_storage().nbytes() for t in distinct.values())


def module_tensors(*modules) -> list[torch.Tensor]:
    """Every distinct parameter and buffer of the modules (an LLLite's live inside the UNet: counted once)."""
    found = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            found[id(t)] = t
    return list(found.values())


def check_config(config: RunConfig, base) -> None:
    """Refuse what tutorial_train.py would refuse (or what no UNet of the family can run), in one line."""
    if config.control not in CONTROLS:
        raise InputError(f"--control {config.control!r}: choose {' or '.join(CONTROLS)}")
    if config.mixed_precision not in ("fp32", "fp16", "bf16"):
        raise InputError(f"--mixed-precision {config.mixed_precision!r}: choose no, fp16 or bf16")
    for flag, value in (("--batch-size", config.batch_size), ("--gradient-accumulation", config.gradient_accumulation)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    levels = len(base.unet.config.block_out_channels) - 1  # the UNet halves the latent this many times
    multiple = base.vae_scale_factor * 2**levels
    if config.side < multiple or config.side % multiple:
        raise InputError(f"--resolution {config.side}: a {config.family} UNet needs a multiple of {multiple} px "
                         f"(e.g. {max(multiple, config.side // multiple * multiple)})")
    if config.control == "lllite" and (not config.sd_locked or config.only_mid_control):
        raise InputError("--sd-locked false / --only-mid-control are ControlNet options; LLLite has no such switch")


@dataclass
class Run:
    """The built run and one step of its loop (`step()`), with what the tracker must know about."""

    config: RunConfig
    base: object
    control: object
    params: list
    optimizer: object
    step: object
    external: list  # tensors alive across steps that are neither module tensors nor optimizer state
    load_bytes: int  # the load peak of a base moved in fp32 and cast on the GPU (bench/train_step.py's own base)
    half_load_bytes: int  # tutorial_train.py's: the frozen parts cast to half precision on the host, then moved


def _fake_samples(config: RunConfig, base) -> dict:
    """What SampleStream collates for one micro-batch, on the host (expanded views: no real memory)."""
    b, side, f = config.batch_size, config.side, base.vae_scale_factor
    latent = (b, base.vae.config.latent_channels, side // f, side // f)
    host = lambda *shape: torch.zeros((1,) + shape[1:]).expand(shape)  # noqa: E731
    return dict(index=torch.arange(b), image=host(b, 3, side, side), hint=host(b, 3, side, side),
                prompt=["cyan circle with brown background"] * b, timestep=torch.zeros(b, dtype=torch.int64),
                noise=host(*latent), vae_eps=host(*latent))


class _CacheStub:
    """A LatentCache whose entries are host tensors of the cached shapes and dtypes (BatchEncoder reads it)."""

    def __init__(self, config: RunConfig, base, samples: dict):
        f = base.vae_scale_factor
        latent = (base.vae.config.latent_channels, config.side // f, config.side // f)
        moment = torch.zeros((1,) + latent[1:], dtype=base.vae.dtype).expand(latent)  # the VAE's dtype at fill time
        self.moments = {i: (moment, moment) for i in samples["index"].tolist()}
        hidden, pooled = base.encode_prompt(samples["prompt"][:1])  # (1, 77, D) on meta: only the shape is read
        text = torch.zeros(hidden.shape[1:], dtype=hidden.dtype)
        pool = None if pooled is None else torch.zeros(pooled.shape[1:], dtype=pooled.dtype)
        self.text = {p: (text, pool) for p in samples["prompt"]}


def build_run(config: RunConfig) -> Run:
    """tutorial_train.py's setup on the meta device standing for the GPU, and its loop body as `step()`."""
    from tinylllite import control_branch, hint, training
    from tinylllite.run import batches

    cuda = torch.device("cuda")  # what the run's device-type questions (autocast, GradScaler) are asked with
    precision = config.mixed_precision
    base = meta_base(config.family)
    check_config(config, base)
    control = control_branch.build(config.control, base, config.cond_emb_dim, config.mlp_dim, config.lllite_blocks)
    if config.channels_last:
        training.use_channels_last(base, control)
    load_bytes = tensor_bytes(module_tensors(*base.parts().values(), control))  # fp32, before the cast
    named = training.prepare_trainable(base, control, config.sd_locked)
    params = [p for _, p in named]
    if config.gradient_checkpointing:
        control_branch.enable_gradient_checkpointing(base.unet, control)
    training.cast_frozen_weights_to_half(base, precision)  # tutorial_train.py does this on CUDA
    optimizer = training.make_optimizer(params, 1e-5, use_8bit=config.use_8bit_adam)
    scaler = training.grad_scaler(cuda, precision)
    scheduler = training.training_scheduler(base)
    loss_fn = training.TrainingLoss(base, control, scheduler, params, config.snr_gamma, config.only_mid_control)
    finite = training.FiniteCheck(named, META)
    autocast = training.autocast(cuda, precision)
    window = torch.zeros((), device=META)
    samples = _fake_samples(config, base)
    if config.batch_in_memory:  # bench/common.py random_batch: fp32 tensors already on the device
        b, side, f = config.batch_size, config.side, base.vae_scale_factor
        hidden, pooled = base.encode_prompt(samples["prompt"])
        latent = (b, base.vae.config.latent_channels, side // f, side // f)
        fixed = dict(latents=torch.zeros(latent, device=META), noise=torch.zeros(latent, device=META),
                     timesteps=torch.zeros(b, dtype=torch.int64, device=META), hidden=hidden.float(),
                     added_cond_kwargs=base.added_cond_kwargs(pooled, side, side),
                     hint=torch.zeros(b, 3, side, side, device=META))
        encode = lambda samples: fixed  # noqa: E731
        external = [t for t in torch.utils._pytree.tree_leaves(fixed) if isinstance(t, torch.Tensor)]
    else:
        encode = batches.BatchEncoder(base, _CacheStub(config, base, samples) if config.cache else None)
        external = []
    external += [window, *vars(finite).values()]
    accumulation = config.gradient_accumulation

    def step():  # the body of tutorial_train.py's `while` loop (one process)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(accumulation):
            batch = encode(samples)
            with autocast, hint.checked_on_host():
                loss = loss_fn(batch)
            finite.add_loss(loss)
            loss = loss / accumulation
            (scaler.scale(loss) if scaler else loss).backward()
            window.add_(loss.detach())  # tutorial_train.py: window += loss.detach()
        training.optimizer_step(optimizer, scaler, params, config.max_grad_norm, finite)
        finite.next_step()

    everything = module_tensors(*base.parts().values(), control)
    half_load = tensor_bytes(everything)  # after the cast: frozen parts in half precision, the branch in fp32
    return Run(config, base, control, params, optimizer, step, [t for t in external if isinstance(t, torch.Tensor)],
               load_bytes, half_load)


# ---- the trace and the estimate -------------------------------------------------------------------------------

@dataclass
class Estimate:
    """The peak GPU memory of a run, in bytes: the step's peak by kind (at the moment of the peak) and the load's."""

    config: RunConfig
    frozen: int  # the base's frozen weights and buffers (half precision on a GPU)
    parameters: int  # the trained weights (fp32)
    gradients: int  # their gradients alive at the step's peak
    optimizer_state: int  # AdamW's exp_avg/exp_avg_sq (or 8-bit Adam's states)
    activations: int  # the rest at the step's peak: saved activations, autocast's weight copies, temporaries
    traced_peak: int  # the sum of the five above: every tensor alive at the step's peak
    load_peak: int  # a base moved to the GPU in fp32 and cast there, with the fp32 branch (the bench step's)
    half_load_peak: int  # tutorial_train.py: frozen parts cast to half precision on the host, then moved
    kernel_workspace: int = KERNEL_WORKSPACE_BYTES  # cuBLAS/cuDNN workspaces, not traced (see the constant)
    cuda_context: int = CUDA_CONTEXT_BYTES  # not allocated by torch: only for comparing with a card's memory
    host_reads: list[str] = field(default_factory=list)
    attention_kernels: dict[str, int] = field(default_factory=dict)
    trace_seconds: float = 0.0

    @property
    def step_peak(self) -> int:
        """torch.cuda.max_memory_allocated over a training step after the first: what the fixtures measured."""
        return self.traced_peak + self.kernel_workspace

    @property
    def peak(self) -> int:
        """torch.cuda.max_memory_allocated over the whole run, loading included."""
        return max(self.step_peak, self.half_load_peak)

    def card_bytes(self, half_load: bool = True) -> int:
        """The memory a card needs: the peak plus the allocator's margin plus the CUDA context."""
        peak = max(self.step_peak, self.half_load_peak if half_load else self.load_peak)
        return math.ceil(peak * (1 + ALLOCATOR_MARGIN)) + self.cuda_context

    PARTS = ("frozen", "parameters", "gradients", "optimizer_state", "activations", "kernel_workspace", "step_peak",
             "load_peak", "half_load_peak", "peak", "cuda_context")

    def as_dict(self) -> dict:
        numbers = {k: getattr(self, k) for k in self.PARTS} | {"card_bytes": self.card_bytes()}
        return dict(config=asdict(self.config), bytes=numbers, gib={k: round(v / GIB, 3) for k, v in numbers.items()},
                    host_reads=self.host_reads, attention_kernels=self.attention_kernels,
                    trace_seconds=round(self.trace_seconds, 1))

    def describe(self) -> str:
        rows = [("frozen base weights", self.frozen), ("trained parameters", self.parameters),
                ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("activations and temporaries", self.activations),
                ("kernel workspaces (not traced, stated)", self.kernel_workspace), ("step peak", self.step_peak),
                ("load peak (frozen parts cast, then moved)", self.half_load_peak), ("peak", self.peak),
                (f"card needs (peak +{ALLOCATOR_MARGIN:.0%}, +{self.cuda_context / GIB:.1f} GiB CUDA context)",
                 self.card_bytes())]
        lines = [f"estimated peak GPU memory: {self.config.describe()} (the step's parts at its peak)"]
        lines += [f"  {name:<52} {value / GIB:6.2f} GiB" for name, value in rows]
        if self.half_load_peak > self.step_peak:
            lines.append("  the load decides: the frozen base and the fp32 branch on the GPU before the first step")
        if self.host_reads:
            lines.append(f"  host reads in the step (answered 0 here): {'; '.join(self.host_reads)}")
        return "\n".join(lines)


KINDS = ("frozen", "parameters", "gradients", "optimizer_state", "activations")


class PeakTracker(TorchDispatchMode):
    """Live bytes of every tensor storage, by kind, and the breakdown at the peak: torch.cuda.max_memory_allocated
    for meta tensors. What torch's MemTracker does, for models with frozen parts (see `trace_step`).

    A storage is counted when an op first outputs it and uncounted when it dies (a weak reference's callback).
    Kinds: what was alive before (`seed`), "activations" for everything made during the step, moved to
    "gradients" when autograd stores it as a trained parameter's `.grad`.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, kind, weak reference to the storage]
        self.total = {kind: 0 for kind in KINDS}
        self.peak, self.at_peak = 0, dict(self.total)

    def add(self, t: torch.Tensor, kind: str) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:  # a view, an in-place result, or a tensor seen before
            return
        nbytes = storage.nbytes()
        self.live[key] = [nbytes, kind, weakref.ref(storage, lambda _, key=key: self._free(key))]
        self.total[kind] += nbytes
        if sum(self.total.values()) > self.peak:
            self.peak, self.at_peak = sum(self.total.values()), dict(self.total)

    def relabel(self, t: torch.Tensor, kind: str) -> None:
        entry = self.live.get(id(t.untyped_storage()))
        if entry is None:
            return self.add(t, kind)
        self.total[entry[1]] -= entry[0]
        self.total[kind] += entry[0]
        entry[1] = kind

    def _free(self, key: int) -> None:
        nbytes, kind, _ = self.live.pop(key)
        self.total[kind] -= nbytes

    def seed(self, tensors, kind: str) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.add(t, kind)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, "activations")
        return out


def prime_optimizer(run: Run) -> None:
    """The state the optimizer makes at its first step (as the fixtures' warm-up steps did), without a forward
    pass: zero gradients, one optimizer step, gradients dropped again."""
    for p in run.params:
        p.grad = torch.zeros_like(p)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def trace_step(run: Run) -> PeakTracker:
    """The peak of one step of a run whose optimizer already holds its state (`prime_optimizer`).

    torch's MemTracker (torch/distributed/_tools/mem_tracker.py) cannot trace this in torch 2.13: it registers a
    gradient hook on every parameter of every module it enters, which raises for frozen parameters ("cannot
    register a hook on a tensor that doesn't require gradient"); `PeakTracker` keeps its bookkeeping.
    """
    prime_optimizer(run)
    tracker = PeakTracker()
    tracker.seed([t for t in module_tensors(*run.base.parts().values(), run.control) if not t.requires_grad], "frozen")
    tracker.seed(run.params, "parameters")
    tracker.seed(torch.utils._pytree.tree_leaves(list(run.optimizer.state.values())), "optimizer_state")
    tracker.seed(run.external, "activations")
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients")) for p in run.params]
    try:
        with tracker:
            run.step()
    finally:
        for hook in hooks:
            hook.remove()
    return tracker


def estimate(config: RunConfig) -> Estimate:
    """The estimate of one run: build it on the meta device, trace one step as on CUDA, sum up by kind."""
    import time

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), as_if_on_cuda() as (rules, reads):
        run = build_run(config)
        tracker = trace_step(run)
    at_peak = tracker.at_peak
    return Estimate(config=config, frozen=at_peak["frozen"], parameters=at_peak["parameters"],
                    gradients=at_peak["gradients"], optimizer_state=at_peak["optimizer_state"],
                    activations=at_peak["activations"], traced_peak=tracker.peak, load_peak=run.load_bytes,
                    half_load_peak=run.half_load_bytes, host_reads=reads.reads, attention_kernels=rules.sdpa_kernels,
                    trace_seconds=time.perf_counter() - started)


# ---- will it fit? ---------------------------------------------------------------------------------------------

SWITCHES = ("cache", "gradient_checkpointing", "use_8bit_adam")  # the memory switches, cheapest to use first
FLAGS = {"cache": "--cache", "gradient_checkpointing": "--gradient-checkpointing", "use_8bit_adam": "--use-8bit-adam"}


def check_fits(estimate_bytes: int, free_bytes: int) -> str | None:
    """None when a run whose estimated peak is `estimate_bytes` fits in `free_bytes` (torch.cuda.mem_get_info()[0],
    measured after CUDA started, so its context is already taken) with the allocator's margin; else why not."""
    needed = math.ceil(estimate_bytes * (1 + ALLOCATOR_MARGIN))
    if needed <= free_bytes:
        return None
    return (f"needs about {needed / GIB:.1f} GiB of GPU memory ({estimate_bytes / GIB:.1f} GiB estimated peak "
            f"+ {ALLOCATOR_MARGIN:.0%}), {free_bytes / GIB:.1f} GiB free")


def with_switches(config: RunConfig, switches) -> RunConfig:
    return replace(config, **{name: True for name in switches})


def switch_sets(config: RunConfig) -> list[tuple[str, ...]]:
    """The switches not yet on, as sets to try, fewest and cheapest first (cache costs nothing, checkpointing
    costs speed, 8-bit Adam needs bitsandbytes)."""
    off = [s for s in SWITCHES if not getattr(config, s)]
    sets = [combo for n in range(1, len(off) + 1) for combo in itertools.combinations(off, n)]
    return sorted(sets, key=lambda combo: (max(SWITCHES.index(s) for s in combo), len(combo)))


def what_would_fit(config: RunConfig, free_bytes: int, limit: int = 3) -> list[str]:
    """Up to `limit` ways to make `config` fit in `free_bytes`, each estimated: the fewest added switches (no
    superset of a way already found), else a smaller batch with every switch, accumulation keeping the effective
    batch. Stops early when even every switch does not fit."""
    fits = lambda e: check_fits(e.peak, free_bytes) is None  # noqa: E731
    missing = tuple(s for s in SWITCHES if not getattr(config, s))
    flags = lambda combo: " ".join(FLAGS[s] for s in combo)  # noqa: E731
    everything = estimate(with_switches(config, missing)) if missing else None
    found, fitting = [], []
    if everything is not None and fits(everything):
        for combo in switch_sets(config):
            if any(set(smaller) <= set(combo) for smaller in fitting):
                continue
            result = everything if combo == missing else estimate(with_switches(config, combo))
            if fits(result):
                fitting.append(combo)
                found.append(f"{flags(combo)} ({result.peak / GIB:.1f} GiB)")
                if len(found) >= limit:
                    break
        return found
    batch = config.batch_size // 2
    while batch >= 1:
        accumulation = config.gradient_accumulation * config.batch_size // batch
        result = estimate(replace(with_switches(config, missing), batch_size=batch, gradient_accumulation=accumulation))
        if fits(result):
            found.append(f"--batch-size {batch} --gradient-accumulation {accumulation}"
                         f"{' ' + flags(missing) if missing else ''} ({result.peak / GIB:.1f} GiB)")
            break
        batch //= 2
    return found


def fitting_switches(config: RunConfig, free_bytes: int) -> tuple[str, ...] | None:
    """The fewest, cheapest switches (setting names) with which `config` fits in `free_bytes`, estimated; () when it
    fits as it is; None when no set does. 8-bit Adam is tried only where bitsandbytes is installed."""
    if check_fits(estimate(config).peak, free_bytes) is None:
        return ()
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    for combo in switch_sets(config):
        if "use_8bit_adam" in combo and not has_bitsandbytes:
            continue
        if check_fits(estimate(with_switches(config, combo)).peak, free_bytes) is None:
            return combo
    return None


def config_from_training(args, settings: dict | None = None, family: str | None = None,
                         resolution: int | None = None) -> RunConfig:
    """The RunConfig of a tutorial_train.py run: its parsed `args`, the resolved `settings` (resolve_settings), the
    loaded base's family and the data's image size. Missing settings fall back to the args, then the sd15 preset."""
    settings = dict(settings or {})
    defaults = RunConfig()
    names = ("batch_size", "mixed_precision", "gradient_checkpointing", "use_8bit_adam", "cache",
             "gradient_accumulation", "max_grad_norm", "sd_locked", "only_mid_control", "snr_gamma", "cond_emb_dim",
             "mlp_dim", "lllite_blocks", "channels_last")
    values = {name: settings.get(name, getattr(args, name, None)) for name in names}
    values = {name: value for name, value in values.items() if value is not None}
    if "mixed_precision" in values:
        values["mixed_precision"] = PRECISIONS.get(values["mixed_precision"], values["mixed_precision"])
    return replace(defaults, family=family or family_of(getattr(args, "base", "sd15")),
                   control=getattr(args, "control", defaults.control), resolution=resolution, **values)


def fit_advice(result: Estimate, free_bytes: int) -> str | None:
    """None when `result` fits in `free_bytes`; else one line: what it needs, and what would fit (estimated)."""
    problem = check_fits(result.peak, free_bytes)
    if problem is None:
        return None
    config = result.config
    ways = what_would_fit(config, free_bytes)
    advice = f"; would fit: {'; or '.join(ways)}" if ways else "; nothing tried fits: a larger GPU, or a smaller base"
    return f"{config.describe()}: {problem}{advice}"


def training_fit(args, free_bytes: int, settings: dict | None = None, family: str | None = None,
                 resolution: int | None = None) -> tuple[Estimate, str | None]:
    """For tutorial_train.py at start on CUDA: (the estimate, None) when the run fits in `free_bytes`, else
    (the estimate, one line saying what it needs and which switches or batch sizes would fit)."""
    result = estimate(config_from_training(args, settings, family, resolution))
    return result, fit_advice(result, free_bytes)


CARDS_GIB = (8, 12, 16, 24)
TABLE_SETUPS = (("SD1.5, 512 px", "sd1", 512), ("SDXL, 1024 px", "sdxl", 1024))
TABLE_MOST_BATCH = 64  # the table's search stops here ("64+")
TABLE_TOLERANCE = 0.05  # the table lists a switch only when the largest batch without it is more than 5 % smaller


def largest_batch(config: RunConfig, card_gib: float, half_load: bool, memo: dict, most: int = 64) -> int:
    """The largest batch size (up to `most`) whose estimate fits a card of `card_gib` GiB; 0 when batch 1 does not.

    The step's peak grows linearly with the batch (activations), so batches 1 and 2 predict the boundary and
    the estimates around the prediction confirm it."""
    def result(batch: int) -> Estimate:
        key = replace(config, batch_size=batch)
        if key not in memo:
            memo[key] = estimate(key)
        return memo[key]

    budget = card_gib * GIB
    fits = lambda batch: result(batch).card_bytes(half_load) <= budget  # noqa: E731
    if not fits(1):
        return 0
    slope = max(result(2).step_peak - result(1).step_peak, 1)
    room = (budget - result(1).card_bytes(half_load)) / (1 + ALLOCATOR_MARGIN)
    guess = int(min(most, max(1, 1 + room // slope)))
    low, high = (guess, guess + 1) if fits(guess) else (1, guess)  # fits(low), not fits(high) unless high > most
    while fits(high) if high <= most else False:  # the guess was short: step up, doubling the step
        low, high = high, min(most + 1, high + 2 * (high - low))
    while high - low > 1:  # bisect between a batch that fits and one that does not
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fits_table(cards=CARDS_GIB, setups=TABLE_SETUPS, controls=CONTROLS, precision: str = "bf16",
               half_load: bool = True, memo: dict | None = None, progress=None) -> str:
    """The "fits your card" table (markdown): per card and setup, the largest batch and the fewest switches for it.

    The largest batch is found with every switch on (cache, gradient checkpointing, 8-bit Adam); then the
    costliest switches (8-bit Adam, then checkpointing, then the cache) are dropped while a batch within
    TABLE_TOLERANCE of it still fits, and the cell shows the largest batch of the switches left.
    half_load: the frozen parts cast to half precision before the move to the GPU, as tutorial_train.py does
    (False: moved in fp32 and cast there, as bench/train_step.py builds its base).
    `memo` (RunConfig -> Estimate) lets a second table reuse the first one's estimates."""
    memo = {} if memo is None else memo

    def fits(config: RunConfig, card: int) -> bool:
        if config not in memo:
            memo[config] = estimate(config)
        return memo[config].card_bytes(half_load) <= card * GIB

    header = "| card | " + " | ".join(f"{name} {KIND_LABELS[c]}" for name, _, _ in setups for c in controls) + " |"
    lines = [header, "|" + "---|" * (1 + len(setups) * len(controls))]
    for card in cards:
        cells = []
        for _, family, side in setups:
            for control in controls:
                config = RunConfig(family=family, control=control, resolution=side, mixed_precision=precision)
                if progress:
                    progress(f"{card} GB card, {family} {control} at {side} px")
                switches = SWITCHES
                batch = largest_batch(with_switches(config, switches), card, half_load, memo, most=TABLE_MOST_BATCH)
                if batch == 0:
                    cells.append("does not fit")
                    continue
                enough = max(1, math.ceil(batch * (1 - TABLE_TOLERANCE)))
                for name in reversed(SWITCHES):  # a switch stays only if it buys more than 5 % of the batch
                    fewer = tuple(s for s in switches if s != name)
                    if fits(replace(with_switches(config, fewer), batch_size=enough), card):
                        switches = fewer
                if switches != SWITCHES:
                    batch = largest_batch(with_switches(config, switches), card, half_load, memo, most=TABLE_MOST_BATCH)
                shown = f"{batch}+" if batch == TABLE_MOST_BATCH else f"{batch}"
                cells.append(shown + (f" ({', '.join(SHORT[s] for s in switches)})" if switches else ""))
        lines.append(f"| {card} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


KIND_LABELS = {"controlnet": "ControlNet", "lllite": "LLLite"}
SHORT = {"cache": "cache", "gradient_checkpointing": "GC", "use_8bit_adam": "8-bit Adam"}


# ---- the command ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tinylllite.memory", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="sd15", help="sd15, sd21, sdxl, tiny, or an SD checkpoint file / diffusers folder")
    p.add_argument("--control", choices=CONTROLS, default="controlnet")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=4)
    p.add_argument("--resolution", type=int, help="pixels per side (default: the family's, 512 SD1.5, 1024 SDXL)")
    p.add_argument("--mixed-precision", "--mixed_precision", dest="mixed_precision", choices=tuple(PRECISIONS),
                   default="bf16")
    p.add_argument("--gradient-checkpointing", "--gradient_checkpointing", dest="gradient_checkpointing",
                   action="store_true")
    p.add_argument("--use-8bit-adam", "--use_8bit_adam", dest="use_8bit_adam", action="store_true")
    p.add_argument("--cache", action="store_true", help="latents and text embeddings cached: no encoders in the step")
    p.add_argument("--gradient-accumulation", "--gradient_accumulation", dest="gradient_accumulation", type=int,
                   default=1)
    p.add_argument("--bench-step", action="store_true",
                   help="bench/train_step.py's step instead: an fp32 batch already on the GPU, clipping at 1.0")
    p.add_argument("--free-gib", type=float, help="also say whether it fits this much free GPU memory, and what would")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--table", action="store_true", help="print the fits-your-card table of docs/memory.md (minutes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tinylllite.errors import run_command

    return run_command("python -m tinylllite.memory", _main, argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        memo, progress = {}, (lambda text: print(f"  estimating: {text}", file=sys.stderr, flush=True))
        print(fits_table(memo=memo, progress=progress))
        return 0
    config = RunConfig(family=family_of(args.base), control=args.control, batch_size=args.batch_size,
                       resolution=args.resolution, mixed_precision=PRECISIONS[args.mixed_precision],
                       gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=args.use_8bit_adam,
                       cache=args.cache, gradient_accumulation=args.gradient_accumulation)
    if args.bench_step:
        config = replace(config, batch_in_memory=True, max_grad_norm=1.0)
    result = estimate(config)
    verdict = None
    if args.free_gib is not None:
        verdict = fit_advice(result, int(args.free_gib * GIB)) or "fits"
    if args.json:
        print(json.dumps(dict(result.as_dict(), fits=verdict) if verdict else result.as_dict(), indent=1))
    else:
        print(result.describe() + (f"\n  {args.free_gib:g} GiB free: {verdict}" if verdict else ""))
    return 0
