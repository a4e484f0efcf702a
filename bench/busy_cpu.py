"""The tiny training step on a CPU that something else is also using: which thread settings hold up.

A laptop that runs a browser, or a CI machine that runs two jobs, gives the training process fewer cores
than it sees. PyTorch's CPU kernels split each operator over `torch.get_num_threads()` OpenMP threads and
wait for all of them at its end; when another process holds one of the cores, every operator waits for
the thread that is not running, and OpenMP's threads spin while they wait, taking CPU from the very
thread they wait for. This benchmark measures the in-memory training step of the tiny default job
(`bench/train_step.py`, ControlNet, batch 16) for each thread setting, alone and beside `--competitors`
CPU-bound processes (`while True: pass`), each setting in a fresh process (OpenMP reads its wait policy
once, at start):

- threads 1, 2 (or the cores), with OpenMP's default wait policy and with `OMP_WAIT_POLICY=PASSIVE`
  (waiting threads sleep at once instead of spinning).

Reported: the median step per setting and condition, and busy / alone. A core lost to another process
costs at most 2x on two cores; more than that is the settings' fault.

    python bench/busy_cpu.py --out bench/results/cpu_busy.json
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPIN = "while True: pass"


def step_ms(threads: int, policy: str | None, steps: int, warmup: int) -> float:
    """The median in-memory training step (ms) of a fresh process with these settings."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, str(HERE / "train_step.py"), "--impls", "tinylllite", "--batch", "16",
                          "--steps", str(steps), "--warmup", str(warmup), "--rounds", "1", "--no-flops",
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout[out.stdout.index("{"):])
    return report["implementations"]["tinylllite"]["median_ms"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--competitors", type=int, default=1, help="CPU-bound processes beside the step")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    settings = [(threads, policy) for threads in sorted({1, cores}) for policy in (None, "PASSIVE")]
    results = {}
    for busy in (False, True):
        competitors = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.competitors if busy else 0)]
        try:
            time.sleep(1 if busy else 0)
            for threads, policy in settings:
                name = f"threads {threads}, wait policy {(policy or 'default').lower()}"
                results.setdefault(name, {})["busy_ms" if busy else "alone_ms"] = round(
                    step_ms(threads, policy, args.steps, args.warmup), 1)
        finally:
            for c in competitors:
                c.kill()
                c.wait()
    for r in results.values():
        r["busy_over_alone"] = round(r["busy_ms"] / r["alone_ms"], 2)
    report = dict(benchmark="busy_cpu", cores=cores, competitors=args.competitors, steps=args.steps,
                  settings=results)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
