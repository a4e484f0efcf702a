"""Reliability: what the commands do when a run is killed or interrupted, or meets a file it cannot use or write.

Every case runs a real command (`python -m tinylllite.sample ...`, `python tutorial_train.py ...`) in its own
process and checks what a user sees: the exit status, one line on stderr that names the culprit (progress bars
aside), no traceback, and the user's files byte for byte as they were where a refusal must not touch them.

How the commands run: importing torch and diffusers costs ~10 s of CPU per process, so the commands start
from a "zygote": one helper interpreter imports the heavy modules once, then forks a child per command, which
runs the command exactly as `python` would (`runpy`, its own stdin/stdout/stderr, cwd, argv and exit status;
an uncaught exception prints its traceback and exits 1). A child shares no state with the test process. The
cases that are about process identity (a killed process's temporaries, Ctrl-C) start a fresh interpreter;
RELIABILITY_FRESH=1 runs every command in a fresh interpreter, to check the zygote changes nothing.
"""
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = ROOT / "tinylllite" / "sd" / "tiny_sd_weights" / "controls"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
FRESH = os.environ.get("RELIABILITY_FRESH") == "1"
TRAIN = [str(ROOT / "tutorial_train.py"), "--max-steps", "1", "--eval-every", "0", "--logger-freq", "0",
         "--max-train-samples", "16", "--batch-size", "2"]
DATASET = [str(ROOT / "tutorial_dataset.py"), "--make", "4", "--size", "64", "--workers", "1"]
SAMPLE = ["-m", "tinylllite.sample", "--prompt", "red circle with blue background", "--steps", "2"]
CANNY = ["-m", "tinylllite.canny"]
CONVERT = ["-m", "tinylllite.convert"]
ADD_CONTROL = [str(ROOT / "tool_add_control.py")]
# a folder that refuses writes even to root (tests may run as root, where chmod 0o555 stops nothing):
# os.access(/proc/sys, W_OK) is False, and no file or folder can be created in it
READ_ONLY = Path("/proc/sys")
PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar: "Loading weights: 100%|####| 36/36 [00:00<00:00, ...]"

# what the zygote imports once; each command then starts in ~0.1 s instead of ~10 s
ZYGOTE = r"""
import json, os, runpy, sys, traceback
for name in ("torch", "diffusers", "transformers", "tqdm", "PIL.Image", "safetensors.torch",
             "tinylllite.sample", "tinylllite.files.convert", "tinylllite.data.canny", "tinylllite.files.checkpoint",
             "tinylllite.training", "tinylllite.run.image_log", "tinylllite.run.batches", "tinylllite.run.options",
             "tinylllite.data.dataset_check", "tinylllite.data.fill50k", "tinylllite.files.run_lock"):
    __import__(name)
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the command, as `python ARGS` would run it
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT),
                                    (2, job["stderr"], os.O_WRONLY | os.O_CREAT)):
                opened = os.open(name, flags, 0o644)
                os.dup2(opened, fd)
                os.close(opened)
            sys.stdin = sys.__stdin__ = open(0, closefd=False)
            sys.stdout = sys.__stdout__ = open(1, "w", closefd=False)
            sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, errors="backslashreplace", buffering=1)
            sys.argv = job["argv"]
            try:
                if job["module"]:
                    sys.modules.pop(job["module"], None)  # run as __main__, not the imported copy
                    sys.path[0] = os.getcwd()
                    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
                else:
                    sys.path[0] = os.path.dirname(os.path.abspath(job["argv"][0]))
                    runpy.run_path(job["argv"][0], run_name="__main__")
                code = 0
            except SystemExit as exit:
                if exit.code is None or isinstance(exit.code, int):
                    code = exit.code or 0
                else:
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Zygote:
    """One interpreter with torch and the package imported, forking a child per command."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self._read(300) == "ready"

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the command did not finish in time")
        return self.process.stdout.readline().strip()

    def run(self, args: list[str], cwd: Path, timeout: float) -> Result:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        module = args[1] if args[0] == "-m" else None
        argv = [module, *args[2:]] if module else list(args)
        self.process.stdin.write(json.dumps(dict(cwd=str(cwd), argv=argv, module=module, stdout=str(out),
                                                 stderr=str(err))) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self._read(30))["pid"]
        try:
            status = json.loads(self._read(timeout))["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise
        return Result(status, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    if FRESH:
        yield None
        return
    zygote = Zygote(tmp_path_factory.mktemp("zygote"))
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def run(zygote):
    """run(args, cwd): the command `python *args` in cwd, in its own process -> Result."""
    def run(args, cwd: Path, fresh: bool = False, timeout: float = 300) -> Result:
        args = [str(a) for a in args]
        if zygote is None or fresh:
            done = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                                  timeout=timeout)
            return Result(done.returncode, done.stdout, done.stderr)
        return zygote.run(args, cwd, timeout)
    return run


def message_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars (tqdm redraws a bar with \\r on one line)."""
    return [part for part in re.split(r"[\r\n]+", stderr) if part.strip() and not PROGRESS.search(part)]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (relative path -> sha256) and folder (-> 'dir') under folder."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def assert_refused(result: Result, prog: str, *named: str, quiet: bool = False) -> str:
    """Exit 1, no traceback, one line `prog: ...` naming each of `named` (with `quiet`: nothing else on stderr,
    so the command stopped before loading a model); returns the line."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: "), result.stderr
    for needle in named:
        assert needle in lines[0], (needle, result.stderr)
    if quiet:
        assert result.stderr.strip() == lines[0], result.stderr
    return lines[0]


def without_lock(files: dict[str, str]) -> dict[str, str]:
    """A run folder's snapshot without its .lock (which records the pid of the last process that took it)."""
    return {name: digest for name, digest in files.items() if name != ".lock"}


def assert_no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if "tinylllite-tmp" in p.name]
    assert not left, left


def dead_pid() -> int:
    """The process id of a process that has ended (a `python -c pass`, waited for)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def hint_image(size: int = 64) -> np.ndarray:
    """A white square outline on black, (size, size, 3) uint8."""
    ring = np.zeros((size, size, 3), np.uint8)
    a, b = size // 4, 3 * size // 4
    ring[a:b, a] = ring[a:b, b - 1] = ring[a, a:b] = ring[b - 1, a:b] = 255
    return ring


def with_non_finite(src: Path, out: Path, keys: list[str]) -> None:
    """A copy of the control file src with NaN in the first of `keys` and inf in the others."""
    tensors = load_file(src)
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    for i, key in enumerate(keys):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan") if i == 0 else float("inf")
    save_file(tensors, out, metadata=metadata)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Read-only inputs shared by the cases: a 16-pair Fill50K, the shipped controls, a hint, a tiny SD file."""
    from test_tool_add_control import tiny_ldm_checkpoint

    from tinylllite.data.fill50k import write_fill50k
    from tinylllite.files.state_dicts import open_state_dict

    d = tmp_path_factory.mktemp("inputs")
    write_fill50k(d / "data", n=16, size=64, seed=0, workers=1)
    Image.fromarray(hint_image()).save(d / "hint.png")
    torch.save(tiny_ldm_checkpoint(False), d / "sd.ckpt")
    for kind in ("controlnet", "lllite"):
        keys = list(open_state_dict(CONTROLS / f"{kind}.safetensors"))  # the order every reader goes through
        with_non_finite(CONTROLS / f"{kind}.safetensors", d / f"nan_{kind}.safetensors", [keys[5], keys[9]])
        (d / f"nan_{kind}.key").write_text(keys[5])
    return d


@pytest.fixture(scope="module")
def trained_run(inputs, tmp_path_factory, run) -> Path:
    """A real run of tutorial_train.py: 2 steps, a checkpoint after each (step_0000001, step_0000002)."""
    d = tmp_path_factory.mktemp("trained")
    args = [*TRAIN, "--max-steps", "2", "--checkpoint-every", "1", "--keep-checkpoints", "3", "--data",
            inputs / "data", "--out", "run", "--cache-dir", "cache"]
    result = run(args, d, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (d / "run" / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    return d / "run"


# --- 1. a user's own *.partial folder ----------------------------------------------------------------------

def test_synthesize_leaves_a_users_own_partial_folder_alone(run, tmp_path):
    """--synthesize --out mysynth writes mysynth/ and leaves the user's mysynth.partial/ byte for byte."""
    (tmp_path / "mysynth.partial").mkdir()
    (tmp_path / "mysynth.partial" / "mine.txt").write_text("my own notes, not a temporary\n")
    before = snapshot(tmp_path / "mysynth.partial")
    result = run([*SAMPLE, "--synthesize", "--out", "mysynth"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "mysynth.partial") == before
    assert sorted(p.name for p in (tmp_path / "mysynth").iterdir()) == ["0.png", "0.txt"]
    assert_no_temporaries(tmp_path)


# --- 2. a temporary left by a killed process ---------------------------------------------------------------

def test_tool_add_control_writes_through_the_atomic_helper():
    """tool_add_control.py writes through state_dicts.save_state_dict (atomic_file), with no temporary of its own."""
    source = (ROOT / "tool_add_control.py").read_text()
    assert "save_state_dict(" in source
    assert not re.search(r"\.partial|\.tmp\b|tempfile|os\.replace|os\.rename|torch\.save|save_file\(", source)


def test_a_killed_writers_temporary_is_removed_by_the_next_run_which_says_so(run, inputs, tmp_path):
    """A .safetensors temporary of a SIGKILLed tool_add_control.py (dead pid) is removed by the next run, on stderr."""
    pid = dead_pid()
    stale = tmp_path / f".control.safetensors.tinylllite-tmp-{pid}-k1ll3d"
    stale.write_bytes(b"half of a safetensors file")
    result = run([*ADD_CONTROL, inputs / "sd.ckpt", "control.safetensors"], tmp_path, fresh=True)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert f"removed {stale}, a temporary left by process {pid}, which no longer runs" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.safetensors"]


# --- 3. a truncated image among many -----------------------------------------------------------------------

@pytest.mark.parametrize("edges_before", ["absent", "holding a file"])
def test_canny_refuses_a_truncated_image_before_writing_any_edge_map(run, tmp_path, edges_before):
    """40 images, one cut short: refused naming it, and EDGES is not created (or left exactly as it was)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i:02d}.png")
    whole = (tmp_path / "images" / "27.png").read_bytes()
    (tmp_path / "images" / "27.png").write_bytes(whole[: len(whole) // 2])
    if edges_before == "holding a file":
        (tmp_path / "edges").mkdir()
        (tmp_path / "edges" / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    result = run([*CANNY, "images", "edges"], tmp_path)
    assert_refused(result, "canny", "27.png", quiet=True)
    assert snapshot(tmp_path) == before


def test_canny_refuses_an_unwritable_edge_folder_before_reading_the_images(run, tmp_path):
    """EDGES under a file is refused first, without reading IMAGES (here one is truncated, a slow read for 50,000)."""
    (tmp_path / "images").mkdir()
    Image.fromarray(hint_image()).save(tmp_path / "images" / "0.png")
    (tmp_path / "images" / "1.png").write_bytes((tmp_path / "images" / "0.png").read_bytes()[:60])
    (tmp_path / "somefile").write_bytes(b"a file of the user's")
    before = snapshot(tmp_path)
    line = assert_refused(run([*CANNY, "images", "somefile/edges"], tmp_path), "canny", "somefile/edges", quiet=True)
    assert "1.png" not in line
    assert snapshot(tmp_path) == before


# --- 4. outputs that cannot be written ---------------------------------------------------------------------

def write_cases(inputs: Path) -> dict[str, tuple[list, str]]:
    """{case: (args with OUT for the output path, the command's name in its one line)}."""
    return {
        "tutorial_train --out": ([*TRAIN, "--data", inputs / "data", "--out", "OUT"], "tutorial_train.py"),
        "tutorial_train --cache-dir": ([*TRAIN, "--data", inputs / "data", "--out", "run", "--cache-dir", "OUT"],
                                       "tutorial_train.py"),
        "tutorial_dataset --out": ([*DATASET, "--out", "OUT"], "tutorial_dataset.py"),
        "sample --out": ([*SAMPLE, "--out", "OUT.png"], "python -m tinylllite.sample"),
        "sample --synthesize --out": ([*SAMPLE, "--synthesize", "--out", "OUT"], "python -m tinylllite.sample"),
        "canny": ([*CANNY, inputs / "data" / "target", "OUT"], "canny"),
        "convert --to original": ([*CONVERT, CONTROLS / "controlnet.safetensors", "OUT.safetensors", "--to",
                                   "original"], "convert"),
        "convert --to diffusers": ([*CONVERT, CONTROLS / "controlnet.safetensors", "OUT", "--to", "diffusers"],
                                   "convert"),
        "tool_add_control": ([*ADD_CONTROL, inputs / "sd.ckpt", "OUT.safetensors"], "tool_add_control"),
    }


WRITE_CASES = list(write_cases(Path()))


def with_out(args: list, out: str) -> list:
    return [str(a).replace("OUT", out) if str(a).startswith("OUT") else a for a in args]


@pytest.mark.parametrize("case", WRITE_CASES)
def test_a_read_only_output_folder_is_refused_in_one_line(run, inputs, tmp_path, case):
    """An output in a folder nobody may write to (/proc/sys, read-only even for root) is refused naming it."""
    args, prog = write_cases(inputs)[case]
    out = str(READ_ONLY / "tinylllite-test")
    before = snapshot(tmp_path)
    assert_refused(run(with_out(args, out), tmp_path), prog, str(READ_ONLY), quiet=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", WRITE_CASES)
def test_an_output_that_is_an_existing_file_is_refused_in_one_line(run, inputs, tmp_path, case):
    """--out (or OUT) naming a file that exists, where a file or a folder is to be written, is refused naming it."""
    args, prog = write_cases(inputs)[case]
    suffix = ".png" if case == "sample --out" else ".safetensors" if "OUT.safetensors" in map(str, args) else ""
    (tmp_path / f"taken{suffix}").write_bytes(b"a file of the user's")
    before = snapshot(tmp_path)
    assert_refused(run(with_out(args, "taken"), tmp_path), prog, "taken", quiet=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", WRITE_CASES)
def test_an_output_under_a_file_is_refused_in_one_line(run, inputs, tmp_path, case):
    """--out somefile/x, a path whose folder is a file, is refused naming that file."""
    args, prog = write_cases(inputs)[case]
    (tmp_path / "somefile").write_bytes(b"a file of the user's")
    before = snapshot(tmp_path)
    line = assert_refused(run(with_out(args, "somefile/x"), tmp_path), prog, "somefile", quiet=True)
    if not case.startswith("sample"):  # sample.py names only the file (its --out folder), not --out itself
        assert re.search(r"somefile/x\b", line), line
    assert snapshot(tmp_path) == before


# --- 5. NaN or inf in a control file -----------------------------------------------------------------------

def nan_cases(inputs: Path) -> dict[str, tuple[list, str, str]]:
    """{case: (args, prog, the control kind of the bad file)}."""
    return {
        "sample controlnet": ([*SAMPLE, "--control", inputs / "nan_controlnet.safetensors", "--hint",
                               inputs / "hint.png", "--out", "x.png"], "python -m tinylllite.sample", "controlnet"),
        "sample lllite": ([*SAMPLE, "--control", inputs / "nan_lllite.safetensors", "--hint", inputs / "hint.png",
                           "--out", "x.png"], "python -m tinylllite.sample", "lllite"),
        "tutorial_train --resume-path": ([*TRAIN, "--data", inputs / "data", "--out", "run", "--cache-dir", "cache",
                                          "--resume-path", inputs / "nan_controlnet.safetensors"],
                                         "tutorial_train.py", "controlnet"),
        "convert --to diffusers": ([*CONVERT, inputs / "nan_controlnet.safetensors", "out", "--to", "diffusers"],
                                   "convert", "controlnet"),
        "convert --to original": ([*CONVERT, inputs / "nan_controlnet.safetensors", "out.safetensors", "--to",
                                   "original"], "convert", "controlnet"),
        "convert --to kohya": ([*CONVERT, inputs / "nan_lllite.safetensors", "out.safetensors", "--to", "kohya"],
                               "convert", "lllite"),
    }


@pytest.mark.parametrize("case", list(nan_cases(Path())))
def test_nan_or_inf_in_a_control_file_is_refused_naming_the_file_and_the_first_bad_key(run, inputs, tmp_path,
                                                                                       case):
    """A control file holding NaN/inf is refused naming it and its first non-finite tensor; nothing is written."""
    args, prog, kind = nan_cases(inputs)[case]
    key = (inputs / f"nan_{kind}.key").read_text()
    line = assert_refused(run(args, tmp_path), prog, f"nan_{kind}.safetensors", key, "NaN or inf")
    assert "use an earlier checkpoint" in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == []


def test_the_finiteness_check_finds_the_first_bad_tensor_of_any_layout(inputs, tmp_path):
    """control_io.check_finite names the first non-finite tensor in the file's own order, and passes good files."""
    from tinylllite.errors import InputError
    from tinylllite.files.control_io import check_finite
    from tinylllite.files.identify import identify

    for kind in ("controlnet", "lllite"):
        check_finite(identify(CONTROLS / f"{kind}.safetensors"))
        with pytest.raises(InputError, match=re.escape((inputs / f"nan_{kind}.key").read_text())):
            check_finite(identify(inputs / f"nan_{kind}.safetensors"))


# --- 6. a training state that would run code ---------------------------------------------------------------

class Pwned:
    def __reduce__(self):
        return print, ("pwned",)


def test_a_training_state_that_would_run_code_is_refused_without_running_it(run, inputs, trained_run, tmp_path):
    """--resume-from a run whose training_state.pt pickles a call is refused in the project's own line; no code runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for state in run_dir.glob("checkpoints/*/training_state.pt"):
        torch.save({"step": 1, "optimizer": Pwned()}, state)
    before = snapshot(run_dir)
    result = run([*TRAIN, "--resume-from", "run", "--data", inputs / "data", "--cache-dir",
                  trained_run.parent / "cache"], tmp_path)
    line = assert_refused(result, "tutorial_train.py", "training_state.pt", "run code")
    assert "pwned" not in result.stdout + result.stderr
    assert "weights_only" not in line
    assert without_lock(snapshot(run_dir)) == without_lock(before)


# --- 7. a damaged newest checkpoint ------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["in its header", "in its tensors"])
def test_a_truncated_newest_checkpoint_is_refused_naming_the_newest_intact_one(run, inputs, trained_run, tmp_path,
                                                                               cut):
    """--resume-from RUN whose newest control.safetensors is cut short names step_0000001 and how to resume from it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    newest = run_dir / "checkpoints" / "step_0000002" / "control.safetensors"
    whole = newest.read_bytes()
    newest.write_bytes(whole[:1000] if cut == "in its header" else whole[: len(whole) // 2])
    before = snapshot(run_dir)
    result = run([*TRAIN, "--resume-from", "run", "--data", inputs / "data", "--cache-dir",
                  trained_run.parent / "cache"], tmp_path)
    intact = Path("run") / "checkpoints" / "step_0000001"
    assert_refused(result, "tutorial_train.py", "step_0000002", "truncated", f"--resume-from {intact}")
    assert without_lock(snapshot(run_dir)) == without_lock(before)


# --- 8. hints in 16 bits and with transparency -------------------------------------------------------------

@pytest.fixture
def odd_hints(tmp_path) -> Path:
    """grey16.png: 16-bit greyscale at 30000; rgba.png: an opaque red square, white under transparency elsewhere."""
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(tmp_path / "grey16.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255  # white ...
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # ... except an opaque red square
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    return tmp_path


def test_a_16_bit_hint_is_scaled_and_a_transparent_one_composited_on_black(odd_hints):
    """load_rgb: I;16 at 30000 -> grey 117 (not white); RGBA white under alpha 0 -> black, the opaque part kept."""
    from tinylllite.data.datasets import load_rgb

    with Image.open(odd_hints / "grey16.png") as image:
        assert image.mode in ("I;16", "I")
    grey = np.asarray(load_rgb(odd_hints / "grey16.png"))
    assert grey.shape == (64, 64, 3) and (grey == 117).all()
    rgba = np.asarray(load_rgb(odd_hints / "rgba.png"))
    assert (rgba[:16] == 0).all() and (rgba[20, 20] == (255, 0, 0)).all()


@pytest.mark.parametrize("hint", ["grey16.png", "rgba.png"])
def test_sampling_reads_a_16_bit_or_transparent_hint(run, odd_hints, hint):
    """python -m tinylllite.sample --control <tiny ControlNet> --hint <16-bit or RGBA PNG> makes its image."""
    result = run([*SAMPLE, "--control", CONTROLS / "controlnet.safetensors", "--hint", hint, "--out", "x.png"],
                 odd_hints)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    with Image.open(odd_hints / "x.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


# --- 9. prompts --------------------------------------------------------------------------------------------

def test_a_prompt_over_77_tokens_warns_naming_the_dropped_words(run, tmp_path):
    """A 100-word prompt samples, and stderr warns with the words CLIP's 77 tokens cut off."""
    prompt = "first " + "red circle " * 49 + "final purple"  # 101 words, a token each
    result = run(["-m", "tinylllite.sample", "--prompt", prompt, "--steps", "2", "--out", "x.png"], tmp_path)
    assert result.returncode == 0, result.stderr
    warning = [line for line in message_lines(result.stderr) if "77 tokens" in line]
    assert len(warning) == 1, result.stderr
    assert "final purple" in warning[0].rsplit("no effect:", 1)[1]
    assert "first" not in warning[0].rsplit("no effect:", 1)[1]  # the kept start is not listed


def test_an_unclosed_wildcard_is_refused_in_one_line(run, tmp_path):
    """--prompt "a {red|blue circle" is refused before any model is loaded, naming the prompt."""
    result = run(["-m", "tinylllite.sample", "--prompt", "a {red|blue circle", "--steps", "2", "--out", "x.png"],
                 tmp_path)
    assert_refused(result, "python -m tinylllite.sample", "a {red|blue circle", "never closed", quiet=True)
    assert list(tmp_path.iterdir()) == []


# --- 10. parity with diffusers -----------------------------------------------------------------------------

@pytest.mark.parametrize("hint, batch", [("array", 1), ("array", 2), ("batch array", 2), ("list", 2),
                                         ("tensor", 1), ("tensor", 2)])
def test_hint_tensor_is_contiguous_for_every_input(hint, batch):
    """sample.hint_tensor gives a contiguous (B, 3, H, W) tensor for arrays, lists and tensors, one hint or one each."""
    from tinylllite.sample import hint_tensor

    image = hint_image()
    given = {"array": image, "batch array": np.stack([image] * batch), "list": [image] * batch,
             "tensor": torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255}[hint]
    out = hint_tensor(given, batch, "cpu", torch.float32)
    assert out.shape == (batch, 3, 64, 64)
    assert out.is_contiguous()


def test_the_sample_command_matches_diffusers_controlnet_pipeline_exactly(run, inputs, tmp_path):
    """The shipped tiny ControlNet at CFG 9: the sample command's PNG is diffusers' pipeline's image, bit for bit."""
    from tiny_models import diffusers_pipeline

    from tinylllite.files.checkpoint import load_control
    from tinylllite.sd.tiny_sd import load_tiny_sd

    prompt = "red circle with blue background"
    result = run(["-m", "tinylllite.sample", "--prompt", prompt, "--steps", "4", "--cfg", "9", "--seed", "3",
                  "--control", CONTROLS / "controlnet.safetensors", "--hint", inputs / "hint.png", "--out", "x.png"],
                 tmp_path)
    assert result.returncode == 0, result.stderr
    ours = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))

    base = load_tiny_sd()
    control = load_control(base, CONTROLS / "controlnet.safetensors")
    pipe = diffusers_pipeline(base, control)
    hint = torch.from_numpy(hint_image()).permute(2, 0, 1)[None].contiguous().float() / 255  # (1, 3, H, W)
    theirs = pipe([prompt], image=hint, num_inference_steps=4, guidance_scale=9.0, eta=0.0, output_type="np",
                  generator=[torch.Generator().manual_seed(3)], height=64, width=64).images[0]
    theirs = np.round(theirs * 255).astype(np.uint8)
    assert np.array_equal(ours, theirs), np.abs(ours.astype(int) - theirs).max()


# --- 11. Ctrl-C while making a dataset ---------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_while_making_fill50k_prints_one_line_and_leaves_no_half_written_set(tmp_path, workers):
    """Ctrl-C (SIGINT to the process group) mid-way through --make: one line, exit 130, no data/, no temporary."""
    process = subprocess.Popen([sys.executable, str(ROOT / "tutorial_dataset.py"), "--make", "20000", "--size", "64",
                                "--workers", str(workers), "--out", "data"], cwd=tmp_path, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        written = [p for p in tmp_path.glob(".data.tinylllite-tmp-*/source/*.png")]
        if len(written) >= 50:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)  # the terminal sends Ctrl-C to the whole process group
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = message_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("tutorial_dataset.py: interrupted"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
