"""torch.optim adapters: the generic :class:`Optimizer` and the prepackaged optimizers."""

from afx.optim.adafactor import Adafactor, adafactor
from afx.optim.optimizer import Optimizer

__all__ = ["Adafactor", "Optimizer", "adafactor"]
