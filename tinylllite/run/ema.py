"""An exponential moving average (EMA) of the trained weights: what a run evaluates and exports when asked.

Each optimizer step moves the average a little toward the weights: avg += (1 - d) (w - avg). At a rate
that still moves the weights at the end of a run, the average is the smoother of the two; diffusers'
`EMAModel` and kohya's scripts keep one the same way. The decay ramps up as (1 + n) / (10 + n) over the
first updates (diffusers' formula), so the average does not stay near the random start.

`--ema-decay D` (tutorial_train.py) keeps one beside the trained weights. Evaluations, image logs and
every checkpoint's control file then use the average; the checkpoint's training_state.pt also keeps the
trained weights themselves, which a resume goes on training.
"""
from contextlib import contextmanager

import torch


class WeightAverage:
    """The EMA of `params` (on their device, fp32 like them), updated without reading the device."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"an EMA decay must lie in (0, 1), got {decay}")
        self.params, self.decay, self.updates = params, decay, 0
        self.average = [p.detach().clone() for p in params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: one fused lerp over every tensor."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - self.current_decay())
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """Inside, the parameters hold the average; the trained weights come back at the end."""
        trained = [p.detach().clone() for p in self.params]
        for p, a in zip(self.params, self.average):
            p.copy_(a)
        try:
            yield
        finally:
            for p, t in zip(self.params, trained):
                p.copy_(t)

    def state_dict(self) -> dict:
        """The decay, the count, and the trained weights (the checkpoint's control file holds the average)."""
        return dict(decay=self.decay, updates=self.updates, trained=[p.detach().cpu().clone() for p in self.params])

    @torch.no_grad()
    def resume(self, state: dict | None) -> None:
        """After a checkpoint's weights (the average, if its run kept one) were loaded into the parameters:
        take them as the average and put the trained weights back. A checkpoint without one starts it here."""
        if state is None:
            self.average = [p.detach().clone() for p in self.params]
            return
        if len(state["trained"]) != len(self.params):
            raise ValueError(f"the checkpoint's EMA holds {len(state['trained'])} tensors for {len(self.params)} "
                             f"trained parameters")
        self.average = [p.detach().clone() for p in self.params]
        for p, t in zip(self.params, state["trained"]):
            p.copy_(t)
        self.updates = state["updates"]
