"""The default job and notebook 06 on a 2-core machine that something else is also using.

`bench/busy_cpu.py` measures the bare training step; this measures what a newcomer runs. Each case runs in
a fresh process, alone and then beside `--competitors` CPU-bound processes (`while True: pass`, one core
each), in a scratch folder:

- `job`: `python tutorial_train.py --max-minutes M` (the tiny default job, cut to M minutes), with the
  project's default threads (one per core other processes leave free, `tinylllite/run/cores.py`) and with
  `--threads` fixed at the machine's cores (torch's own choice, the earlier default). Reported: wall
  time, optimizer steps inside the limit, and the last evaluation.
- `notebook`: notebooks/06_training.ipynb executed top to bottom (nbclient, as the tests run it), with the
  project's defaults. Reported: wall time and the slowest cell against the tests' 600 s cell timeout.

    python bench/busy_job.py --out bench/results/cpu_busy_job.json
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPIN = "while True: pass"


def default_job(minutes: float, threads: int | None, scratch: Path) -> dict:
    out = scratch / f"job-{time.time_ns()}"
    argv = [sys.executable, str(REPO / "tutorial_train.py"), "--max-minutes", str(minutes), "--out", str(out),
            "--data", str(REPO / "training" / "fill50k_64"), "--cache-dir", str(scratch / "cache")]
    argv += ["--threads", str(threads)] if threads else []
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=scratch)
    wall = time.time() - started
    if done.returncode != 0:
        return dict(wall_seconds=round(wall, 1), failed=done.stderr[-500:])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [e for e in events if "fidelity_iou" in e]
    steps = max(e["step"] for e in events)
    changes = re.findall(r"other processes are using .*", done.stdout + done.stderr)
    return dict(wall_seconds=round(wall, 1), steps=steps, last_iou=round(scores[-1]["fidelity_iou"], 3) if scores
                else None, thread_changes=changes[:5])


def notebook(scratch: Path) -> dict:
    import nbformat
    from nbclient import NotebookClient

    path = REPO / "notebooks" / "06_training.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    cell_seconds = []
    started = time.time()

    def timed(cell, index):  # nbclient's per-cell hook: the time of each code cell
        cell_seconds.append(time.time() - timed.last)
        timed.last = time.time()
    timed.last = started
    client.on_cell_executed = lambda cell, cell_index, execute_reply: timed(cell, cell_index)
    client.execute()
    return dict(wall_seconds=round(time.time() - started, 1), slowest_cell_seconds=round(max(cell_seconds), 1),
                cell_timeout_seconds=600)


def beside(competitors: int, run):
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(competitors)]
    try:
        time.sleep(1 if competitors else 0)
        return run()
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="the job's --max-minutes")
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["job", "notebook"], choices=["job", "notebook"])
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    report = dict(benchmark="busy_job", cores=cores, competitors=args.competitors, minutes=args.minutes, cases={})
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if "job" in args.cases:
            default_job(1.0, None, scratch)  # fills the cache, so no measured run pays for it
            for name, threads in (("default threads", None), (f"--threads {cores}", cores)):
                for busy in (0, args.competitors):
                    key = f"job, {name}, {'busy' if busy else 'alone'}"
                    report["cases"][key] = beside(busy, lambda: default_job(args.minutes, threads, scratch))
                    print(key, report["cases"][key], flush=True)
        if "notebook" in args.cases:
            for busy in (0, args.competitors):
                key = f"notebook 06, {'busy' if busy else 'alone'}"
                report["cases"][key] = beside(busy, lambda: notebook(scratch))
                print(key, report["cases"][key], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
