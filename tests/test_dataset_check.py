"""The dataset check reports every problem of a dataset in one run, before any training."""
import subprocess
import sys

import pytest
from PIL import Image

from tinylllite.data.dataset_check import check_dataset
from tinylllite.data.fill50k import write_fill50k


@pytest.fixture
def broken_fill50k(tmp_path):
    """A 6-pair Fill50K-style set with one problem of each kind."""
    root = tmp_path / "fill50k"
    write_fill50k(root, 6, size=32, workers=1)
    lines = (root / "prompt.json").read_text().splitlines()
    lines[1] = '{"source": "source/1.png", "target": '  # line 2: broken JSON
    lines[2] = '{"source": "source/2.png", "target": "target/2.png", "prompt": "  "}'  # empty caption
    lines.append('{"source": "source/9.png", "target": "target/9.png", "prompt": "x"}')  # line 7: missing
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    png = (root / "target" / "3.png").read_bytes()
    (root / "target" / "3.png").write_bytes(png[: len(png) // 2])  # truncated
    Image.open(root / "source" / "4.png").convert("L").save(root / "source" / "4.png")  # not RGB
    Image.new("RGB", (40, 32)).save(root / "source" / "5.png")  # size mismatch
    Image.new("RGB", (32, 32)).save(root / "target" / "77.png")  # extra
    return root


def test_a_clean_generated_set_passes_with_counts(tmp_path):
    """A freshly written set has no errors or warnings and every pair usable."""
    write_fill50k(tmp_path / "ok", 4, size=32, workers=1)
    report = check_dataset(tmp_path / "ok")
    assert report.ok and not report.warnings
    assert report.summary() == "4 pairs listed, 4 usable, 0 errors, 0 warnings"


def test_every_problem_is_reported_at_once(broken_fill50k):
    """Bad JSON line, truncated image, size mismatch and missing files are errors; the rest warnings."""
    report = check_dataset(broken_fill50k)
    errors, warnings = "\n".join(report.errors), "\n".join(report.warnings)
    assert "prompt.json line 2: not valid JSON" in errors
    assert "prompt.json line 4:" in errors and "unreadable or truncated" in errors
    assert "prompt.json line 6:" in errors and "is 32x32 but" in errors and "is 40x32" in errors
    assert "prompt.json line 7:" in errors and "target/9.png does not exist" in errors
    assert "prompt.json line 3: empty caption" in warnings
    assert "prompt.json line 5:" in warnings and "is L, not RGB; it will be converted" in warnings
    assert "not listed in prompt.json: 1.png, 77.png" in warnings
    assert (report.pairs, report.good_pairs, len(report.errors)) == (6, 3, 5)


def test_strict_mode_refuses_non_rgb_images_and_empty_captions(broken_fill50k):
    """--strict turns the conversion and the empty caption into errors."""
    errors = "\n".join(check_dataset(broken_fill50k, strict=True).errors)
    assert "is L, not RGB (refused in strict mode" in errors
    assert "prompt.json line 3: empty caption" in errors


def test_kohya_toml_folders_report_missing_conditions_and_captions(tmp_path):
    """Through a .toml: images without condition or caption are errors, lone conditions warnings."""
    for folder in ("images", "cond"):
        (tmp_path / folder).mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / f"{stem}.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "cond" / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "cond" / "z.png")
    (tmp_path / "images" / "b.txt").write_text("b caption")
    toml = tmp_path / "d.toml"
    toml.write_text(f"[general]\nresolution = 32\n[[datasets]]\n[[datasets.subsets]]\n"
                    f"image_dir = '{tmp_path / 'images'}'\nconditioning_data_dir = '{tmp_path / 'cond'}'\n"
                    f"caption_extension = '.txt'\n")
    report = check_dataset(toml)
    errors = "\n".join(report.errors)
    assert "a.png: no caption" in errors
    assert "b.png: no conditioning image named b.*" in errors
    assert "1 conditioning images without an image" in "\n".join(report.warnings)
    assert report.good_pairs == 0 and report.pairs == 2


def test_a_bad_toml_and_a_missing_prompt_json_are_reported(tmp_path):
    """The toml's own error and a missing prompt.json come back as errors, not exceptions."""
    (tmp_path / "bad.toml").write_text("[general]\ncolor_aug = true\n")
    assert "no [[datasets]]" in check_dataset(tmp_path / "bad.toml").errors[0]
    assert "prompt.json not found" in check_dataset(tmp_path).errors[0]


def test_command_prints_every_problem_and_exits_nonzero(broken_fill50k):
    """`python -m tinylllite.dataset_check DIR` lists errors and warnings, a summary, and exits 1."""
    result = subprocess.run([sys.executable, "-m", "tinylllite.dataset_check", str(broken_fill50k)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.count("ERROR") == 5 and result.stdout.count("WARNING") == 4
    assert result.stdout.splitlines()[-1] == "6 pairs listed, 3 usable, 5 errors, 4 warnings"
