"""Convert control checkpoints between the layouts people share; every tensor passes through unchanged.

    python -m tinylllite.convert control_sd15_ini.ckpt control.safetensors --to original
    python -m tinylllite.convert control.safetensors ./controlnet-diffusers --to diffusers
    python -m tinylllite.convert ./controlnet-diffusers control.safetensors --to original
    python -m tinylllite.convert kohya_lllite.safetensors lllite.safetensors --to kohya --dtype fp16

Inputs (told apart by `identify.py`): this project's files and training checkpoints'
`control.safetensors`, a full control_sd15_ini-style file (the SD inside is left out of the output),
lllyasviel's / A1111's control-only files, a diffusers ControlNetModel folder or its weights file, and
kohya ControlNet-LLLite files (fp16 or bf16, with or without metadata).

    python -m tinylllite.convert runs/x/checkpoints/step_0001000/control.safetensors control.safetensors --to original

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

from tinylllite.files.control_io import (check_finite, control_metadata, file_controlnet_config, lllite_metadata,
                                         read_control, write_control)
from tinylllite.errors import InputError, run_command
from tinylllite.files.identify import META, identify, ldm_control_tensors
from tinylllite.files.state_dicts import SAFETENSORS, refuse_existing, save_state_dict
from tinylllite.files.atomic import refuse_unwritable

TARGETS = ("original", "diffusers", "kohya")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) for k, v in tensors.items()}


def convert(src, out, to: str, dtype: torch.dtype | None = None) -> str:
    """Convert `src` to the `to` layout at `out`; returns a one-line summary."""
    out = Path(out)
    if to not in TARGETS:
        raise InputError(f"--to {to!r}: choose one of {TARGETS}")
    info = identify(src)
    refuse_existing(out)
    refuse_unwritable(out)  # before any tensor is read
    if info.kind == "sd":
        raise InputError(f"{src} is {info.describe()}, not a control checkpoint: tool_add_control.py adds a "
                         f"fresh ControlNet to it")
    if info.kind == "lllite":
        if to != "kohya":
            raise InputError(f"{src} is a ControlNet-LLLite (kohya) file; it converts only --to kohya")
        if out.suffix != SAFETENSORS:
            raise InputError(f"{out}: kohya LLLite files are .safetensors")
        check_finite(info)
        tensors = _cast(dict(info.state_dict), dtype)
        save_state_dict(tensors, out, {**info.metadata, **lllite_metadata(tensors, info.family)})
        return f"LLLite ({len(tensors)} tensors) -> {out}"
    if to == "kohya":
        raise InputError(f"{src} is a ControlNet ({info.layout} layout); only ControlNet-LLLite files convert "
                         f"--to kohya")
    if to == "original" and info.layout in ("original", "full"):  # LDM names in and out: no config needed
        control = ldm_control_tensors(info)
        check_finite(info)
        try:  # full metadata where the file says its config or its family names one
            metadata = control_metadata(file_controlnet_config(info), info.family)
        except InputError:
            hint = next(v for k, v in control.items() if k.endswith("input_hint_block.0.weight"))
            metadata = {META + "architecture": "controlnet", META + "hint_channels": str(hint.shape[1])}
        save_state_dict(_cast(control, dtype), out, {**info.metadata, **metadata})
        return f"ControlNet ({info.layout} layout, {len(control)} tensors) -> {out}"
    tensors, config, metadata = read_control(info)
    write_control(_cast(tensors, dtype), config, out, to, metadata)
    return f"ControlNet ({info.layout} layout, {len(tensors)} tensors) -> {out} ({to} layout)"


def run(argv=None) -> int:
    """Parse the flags and do the work; refused input raises InputError."""
    parser = argparse.ArgumentParser(prog="python -m tinylllite.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="control file (.safetensors/.ckpt/.pth) or diffusers ControlNet folder")
    parser.add_argument("output", help="file or folder to create; never overwritten")
    parser.add_argument("--to", required=True, choices=TARGETS, help="layout to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the tensors (default: keep their dtype)")
    args = parser.parse_args(argv)
    print(convert(args.input, args.output, args.to, DTYPES.get(args.dtype)))
    return 0


def main(argv=None) -> int:
    """The command: refused input becomes one line `convert: ...` on stderr and exit status 1."""
    return run_command("convert", run, argv)


if __name__ == "__main__":
    sys.exit(main())
