"""scripts/make_tiny_controls.py, which makes the tiny controls the package ships: files and their record."""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from test_training import tiny_fill50k

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_tiny_controls  # noqa: E402  (scripts/ is not a package)


def test_exporting_one_branch_then_the_other_keeps_each_branchs_own_command(tmp_path):
    """Two calls, one per branch, leave one report in which each branch names the call that wrote it."""
    data = tiny_fill50k(tmp_path / "fill50k_64")
    out = tmp_path / "controls"
    common = ["--steps", "2", "--data", str(data), "--out", str(out), "--runs", str(tmp_path / "runs"),
              "--eval-pairs", "2", "--eval-steps", "2", "--logger-freq", "0", "--threads", "1",
              "--cache-dir", str(tmp_path / "cache")]
    make_tiny_controls.main(["--control", "controlnet", *common])
    make_tiny_controls.main(["--control", "lllite", *common])

    report = json.loads((out / "training_report.json").read_text())
    assert set(report["controls"]) == {"controlnet", "lllite"}
    for control, entry in report["controls"].items():
        assert entry["export_command"].startswith("python scripts/make_tiny_controls.py --control " + control)
        assert entry["steps"] == 2 and entry["eval_step"] == 2
        with safe_open(out / entry["file"], "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
