"""Training checkpoints: only the trained weights, as safetensors, plus what a resume needs.

The original saves the whole ControlLDM every time (5.7 GB for SD1.5, base weights included, as a
pickle). Here a checkpoint is a folder `OUT/checkpoints/step_0001200/` holding

- `control.safetensors`: the branch in its own key layout (ControlNet: diffusers' ControlNetModel
  keys; LLLite: kohya's `lllite_unet_*` keys) with the metadata of every control file this project
  writes (`control_io.branch_metadata`), so `control_io.load_control_weights`, `load_control` and
  `python -m tinylllite.convert` read it like any shared file;
- `unet_decoder.safetensors`: the unlocked UNet decoder (only when `sd_locked=False`);
- `training_state.pt`: optimizer, loss scaler, RNG, step and data position (read with
  `torch.load(weights_only=True)`, so loading executes no code).

Writes are atomic: the folder is assembled as `step_N.tmp/` and renamed in one `os.replace`, so a run
killed mid-save leaves the previous checkpoint intact, and a failed save (disk full) leaves no
`.tmp` folder and names the checkpoint it could not write. Only the last K are kept.
"""
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.control_branch import branch_state_dict, load_branch_state_dict
from tinylllite.files.control_io import load_any_control
from tinylllite.errors import InputError
from tinylllite.files.state_dicts import atomic_folder, open_state_dict, save_state_dict


class CheckpointWriteError(InputError, OSError):
    """A checkpoint could not be written (disk full, no permission): an OSError that commands report in one line."""


STEP_DIR = re.compile(r"^step_(\d{7})$")
STATE_FILE = "training_state.pt"


def trainable_weights(base: StableDiffusionBase, control) -> dict[str, dict[str, torch.Tensor]]:
    """{file stem: tensors} of everything trained: the branch, plus the UNet decoder if it was unlocked."""
    branch = branch_state_dict(control)
    branch_ids = {id(p) for p in control.parameters()}
    decoder = {n: p for n, p in base.unet.named_parameters() if p.requires_grad and id(p) not in branch_ids}
    files = {"control": branch} | ({"unet_decoder": decoder} if decoder else {})
    return {stem: {k: v.detach().cpu().contiguous() for k, v in tensors.items()} for stem, tensors in files.items()}


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written `.tmp` folders are not checkpoints)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def save_checkpoint(run_dir, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep_last: int = 3, metadata: dict[str, str] | None = None) -> Path:
    """Write step_N/ atomically (tmp folder, then rename), then delete all but the newest `keep_last`.

    `metadata` (from `control_io.branch_metadata(base, control)`) goes into control.safetensors, so the
    checkpoint converts and loads like any control file; every file also records its step.
    """
    final = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    if final.exists():  # e.g. Ctrl-C right after the periodic save of the same step
        return final
    try:
        with atomic_folder(final) as tmp:  # on any failure the step_N.tmp/ folder is removed
            for stem, tensors in weights.items():
                extra = metadata if stem == "control" else None
                save_state_dict(tensors, tmp / f"{stem}.safetensors",
                                {**(extra or {}), "format": "pt", "step": str(step)})
            torch.save(state, tmp / STATE_FILE)
    except (OSError, SafetensorError) as error:  # disk full, no permission (safetensors has its own type)
        kept = list_checkpoints(run_dir)
        then = f"{kept[-1]} is intact: resume with --resume-from {run_dir}" if kept else "start again"
        raise CheckpointWriteError(f"could not write the checkpoint {final} ({error}); make room (or fix "
                                   f"permissions), then {then}") from error
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def resolve_checkpoint(path) -> Path:
    """A step_N folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {path}/checkpoints/step_NNNNNNN/{STATE_FILE} "
                                f"or a step folder itself")
    return found[-1]


def load_checkpoint(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by file stem, training state) of a checkpoint folder or of a run's newest checkpoint."""
    folder = resolve_checkpoint(path)
    weights = {f.name.removesuffix(".safetensors"): dict(open_state_dict(f)) for f in folder.glob("*.safetensors")}
    return weights, torch.load(folder / STATE_FILE, weights_only=True)


def load_trainable(base: StableDiffusionBase, control, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put checkpointed weights back into the branch (and the unlocked decoder); every key must match."""
    load_branch_state_dict(control, weights["control"])
    if "unet_decoder" in weights:
        unexpected = base.unet.load_state_dict(weights["unet_decoder"], strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"unet_decoder.safetensors has keys the UNet lacks, e.g. {unexpected[:3]}")


def load_control(base: StableDiffusionBase, path):
    """Build the branch a training checkpoint (run or step folder) or any control file holds, on `base`.

    Reading and checking the weights is `control_io.load_any_control`'s job (every layout, the family
    check); a checkpoint folder adds only its `unet_decoder.safetensors` when the run was unlocked.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file() and not list_checkpoints(path):
        return load_any_control(path, base)  # a control file, or a diffusers ControlNet folder
    folder = resolve_checkpoint(path)
    control = load_any_control(folder / "control.safetensors", base)
    if (folder / "unet_decoder.safetensors").is_file():
        load_trainable(base, control, {"control": branch_state_dict(control),
                                       "unet_decoder": dict(open_state_dict(folder / "unet_decoder.safetensors"))})
    return control.to(base.device, base.unet.dtype).eval()
