"""torch.optim adapters: the generic :class:`Optimizer` and the prepackaged optimizers."""

from afx.optim.adafactor import Adafactor, adafactor
from afx.optim.adafactor8bit import Adafactor8Bit, adafactor8bit
from afx.optim.optimizer import Optimizer, StepLayout
from afx.optim.presets import build_param_groups

__all__ = ["Adafactor", "Adafactor8Bit", "Optimizer", "StepLayout", "adafactor", "adafactor8bit",
           "build_param_groups"]
