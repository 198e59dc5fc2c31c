"""Exponential moving average of the weights, as the paper uses it: a fixed decay from step 0.

diffusers' `EMAModel` ramps its decay up as min(decay, (1 + n) / (10 + n)); the official DDPM code (TensorFlow's
`ExponentialMovingAverage` without `num_updates`) applies the fixed decay from the first step, which is
what this class does, with one fused `torch._foreach_lerp_` per update and no host synchronisation.
"""

from __future__ import annotations

from typing import Iterable

import torch


class ExponentialMovingAverage:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`):
            The parameters to follow; the shadow starts as their copy.
        decay (`float`):
            Weight of the old average per update, in [0, 1).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        # lerp(shadow, param, 1 - decay) = shadow + (1 - decay) (param - shadow)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in parameters], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Write the averaged weights into `parameters`."""
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow)

    def state_dict(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The shadow weights keyed by the model's parameter `names` (so an EMA file is a model state dict)."""
        return {name: shadow.contiguous() for name, shadow in zip(names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor], names: list[str]) -> None:
        missing = set(names) - set(state)
        if missing:
            raise ValueError(f"the EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}.")
        with torch.no_grad():
            for name, shadow in zip(names, self.shadow, strict=True):
                shadow.copy_(state[name])
