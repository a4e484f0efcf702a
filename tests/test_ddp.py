"""Multi-process training (torchrun's environment, gloo on CPU) equals one process on the combined batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_training import logged_loss, tiny_fill50k, train

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, data: str, out: str, port: int) -> None:
    """What torchrun sets up for each process, then the ordinary training entry point."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(data, out, "--max-steps", 2, "--batch-size", 2)
    save_file({k: v.contiguous() for k, v in result["control"].state_dict().items()}, f"{out}/rank{rank}.safetensors")


def test_two_gloo_processes_on_different_shards_train_like_one_process_on_both(tmp_path):
    """2 ranks x batch 2 (different samples each): identical weights on both ranks, equal to 1 process at batch 4."""
    data = tiny_fill50k(tmp_path / "fill50k_64")
    mp.spawn(worker, args=(str(data), str(tmp_path / "ddp"), free_port()), nprocs=WORLD, join=True)
    ranks = [load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in range(WORLD)]
    single = train(data, tmp_path / "one", "--max-steps", 2, "--batch-size", 4)["control"].state_dict()
    lr = 1e-5  # real-SD default; Adam's steps are ~lr wherever the gradient is well above its eps
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=0.05 * lr, msg=lambda m: f"{key}: {m}")
    assert (tmp_path / "ddp" / "checkpoints" / "step_0000002").is_dir()  # rank 0 saved
    # the logged loss is the mean over both ranks' samples (a constant factor would not show in Adam's weights)
    assert [logged_loss(tmp_path / "ddp", s) for s in (1, 2)] == pytest.approx(
        [logged_loss(tmp_path / "one", s) for s in (1, 2)], rel=1e-5)
