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

Writes are atomic: the folder is assembled in a temporary folder beside it and renamed in one
`os.replace` (`tinylllite/files/atomic.py`), so a run killed mid-save leaves the previous checkpoint
intact, and a failed save (disk full) leaves no temporary and names the checkpoint it could not write. Only the last K are kept.
"""
import contextlib
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from tinylllite.sd.base import StableDiffusionBase
from tinylllite.control_branch import branch_state_dict, load_branch_state_dict
from tinylllite.files.control_io import branch_metadata, load_any_control
from tinylllite.errors import InputError
from tinylllite.files.atomic import atomic_folder
from tinylllite.files.state_dicts import open_state_dict, refuse_non_finite, save_state_dict


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
    """Complete checkpoints of a run, oldest first (half-written temporaries are not checkpoints)."""
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
        with atomic_folder(final) as tmp:  # on any failure the temporary folder is removed
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


def load_training_state(path: Path) -> dict:
    """training_state.pt, read with weights_only=True; anything else in it is refused in one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        if "Weights only load failed" in str(error):
            raise InputError(f"{path}: holds Python objects besides tensors and numbers, which tinylllite does not "
                             f"load (loading them could run code from the file); it is not a checkpoint this "
                             f"project wrote: resume from one of your own runs") from None
        raise InputError(f"{path}: a damaged training state ({type(error).__name__}), e.g. a save cut short") from None


def _load_folder(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights[file.name.removesuffix(".safetensors")] = tensors = dict(open_state_dict(file))
        refuse_non_finite(file, tensors.items())  # a diverged run's weights never train on
    if "control" not in weights:
        raise InputError(f"{folder}: control.safetensors is missing; this checkpoint is incomplete")
    return weights, load_training_state(folder / STATE_FILE)


def load_checkpoint(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights by file stem, training state) of a checkpoint folder or of a run's newest checkpoint.

    A damaged newest checkpoint of a run (a disk that filled up, a copy cut short) is refused naming the
    newest intact one, and the flag that resumes from it.
    """
    folder = resolve_checkpoint(path)
    try:
        return _load_folder(folder)
    except InputError as error:
        older = [c for c in list_checkpoints(folder.parent.parent) if c.name < folder.name]
        for candidate in reversed(older):
            try:
                _load_folder(candidate)
            except InputError:
                continue
            raise InputError(f"the newest checkpoint cannot be used ({error}); the newest intact one is {candidate}: "
                             f"resume from it with --resume-from {candidate}") from None
        raise


def save_training(run_dir, step: int, base: StableDiffusionBase, control, optimizer, scaler, effective_batch: int,
                  keep_last: int, settings: dict, ema=None) -> Path:
    """A checkpoint of the trained weights and everything a resume needs: optimizer, loss scale, RNG, settings.

    With an EMA (run/ema.py) the control file holds the average, what the run evaluates and exports, and
    training_state.pt also keeps the trained weights, which a resume goes on training."""
    state = dict(step=step, samples_seen=step * effective_batch, effective_batch=effective_batch,
                 torch_rng=torch.get_rng_state(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict() if scaler else None, settings=settings,
                 ema=ema.state_dict() if ema is not None else None)
    extra = {"weights": f"exponential moving average, decay {ema.decay:g}"} if ema is not None else None
    with ema.applied() if ema is not None else contextlib.nullcontext():
        return save_checkpoint(run_dir, step, trainable_weights(base, control), state, keep_last,
                               metadata=branch_metadata(base, control, extra))


def resume_training(path, base: StableDiffusionBase, control, optimizer, scaler, effective_batch: int,
                    learning_rate: float, ema=None) -> int:
    """Put a checkpoint's weights, optimizer, loss scale, EMA and RNG back; returns its step.

    The learning rate is the run's setting now (given on the command line, or the run's own), not the one
    the restored optimizer state carries, so what is printed and recorded is what trains. A run that kept
    an EMA goes on training its trained weights (in training_state.pt), with or without the average now.
    """
    weights, state = load_checkpoint(path)
    if state["effective_batch"] != effective_batch:
        raise InputError(f"{path} was trained with effective batch {state['effective_batch']}: resume with the same "
                         f"batch size, accumulation and number of processes")
    load_trainable(base, control, weights)
    if ema is not None:
        ema.resume(state.get("ema"))
    elif state.get("ema") is not None:  # the average was saved as the weights; train on from the trained ones
        with torch.no_grad():
            for p, trained in zip((p for group in optimizer.param_groups for p in group["params"]),
                                  state["ema"]["trained"]):
                p.copy_(trained)
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def recorded_run(path) -> dict | None:
    """The config a run recorded for the checkpoint `path` resumes ({"control", "settings", ...}), or None.

    config.json holds the first call; every resume wrote config_resume_<step>.json beside it, and the
    newest one at or before the checkpoint's step is what trained up to it.
    """
    folder = resolve_checkpoint(path)
    run_dir, step = folder.parent.parent, int(STEP_DIR.match(folder.name)[1]) if STEP_DIR.match(folder.name) else None
    resumes = sorted((int(m[1]), p) for p in run_dir.glob("config_resume_*.json")
                     if (m := re.match(r"config_resume_(\d+)\.json$", p.name)) and (step is None or int(m[1]) <= step))
    config = resumes[-1][1] if resumes else run_dir / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config}: not readable as JSON ({error}); restore it or resume with every setting "
                         f"given on the command line after deleting it") from None


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
