"""An exponential moving average of a model's weights (--model-ema), which evaluation uses in their place.

After every --model-ema-steps optimizer steps, each averaged parameter moves toward the model's by 1 - d, where
the decay d ramps up early in training as d = decay * (1 - exp(-updates / 2000)) (Ultralytics' ModelEMA does the
same), so that the first averages do not hold on to the random start. Buffers (batch norm statistics) are
copied, not averaged.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

RAMP_UPDATES = 2000


class ModelEma:
    """The averaged copy of a model (`module`, in eval mode, without gradients) and how many updates it has had."""

    def __init__(self, model: nn.Module, decay: float = 0.9998) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / RAMP_UPDATES))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward model's weights (the model unwrapped from DDP), and copy its buffers."""
        self.updates += 1
        weight = 1 - self.current_decay()
        averaged = [p for p in self.module.parameters() if p.is_floating_point()]
        current = [p.detach() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(averaged, current, weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}
