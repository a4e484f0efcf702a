"""The speed benchmarks under bench/ run end to end on the tiny SD, so they cannot rot.

Each benchmark runs for two steps on the CPU and its JSON report is checked for the fields the
README's speed table and bench/gpu_suite.sh read. No timing is asserted: speed is machine-dependent.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import sample_step  # noqa: E402
import step_parts  # noqa: E402
import train_e2e  # noqa: E402
import train_step  # noqa: E402

QUICK = ["--device", "cpu", "--shape", "tiny", "--steps", "2", "--warmup", "0", "--rounds", "1", "--threads", "1"]
ENVIRONMENT = {"device", "torch", "diffusers", "transformers", "settings"}


def test_step_parts_reports_both_ways_of_each_part(tmp_path):
    """step_parts.py times the default and the fused AdamW for both branches, and LLLite's embedding both ways."""
    out = tmp_path / "step_parts.json"

    printed = step_parts.main(QUICK + ["--batch", "2", "--out", str(out)])

    assert json.loads(out.read_text()) == printed and ENVIRONMENT <= printed["environment"].keys()
    for part, ways in (("adamw_controlnet", ("default_loop", "fused")), ("adamw_lllite", ("default_loop", "fused")),
                       ("lllite_embedding", ("per_module", "together"))):
        assert all(printed[part][way]["n"] == 2 for way in ways)
        assert printed[part]["ratio"] > 0
    assert printed["lllite_embedding"]["modules"] == 40  # the tiny UNet's 10 transformers x 4 wrapped Linears
    assert printed["adamw_lllite"]["tensors"] > 10 * 40  # per module: down, mid, up and 2-3 convs, weight and bias


def test_train_step_reports_every_implementation_and_equal_controlnet_work(tmp_path, capsys):
    """train_step.py writes one JSON with times, memory, parameters and FLOPs; both ControlNets do the same work."""
    out = tmp_path / "train_step.json"

    printed = train_step.main(QUICK + ["--batch", "2", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == printed
    assert ENVIRONMENT <= printed.keys()
    impls = printed["implementations"]
    assert set(impls) == {"tinylllite", "diffusers", "lllite"}
    for numbers in impls.values():
        assert {"median_ms", "peak_memory_mib", "trainable_parameters", "flops_per_step"} <= numbers.keys()
        assert numbers["n"] == 2
    assert impls["tinylllite"]["trainable_parameters"] == impls["diffusers"]["trainable_parameters"]
    assert impls["tinylllite"]["flops_per_step"] == impls["diffusers"]["flops_per_step"]
    assert impls["lllite"]["trainable_parameters"] < impls["tinylllite"]["trainable_parameters"]
    assert set(printed["ratios"]) == {"diffusers/tinylllite", "lllite/tinylllite"}


def test_sample_step_reports_overheads_against_the_plain_base(capsys):
    """sample_step.py times all four variants and gives each one's overhead over the plain base."""
    printed = sample_step.main(QUICK + ["--batch", "2"])

    assert ENVIRONMENT <= printed.keys()
    assert set(printed["per_image"]) == set(sample_step.VARIANTS)
    assert set(printed["overhead_percent"]) == {"controlnet", "lllite", "pipeline"}
    assert printed["per_image"]["controlnet"]["images_per_call"] == 2
    assert "pipeline/controlnet" in printed["ratios"]


def test_train_e2e_reports_both_loops_and_the_loader(capsys):
    """train_e2e.py trains through tutorial_train.main and the diffusers-style loop, and times the DataLoader."""
    printed = train_e2e.main(QUICK + ["--batch", "2", "--pairs", "4", "--loader-workers", "0"])

    assert ENVIRONMENT <= printed.keys()
    assert set(printed["steps_per_second"]) == {"tinylllite", "diffusers"}
    assert all(rate > 0 for rate in printed["steps_per_second"].values())
    assert printed["tinylllite_e2e_fraction_of_in_memory"] > 0
    assert set(printed["loader_pairs_per_second_by_workers"]) == {"0"}


@pytest.mark.parametrize("module, flags", [(train_step, ["--impls", "tinylllite,bogus"]),
                                           (sample_step, ["--variants", "nothing"]),
                                           (train_e2e, ["--pairs", "1", "--batch", "4"]),
                                           (train_step, ["--steps", "0"])])
def test_benchmarks_refuse_bad_flags_in_one_line(module, flags, capsys):
    """A bad flag ends the command with exit status 1 and one line naming the flag."""
    status = module.common.run_command("bench", module.main, QUICK + flags)

    assert status == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("bench: --") and "\n" not in message
