"""A run folder has one writer, and a resumed run trains with the settings it prints and records."""
import json
import subprocess
import sys
import time

import pytest
import torch
from test_training import tiny_fill50k, train

from tinylllite.control_branch import control_kind
from tinylllite.errors import InputError
from tinylllite.files.checkpoint import list_checkpoints
from tinylllite.files.run_lock import RunLock


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fill50k(tmp_path_factory.mktemp("data") / "fill50k_64")


@pytest.fixture(scope="module")
def lllite_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lllite") / "run"
    train(data, out, "--max-steps", 2, "--batch-size", 2, "--control", "lllite")
    return out


def hold_lock(folder):
    """Another process that takes the run's lock and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", f"from tinylllite.files.run_lock import RunLock\n"
                               f"import time\nlock = RunLock({str(folder)!r})\nprint('locked', flush=True)\n"
                               f"time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_of_a_run_folder_is_refused_naming_the_process_that_holds_it(data, lllite_run):
    """While one process writes a run, a --resume-from of it is refused at once and the run's files stay as they were."""
    def files():  # the run's own files; the lock file holds whichever process holds the lock
        return {p.name: p.read_bytes() for p in lllite_run.iterdir() if p.is_file() and p.name != RunLock.LOCK_NAME}

    before = files()
    holder = hold_lock(lllite_run)
    try:
        started = time.time()
        with pytest.raises(InputError, match=rf"being written by process {holder.pid} .*another --out"):
            train(data, lllite_run, "--max-steps", 3, "--batch-size", 2, "--resume-from", lllite_run)
        assert time.time() - started < 10  # refused before the base, the data or the branch
    finally:
        holder.kill()
        holder.wait()
    assert files() == before


def test_the_lock_is_released_when_its_process_ends_however_it_ends(tmp_path):
    """A killed holder leaves no stale lock: the next writer takes it."""
    holder = hold_lock(tmp_path / "run")
    holder.kill()
    holder.wait()
    with RunLock(tmp_path / "run") as lock:
        assert lock.path.read_text().strip() == str(__import__("os").getpid())


def test_a_fresh_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path):
    """Data that does not exist is refused, and the run folder the call would have made is not left empty."""
    with pytest.raises(InputError):
        train(tmp_path / "missing", tmp_path / "run", "--max-steps", 1)
    assert not (tmp_path / "run").exists()


def test_resuming_an_lllite_run_needs_no_control_flag_and_a_wrong_one_is_refused(data, lllite_run, tmp_path):
    """The run's config says it is an LLLite: resuming without --control trains it; --control controlnet is refused."""
    with pytest.raises(InputError, match=r"--control controlnet: the run .* trains a lllite"):
        train(data, lllite_run, "--max-steps", 3, "--batch-size", 2, "--resume-from", lllite_run, "--control",
              "controlnet")
    result = train(data, lllite_run, "--max-steps", 3, "--batch-size", 2, "--resume-from", lllite_run)
    assert control_kind(result["control"]) == "lllite" and result["step"] == 3


def test_a_learning_rate_given_on_resume_is_the_one_that_trains_and_is_recorded(data, tmp_path):
    """--learning-rate on resume replaces the restored optimizer's rate: printed, recorded and used alike."""
    out = tmp_path / "run"
    train(data, out, "--max-steps", 1, "--batch-size", 2)
    train(data, out, "--max-steps", 2, "--batch-size", 2, "--resume-from", out, "--learning-rate", 0.01)
    recorded = json.loads((out / "config_resume_1.json").read_text())
    assert recorded["settings"]["learning_rate"] == 0.01
    state = torch.load(list_checkpoints(out)[-1] / "training_state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.01]


def test_a_resume_keeps_the_runs_own_settings_where_no_flag_is_given(data, tmp_path):
    """A run trained at lr 3e-5 resumes at 3e-5, not at the config block's rate."""
    out = tmp_path / "run"
    train(data, out, "--max-steps", 1, "--batch-size", 2, "--learning-rate", 3e-5)
    train(data, out, "--max-steps", 2, "--batch-size", 2, "--resume-from", out)
    state = torch.load(list_checkpoints(out)[-1] / "training_state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [3e-5]


def test_unlocking_the_decoder_of_a_locked_run_on_resume_is_refused_in_one_line(data, tmp_path):
    """--sd-locked false on a run trained locked would train other weights: refused, pointing at --resume-path."""
    out = tmp_path / "run"
    train(data, out, "--max-steps", 1, "--batch-size", 2)
    with pytest.raises(InputError, match=r"--sd-locked False: .* trained with True.*--resume-path"):
        train(data, out, "--max-steps", 2, "--batch-size", 2, "--resume-from", out, "--sd-locked", "false")


def test_more_threads_than_usable_cores_are_refused_where_the_flag_is_parsed(capsys):
    """--threads 1000 on a machine with a few cores is refused naming the usable count."""
    import tutorial_train
    from tinylllite.run.cores import usable_cores

    with pytest.raises(SystemExit):
        tutorial_train.parse_args(["--threads", str(len(usable_cores()) + 1)])
    assert f"for {len(usable_cores())} usable cores" in capsys.readouterr().err


def test_a_run_whose_time_is_spent_before_its_first_step_still_ends_with_a_checkpoint(data, tmp_path):
    """--max-minutes counts from the start of the process: a cache fill that cannot finish is abandoned and the run
    ends at step 0 with its checkpoint, inside the limit."""
    out = tmp_path / "run"
    result = train(data, out, "--max-minutes", 0.001, "--cache", "--batch-size", 2)
    assert result["step"] == 0
    assert [c.name for c in list_checkpoints(out)] == ["step_0000000"]
    assert not list((tmp_path / "cache").glob("*/done"))  # nothing half-filled was kept


def test_an_evaluation_that_would_end_past_the_deadline_is_shortened_and_says_how_many_pairs(data):
    """image_log.evaluate scores only the batches that end before the deadline and reports how many pairs it scored."""
    from tiny_models import tiny_base

    from tinylllite.data.fidelity import evaluation_pairs
    from tinylllite.run.image_log import evaluate

    from tinylllite.control_branch import build

    base, pairs = tiny_base(), evaluation_pairs(4, 64, seed=5)
    control = build("controlnet", base)
    assert evaluate(base, control, pairs, steps=1, batch_size=2, deadline=time.time() - 1) == {"pairs": 0}
    scores = evaluate(base, control, pairs, steps=1, batch_size=2)
    assert scores["pairs"] == 4 and 0 <= scores["fidelity_iou"] <= 1


def test_a_resume_without_data_flag_trains_on_the_runs_own_data(data, tmp_path, monkeypatch):
    """--resume-from alone reads the run's recorded --data; nothing is written in the working folder's ./training."""
    import tutorial_train
    from tiny_models import tiny_base

    out = tmp_path / "run"
    train(data, out, "--max-steps", 1, "--batch-size", 2)
    monkeypatch.chdir(tmp_path)  # a folder without ./training: the default data would have to be written here
    result = tutorial_train.main(["--resume-from", str(out), "--max-steps", "2", "--cache-dir", str(tmp_path / "c")],
                                 base=tiny_base())
    assert result["step"] == 2 and not (tmp_path / "training").exists()
    assert json.loads((out / "config_resume_1.json").read_text())["data"] == str(data)
