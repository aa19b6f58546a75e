"""Exponential moving average of parameters (decay 0.999 in the paper); evaluation uses the averaged weights.
The decay warms up as min(0.999, (1 + n) / (10 + n)) over the n updates (torch_ema's use_num_updates): it
reaches 0.999 after ~9000 steps."""
from __future__ import annotations

from contextlib import contextmanager

import torch


class ExponentialMovingAverage:
    def __init__(self, parameters, decay: float = 0.999):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.parameters]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        # Warm-up as in common EMA practice: early averages are not dominated by the random initialization.
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, self.parameters):
            s.lerp_(p.detach(), 1.0 - decay)

    @contextmanager
    def average_parameters(self):
        """Temporarily load the averaged weights into the model."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for p, s in zip(self.parameters, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.parameters, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(saved)
