"""The "fits your card" table, checked on a real card: the estimated largest batch fits, a larger one does not.

For each branch and card size the memory estimator (`tinylllite/run/memory.py`) names the largest batch
of the in-memory SD1.5 step (bench/train_step.py: 512 px, bf16, the batch already on the GPU) that fits.
This script runs that step at that batch and at the next larger one (a quarter more, at least one more)
with the card capped to the size (`--cap-gib`: torch's per-process memory fraction), each in its own
process, and reports whether each ran or ran out of memory. The estimate is right at a card size when
the first runs and the second does not; "ran at the larger batch too" means the estimate is cautious.

    python bench/fits_check.py --out bench/results/gpu_fits_check.json      # needs a CUDA card > 24 GB
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tinylllite.run import memory  # noqa: E402

IMPLEMENTATION = {"controlnet": "tinylllite", "lllite": "lllite"}  # bench/train_step.py's names


def run_step(control: str, batch: int, card_gib: float, timeout: int) -> dict:
    """The in-memory step at this batch on a card capped to card_gib: ran, out of memory, or failed otherwise."""
    argv = [sys.executable, str(HERE / "train_step.py"), "--device", "cuda", "--shape", "sd15", "--precision", "bf16",
            "--impls", IMPLEMENTATION[control], "--batch", str(batch), "--steps", "2", "--warmup", "1", "--rounds", "1",
            "--no-flops", "--cap-gib", str(card_gib)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(batch=batch, outcome="timed out")
    if done.returncode == 0:
        report = json.loads(done.stdout[done.stdout.index("{"):])
        peak = report["implementations"][IMPLEMENTATION[control]].get("peak_memory_mib")
        return dict(batch=batch, outcome="ran", peak_mib=peak)
    oom = "out of memory" in (done.stderr + done.stdout).lower()
    return dict(batch=batch, outcome="out of memory" if oom else "failed", tail=done.stderr[-400:])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cards", type=float, nargs="+", default=[8, 12])
    parser.add_argument("--controls", nargs="+", default=["controlnet", "lllite"], choices=list(IMPLEMENTATION))
    parser.add_argument("--timeout", type=int, default=90, help="seconds per step process")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    rows, memo = [], {}
    for control in args.controls:
        config = memory.fixture_configuration(control, gradient_checkpointing=False)  # the suite's measured step
        for card in args.cards:
            batch = memory.largest_batch(config, card, half_load=False, memo=memo)  # it builds the base in fp32 on the card
            row = dict(control=control, card_gib=card, estimated_largest_batch=batch)
            if batch:
                row["at_estimate"] = run_step(control, batch, card, args.timeout)
                row["larger"] = run_step(control, max(batch + 1, -(-batch * 5 // 4)), card, args.timeout)
                row["estimate_right"] = (row["at_estimate"]["outcome"] == "ran"
                                         and row["larger"]["outcome"] == "out of memory")
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(benchmark="fits_check", rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
