"""Convert control checkpoints between the layouts people share; every tensor passes through unchanged.

    python -m tinylllite.convert control_sd15_ini.ckpt control.safetensors --to original
    python -m tinylllite.convert control.safetensors ./controlnet-diffusers --to diffusers
    python -m tinylllite.convert ./controlnet-diffusers control.safetensors --to original
    python -m tinylllite.convert kohya_lllite.safetensors lllite.safetensors --to kohya --dtype fp16

Inputs (told apart by their keys, see control_io.py): this project's files, a full control_sd15_ini-style
file (the SD inside is left out of the output), lllyasviel's / A1111's control-only files, a diffusers
ControlNetModel folder, and kohya ControlNet-LLLite files (fp16 or bf16, with or without metadata).

    --to original   `control_model.*` only, the layout of the original code and of A1111 / ComfyUI
    --to diffusers  a folder loadable with `ControlNetModel.from_pretrained(folder)`
    --to kohya      kohya's LLLite layout (LLLite inputs only: a ControlNet has no LLLite form)

Without `--dtype` the tensors keep their dtype, so a round trip gives back the same numbers bit for bit.
Outputs get this project's metadata (architecture, base family, hint range and channels). Left out:
writing a full (SD + control) file; use tool_add_control.py for that.
"""

import argparse
import sys
from pathlib import Path

import torch

from tinylllite import ldm_format as lf
from tinylllite.control_io import (
    META, control_metadata, controlnet_config_from_shapes, detect_layout, file_metadata, lllite_family, lllite_metadata,
    read_control, read_lllite, refuse_existing, save_state_dict, write_control,
)
from tinylllite.sd_loading import open_state_dict, tensor_shapes

TARGETS = ("original", "diffusers", "kohya")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def _input_layout(src: Path) -> str:
    if src.is_dir():
        return "diffusers"
    return detect_layout(open_state_dict(src).keys())


def _original_from_ldm(src: Path, out: Path, dtype) -> int:
    """original/full -> original: keep `control_model.*` (adding the prefix where a file lacks it)."""
    sd = open_state_dict(src)
    prefixed = any(k.startswith(lf.CONTROL_PREFIX) for k in sd)
    control = {k if prefixed else lf.CONTROL_PREFIX + k: sd[k] for k in sd if not prefixed or k.startswith(lf.CONTROL_PREFIX)}
    metadata = file_metadata(sd)
    shapes = tensor_shapes(control)
    try:  # full metadata where the family is known (or the file says it); else the facts read from the keys
        config = controlnet_config_from_shapes(shapes, metadata)
        metadata |= control_metadata(config, lf.CROSS_WIDTH_TO_FAMILY.get(config["cross_attention_dim"], "tiny"))
    except ValueError:
        hint = shapes[lf.CONTROL_PREFIX + "input_hint_block.0.weight"]
        metadata |= {META + "architecture": "controlnet", META + "hint_channels": str(hint[1])}
    save_state_dict(_cast(control, dtype), out, metadata if out.suffix == ".safetensors" else None)
    return len(control)


def convert(src, out, to: str, dtype: torch.dtype | None = None) -> str:
    """Convert `src` to the `to` layout at `out`; returns a one-line summary."""
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of {TARGETS}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    refuse_existing(out)
    layout = _input_layout(src)

    if layout == "kohya":
        if to != "kohya":
            raise ValueError(f"{src} is a ControlNet-LLLite (kohya) file; it converts only --to kohya")
        tensors, metadata = read_lllite(src)
        tensors = _cast(tensors, dtype)
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: kohya LLLite files are .safetensors")
        save_state_dict(tensors, out, {**metadata, **lllite_metadata(tensors, lllite_family(tensors, metadata))})
        return f"LLLite ({len(tensors)} tensors) -> {out}"
    if to == "kohya":
        raise ValueError(f"{src} is a ControlNet ({layout} layout); only ControlNet-LLLite files convert --to kohya")
    if to == "original" and layout in ("original", "full"):
        return f"ControlNet ({layout} layout, {_original_from_ldm(src, out, dtype)} tensors) -> {out}"
    tensors, config, metadata = read_control(src)
    write_control(_cast(tensors, dtype), config, out, to, metadata)
    return f"ControlNet ({layout} layout, {len(tensors)} tensors) -> {out} ({to} layout)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinylllite.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="control file (.safetensors/.ckpt/.pth) or diffusers ControlNet folder")
    parser.add_argument("output", help="file or folder to create; never overwritten")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the tensors (default: keep their dtype)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to, DTYPES.get(args.dtype)))
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as error:
        print(f"convert: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
