"""Train the tiny ControlNet and tiny LLLite that ship with the package, with the default job's recipe.

    python scripts/make_tiny_controls.py              # both, 2,500 steps each, into tinylllite/sd/tiny_sd_weights/controls/
    python scripts/make_tiny_controls.py --steps 5 --out /tmp/controls --runs /tmp/runs --eval-pairs 2 --logger-freq 0
    python scripts/make_tiny_controls.py --control lllite --from-run runs/lllite-20261128-083000   # export a run

Each branch is trained by `tutorial_train.main` with the settings of its block at the top of
`tutorial_train.py` (exactly what `python tutorial_train.py [--control lllite]` runs), ended by a step
budget instead of the clock so that the result does not depend on the machine's speed, on the tiny SD's
default data `./training/fill50k_64` (10,000 pairs at 64 px, seed 0, written when missing). Flags this
script does not know go on to tutorial_train.py (`--eval-pairs 2 --logger-freq 0` above). The trained
branch is then written in fp16, as people share control files, with the metadata every file this
project writes carries (`tinylllite.files.control_io`):

- `controlnet.safetensors`: the original layout (`control_model.*`, what A1111 and ComfyUI load);
- `lllite.safetensors`: kohya's layout (`lllite_unet_*`, networks/control_net_lllite.py);
- `training_report.json`: how they were made (per branch: the export and training commands, steps,
  held-out IoU at the end; date).

Notebook 07 loads them (`tinylllite.files.checkpoint.load_control` reads both). Left out: SD1.5 controls
(train those with `python tutorial_train.py --base ...`).
"""
import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tutorial_train.py lives at the top of the repository

import tutorial_train  # noqa: E402  (after making the repository importable)
from tinylllite.files.checkpoint import list_checkpoints, load_control  # noqa: E402
from tinylllite.control_branch import branch_state_dict  # noqa: E402
from tinylllite.files.control_io import branch_metadata, controlnet_config_of, write_control  # noqa: E402
from tinylllite.errors import InputError, run_command  # noqa: E402
from tinylllite.data.fill50k import write_fill50k  # noqa: E402
from tinylllite.files.state_dicts import save_state_dict  # noqa: E402
from tinylllite.sd.tiny_sd import TINY_IMAGE_SIZE, load_tiny_sd  # noqa: E402

CONTROLS_DIR = ROOT / "tinylllite" / "tiny_sd_weights" / "controls"
FILES = {"controlnet": ("controlnet.safetensors", "original"), "lllite": ("lllite.safetensors", "kohya")}
REPORT = "training_report.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2500, help="optimizer steps per branch (default 2500, ~13 min "
                   "each on an idle 2-core CPU)")
    p.add_argument("--control", choices=tuple(FILES), action="append", help="one branch only (repeatable; "
                   "default both)")
    p.add_argument("--data", default=str(ROOT / "training" / f"fill50k_{TINY_IMAGE_SIZE}"),
                   help="Fill50K at 64 px (written here when missing)")
    p.add_argument("--out", default=str(CONTROLS_DIR), help="where the shipped files go")
    p.add_argument("--runs", default=str(ROOT / "runs" / "tiny-controls"), help="the training runs' folders")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.add_argument("--from-run", help="export this finished run of the default job (with --control) instead of "
                   "training again")
    args, args.train_flags = p.parse_known_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    return args


def shown(path) -> str:
    """A path as the report prints it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def device_name() -> str:
    if torch.cuda.is_available():  # tutorial_train.py trains on the GPU when there is one
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def final_scores(run: Path) -> dict:
    """The last held-out evaluation of a run (step, IoU, colour error) from its metrics.jsonl."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    scores = [e for e in events if "fidelity_iou" in e]
    losses = [e["loss"] for e in events if "loss" in e]
    last = scores[-1] if scores else {}
    return dict(eval_step=last.get("step"), fidelity_iou=last.get("fidelity_iou"),
                colour_error=last.get("colour_error"), first_iou=scores[0]["fidelity_iou"] if scores else None,
                last_logged_loss=losses[-1] if losses else None)


def export(base, control, kind: str, path: Path) -> None:
    """The trained branch as an fp16 file: the original layout for a ControlNet, kohya's for an LLLite."""
    tensors = {k: v.detach().cpu().half() for k, v in branch_state_dict(control).items()}
    if kind == "controlnet":
        write_control(tensors, controlnet_config_of(control, base.unet.config), path, "original",
                      branch_metadata(base, control))
    else:
        save_state_dict(tensors, path, branch_metadata(base, control))


def train_and_export(control: str, args, staging: Path, export_command: str) -> dict:
    """Run tutorial_train for one branch (or take --from-run), write the trained branch into `staging`, and
    describe the run."""
    if args.from_run:
        run = Path(args.from_run)
        command = ["python tutorial_train.py"] + ([] if control == "controlnet" else ["--control", control])
    else:
        run = Path(args.runs) / control
        argv = ["--control", control, "--data", str(Path(args.data).resolve()), "--out", str(run.resolve()),
                "--max-steps", str(args.steps), "--max-minutes", str(24 * 60), *args.train_flags]
        tutorial_train.main(argv, base=load_tiny_sd())
        command = ["python tutorial_train.py", *(shown(a) if a.startswith("/") else a for a in argv)]
    base = load_tiny_sd()
    trained = load_control(base, run)  # the run's newest checkpoint, every layout and family check applied
    name, layout = FILES[control]
    export(base, trained, control, staging / name)
    config = json.loads((run / "config.json").read_text())
    if config["control"] != control:
        raise InputError(f"--from-run {run} trained a {config['control']}, not a {control}: pass --control")
    steps = int(list_checkpoints(run)[-1].name.removeprefix("step_"))
    return dict(file=name, layout=layout, dtype="fp16", steps=steps, run=run.name, train_command=" ".join(command),
                export_command=export_command, settings=config["settings"], **final_scores(run))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    controls = args.control or list(FILES)
    taken = [FILES[c][0] for c in controls if (out / FILES[c][0]).exists()]
    if taken and not args.overwrite:
        raise InputError(f"{out} already holds {', '.join(taken)}: pass --overwrite to replace them")
    if args.from_run and len(controls) != 1:
        raise InputError("--from-run exports one run: name its branch with --control controlnet|lllite")
    runs = [Path(args.runs) / c for c in controls if (Path(args.runs) / c).exists()]
    if runs and not args.from_run:
        raise InputError(f"{runs[0]} already exists: remove it or pass another --runs folder")
    if args.from_run:  # its data, relative to where that run was started (the run is <there>/runs/<name>)
        data = Path(args.from_run).resolve().parent.parent / json.loads((Path(args.from_run) / "config.json")
                                                                         .read_text())["data"]
    else:
        data = Path(args.data)
    if not (data / "prompt.json").is_file():
        print(f"{data} is missing: writing 10,000 Fill50K pairs at {TINY_IMAGE_SIZE} px (seed 0)")
        write_fill50k(data, n=10_000, size=TINY_IMAGE_SIZE, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        pairs = len((data / "prompt.json").read_text().splitlines())
        # each branch keeps the command that wrote it: a later call for the other branch does not replace it
        command = " ".join(["python scripts/make_tiny_controls.py", *(sys.argv[1:] if argv is None else argv)])
        report = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device_name(),
                      torch=torch.__version__, base="the tiny SD (tinylllite/sd/tiny_sd_weights)",
                      data=f"{shown(data)} ({pairs} pairs)", controls={})
        for control in controls:
            report["controls"][control] = train_and_export(control, args, staging, command)
        if (out / REPORT).exists():  # a run of one branch keeps the other's record
            report["controls"] = json.loads((out / REPORT).read_text())["controls"] | report["controls"]
        (staging / REPORT).write_text(json.dumps(report, indent=1) + "\n")
        for f in staging.iterdir():  # each file appears whole, in one rename
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for control in controls:
        entry = report["controls"][control]
        print(f"{control}: {out / entry['file']} ({(out / entry['file']).stat().st_size / 2**20:.1f} MiB), "
              f"{entry['steps']} steps, held-out IoU {entry['first_iou']:.3f} -> {entry['fidelity_iou']:.3f}"
              if entry["fidelity_iou"] is not None else f"{control}: {out / entry['file']}, {entry['steps']} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command("make_tiny_controls.py", main))
