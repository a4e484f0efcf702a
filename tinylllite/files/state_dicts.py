"""State dicts on disk: the one place that opens and writes weight files, and refuses unreadable ones.

Two formats hold the weights people share: `.safetensors` (a JSON header, then raw tensor bytes;
string metadata in the header; cannot run code) and PyTorch pickles (`.ckpt`, `.pth`, `.pt`, `.bin`;
zip archives written by `torch.save`). Pickles are read only with `torch.load(weights_only=True)`,
which loads tensors and plain containers and nothing that could run code; both formats are
memory-mapped, so opening a 5 GB file costs no memory until a tensor is used.

Every writer of the package (control files, training checkpoints, tool_add_control.py, LLLite's
kohya files) goes through `save_state_dict`: the file is written to a temporary beside its
destination and renamed (`tinylllite/files/atomic.py`), so a crash leaves either the old file or the
new one, never half of one.

A file that cannot be read is refused by `open_state_dict` in one sentence that names it, says what
it looks like (empty, truncated, a text file such as a Git LFS pointer, not a PyTorch file) and what
to do. Left out: sharded files (`*.safetensors.index.json`), GGUF and ONNX.
"""

import json
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinylllite.errors import InputError
from tinylllite.files.atomic import atomic_file

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
REDOWNLOAD = "download or copy it again"


class SafetensorsFile(Mapping):
    """A .safetensors file as a read-only dict that reads each tensor only when asked for it."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)
        self.metadata = self._file.metadata() or {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(f"{key!r} is not in {self.path}")
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())


def _looks_like(path: Path) -> str:
    """What the first bytes of an unreadable file suggest, for the error message."""
    head = path.read_bytes()[:200] if path.stat().st_size else b""
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (a small text file standing in for the weights): run `git lfs pull`, or " + REDOWNLOAD
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a download that returned a web page): " + REDOWNLOAD
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "neither a safetensors nor a PyTorch file: " + REDOWNLOAD
    if all(c.isprintable() or c.isspace() for c in text):
        return f"a text file (it starts with {text[:40]!r}), not weights: " + REDOWNLOAD
    return "neither a safetensors nor a PyTorch file: " + REDOWNLOAD


def _open_safetensors(path: Path) -> SafetensorsFile:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        header = f.read(min(header_len, 100_000_000)) if header_len is not None else b""
    if header_len is not None and size < 8 + header_len and header.startswith(b"{"):  # a JSON header, cut short
        raise InputError(f"{path}: truncated: its header alone is {8 + header_len:,} bytes but the file has "
                         f"{size:,} (an interrupted download or copy): {REDOWNLOAD}")
    try:
        offsets = [v["data_offsets"][1] for k, v in json.loads(header).items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InputError(f"{path}: no safetensors header; the file looks like {_looks_like(path)}") from None
    needed = 8 + header_len + max(offsets, default=0)
    if size < needed:
        raise InputError(f"{path}: truncated: its header announces {needed:,} bytes but the file has {size:,} "
                         f"(an interrupted download or copy): {REDOWNLOAD}")
    try:
        return SafetensorsFile(path)
    except SafetensorError as error:
        raise InputError(f"{path}: a damaged .safetensors file ({error}): {REDOWNLOAD}") from None


def _open_pickle(path: Path) -> dict[str, torch.Tensor]:
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and path.read_bytes()[:1] != b"\x80":  # torch.save writes a zip, very old files a pickle
        raise InputError(f"{path}: not a PyTorch checkpoint; the file looks like {_looks_like(path)}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... depending on the damage
        if "Weights only load failed" in str(error):
            raise InputError(f"{path}: holds Python objects besides tensors, which tinylllite does not load (loading "
                             f"them would run code from the file): save its state dict alone, or use a "
                             f".safetensors copy") from None
        raise InputError(f"{path}: a damaged PyTorch checkpoint ({type(error).__name__}): {REDOWNLOAD}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Lightning checkpoints nest the weights
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a state dict of named tensors")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def open_state_dict(path) -> Mapping[str, torch.Tensor]:
    """A weight file's tensors by name, lazily; an unreadable file raises InputError in one sentence."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the weight file inside it")
    if path.suffix != SAFETENSORS and path.suffix not in PICKLE_SUFFIXES:
        raise InputError(f"{path}: unknown checkpoint type {path.suffix!r}; expected {SAFETENSORS} or "
                         f"{', '.join(PICKLE_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes), e.g. a download that never started: {REDOWNLOAD}")
    sd = _open_safetensors(path) if path.suffix == SAFETENSORS else _open_pickle(path)
    if not sd:
        raise InputError(f"{path} holds no tensors: it is not a weight file")
    return sd


def tensor_shapes(sd: Mapping) -> dict[str, tuple[int, ...]]:
    """{name: shape} without reading any tensor data from a SafetensorsFile."""
    if isinstance(sd, SafetensorsFile):
        return {key: sd.shape(key) for key in sd}
    return {key: tuple(value.shape) for key, value in sd.items()}


def file_metadata(sd: Mapping) -> dict[str, str]:
    """The string metadata of a safetensors header ({} for pickles, which have none)."""
    return dict(sd.metadata) if isinstance(sd, SafetensorsFile) else {}


def refuse_existing(path) -> None:
    """Outputs are never overwritten: a half-finished run must not destroy an earlier result."""
    if Path(path).exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (delete it or choose another name)")


def refuse_non_finite(path, tensors) -> None:
    """Refuse NaN or inf in any floating tensor of (key, tensor) pairs, naming `path` and the first bad key.

    A NaN weight would otherwise load without complaint and turn every sampled image black, or every loss NaN.
    """
    for key, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: tensor {key} holds NaN or inf values; the file is damaged or was saved "
                             f"from a diverged run: use an earlier checkpoint")


def save_state_dict(tensors: Mapping[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write `.safetensors` (with string metadata) or a pickle atomically (`tinylllite.files.atomic`).

    Metadata needs a safetensors header: a pickle output simply goes without it.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS and path.suffix not in PICKLE_SUFFIXES:
        raise InputError(f"{path}: unknown checkpoint type {path.suffix!r}; use {SAFETENSORS} or "
                         f"{', '.join(PICKLE_SUFFIXES)}")
    with atomic_file(path) as tmp:
        if path.suffix == SAFETENSORS:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        else:
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    return path
