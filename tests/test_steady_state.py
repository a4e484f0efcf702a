"""The training step on a GPU's terms, checked on the CPU: no device reads between log lines, one compiled graph."""
import pytest
import torch
from test_training import tiny_fill50k, train
from tiny_models import tiny_base
from torch.utils._python_dispatch import TorchDispatchMode

from tinylllite import control_branch, hint, training
from tinylllite.sample import sample


class HostReads(TorchDispatchMode):
    """Counts `_local_scalar_dense`: what .item(), bool(), float() and `if tensor:` of a tensor dispatch to."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_fill50k(tmp_path_factory.mktemp("data") / "fill50k_64")


@pytest.mark.parametrize("control", ["controlnet", "lllite"])
def test_steps_between_log_lines_read_nothing_back_from_the_device(control, data, tmp_path, monkeypatch):
    """Counting host reads step by step: none in a steady-state step, the loss and NaN flags only at log steps."""
    reads, per_step = HostReads(), []
    real_next_step = training.FiniteCheck.next_step

    def next_step(self):  # called once at the end of every optimizer step
        real_next_step(self)
        per_step.append(reads.count)

    monkeypatch.setattr(training.FiniteCheck, "next_step", next_step)
    with reads:
        train(data, tmp_path / "run", "--max-steps", 9, "--batch-size", 2, "--log-every", 4, "--control", control)
    during = [after - before for before, after in zip(per_step, per_step[1:])]  # reads of steps 2..9
    # a log line follows steps 4 and 8: its reads land in the next step's count (steps 5 and 9)
    steady = [n for step, n in enumerate(during, start=2) if step not in (5, 9)]
    assert steady == [0] * len(steady), during
    assert all(during[step - 2] > 0 for step in (5, 9)), during  # the log line does read, so the probe sees reads


def tiny_batch(base, batch_size: int = 2) -> dict:
    """A model-ready batch at the tiny base's 64 px: what batches.BatchEncoder hands the loss."""
    g = torch.Generator().manual_seed(0)
    hidden, _ = base.encode_prompt(["red circle with blue background"] * batch_size)
    return dict(latents=torch.randn(batch_size, 4, 8, 8, generator=g), noise=torch.randn(batch_size, 4, 8, 8, generator=g),
                timesteps=torch.randint(0, 1000, (batch_size,), generator=g), hidden=hidden, added_cond_kwargs=None,
                hint=torch.rand(batch_size, 3, 64, 64, generator=g))


def loss_module(kind: str):
    base = tiny_base()
    torch.manual_seed(0)
    control = control_branch.build(kind, base, 8, 16, "input,middle,output")
    named = training.prepare_trainable(base, control)
    loss = training.TrainingLoss(base, control, training.training_scheduler(base), [p for _, p in named], snr_gamma=5.0)
    return base, control, named, loss


@pytest.mark.parametrize("kind", ["controlnet", "lllite"])
def test_the_training_loss_traces_as_one_graph_without_breaks(kind):
    """torch._dynamo.explain of the loss (UNet + branch + Min-SNR) finds one graph and no graph break."""
    base, _, _, loss = loss_module(kind)
    torch._dynamo.reset()
    with hint.checked_on_host():
        explanation = torch._dynamo.explain(loss)(tiny_batch(base))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["controlnet", "lllite"])
def test_a_sampling_step_with_the_branch_traces_without_breaks(kind):
    """The UNet prediction a sampler calls (CFG batch of 2B, hint) traces as one graph for both branches."""
    base, control, _, _ = loss_module(kind)
    control.eval()
    batch = tiny_batch(base)
    torch._dynamo.reset()
    with torch.no_grad(), control_branch.conditioned(control, batch["hint"]) as step_hint:
        explanation = torch._dynamo.explain(control_branch.unet_prediction)(
            base, control, batch["latents"], batch["timesteps"], batch["hidden"], None, step_hint)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("kind", ["controlnet", "lllite"])
def test_compiled_training_gives_the_eager_losses_over_20_steps(kind):
    """20 AdamW steps through torch.compile (AOT autograd, no code generation) match eager within float rounding."""
    losses = {}
    for compiled in (False, True):
        base, _, named, loss = loss_module(kind)
        params = [p for _, p in named]
        optimizer = training.make_optimizer(params, 1e-3)
        fn = torch.compile(loss, backend="aot_eager") if compiled else loss
        torch._dynamo.reset()
        losses[compiled] = []
        for step in range(20):
            batch = tiny_batch(base)
            batch["timesteps"] = (batch["timesteps"] + 37 * step) % 1000
            optimizer.zero_grad(set_to_none=True)
            with hint.checked_on_host():
                value = fn(batch)
            value.backward()
            optimizer.step()
            losses[compiled].append(value.item())
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-6)


def test_sample_with_compile_makes_the_same_images(tmp_path):
    """sample(..., compile=True) through torch.compile (AOT autograd backend) gives the eager images."""
    base, control, _, _ = loss_module("controlnet")
    control.eval()
    hint_image = (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).byte()
    hint_image = hint_image.permute(0, 2, 3, 1).numpy()
    eager = sample(base, ["red circle with blue background"], control, hint_image, steps=3, cfg=3.0)
    compiled = sample(base, ["red circle with blue background"], control, hint_image, steps=3, cfg=3.0,
                      compile="aot_eager")
    assert abs(compiled.astype(int) - eager.astype(int)).max() <= 1
