"""Notebooks 05-07 on a GPU with an SD1.5 base, where Jupyter is not installed: each code cell run in order.

The notebooks' first code cell holds the switch (`SD15_PATH`, `DEVICE`). This script writes a random-weight
SD1.5 diffusers folder at the full size (from `tinylllite/sd/configs/sd1.json`: no download), sets the switch
to it and to "cuda", and executes every code cell of each notebook in one namespace from the notebooks/
folder, as a kernel would (IPython's `%` lines are skipped; matplotlib draws off-screen). Notebook 06's SD1.5
run is shortened to `--steps` (its own value, 3,000 steps, takes far longer than the suite's minutes).
Reported per notebook: passed or the failing cell and its error, and the seconds of each cell.

    python bench/notebooks_on_gpu.py --out bench/results/gpu_notebooks.json
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("05_tiny_sd_and_sampling", "06_training", "07_inference_and_export")


def write_random_sd15(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinylllite.files.sd_loading import family_config

    config = family_config("sd1")
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialising on the GPU takes seconds, on the CPU a minute
        parts = dict(unet=UNet2DConditionModel(**config["unet"]), vae=AutoencoderKL(**config["vae"]),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**config["text_encoder"])))
    for name, part in parts.items():
        part.save_pretrained(folder / name)


def code_cells(path: Path, sd15: Path, steps: int) -> list[str]:
    cells = [("".join(c["source"])) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    switch = f"SD15_PATH = {str(sd15)!r}\nDEVICE = \"cuda\"\n"
    cells = [switch if "SD15_PATH =" in cell else cell for cell in cells]
    cells = [re.sub(r"if setup\.tiny else \d+", f"if setup.tiny else {steps}", cell) for cell in cells]
    return ["\n".join(line for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))
            for cell in cells]


def run_notebook(name: str, sd15: Path, steps: int) -> dict:
    namespace, seconds = {"__name__": "__main__"}, []
    for index, cell in enumerate(code_cells(REPO / "notebooks" / f"{name}.ipynb", sd15, steps)):
        started = time.time()
        try:
            exec(compile(cell, f"{name} cell {index}", "exec"), namespace)
        except Exception as error:  # the report names the cell; the suite goes on to the next notebook
            return dict(passed=False, cell=index, error=f"{type(error).__name__}: {error}",
                        traceback=traceback.format_exc()[-1500:], cell_seconds=seconds)
        seconds.append(round(time.time() - started, 1))
    return dict(passed=True, cell_seconds=seconds, seconds=round(sum(seconds), 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notebooks", nargs="+", default=list(NOTEBOOKS))
    parser.add_argument("--steps", type=int, default=50, help="notebook 06's SD1.5 training steps")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import torch

    report = dict(benchmark="notebooks_on_gpu", device=torch.cuda.get_device_name(0), torch=torch.__version__,
                  steps=args.steps, notebooks={})
    with tempfile.TemporaryDirectory() as scratch:
        sd15 = Path(scratch) / "sd15-random"
        write_random_sd15(sd15)
        os.chdir(REPO / "notebooks")  # the notebooks open files relative to their folder
        sys.path.insert(0, str(REPO))
        for name in args.notebooks:
            report["notebooks"][name] = run_notebook(name, sd15, args.steps)
            print(name, json.dumps(report["notebooks"][name])[:300], flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
