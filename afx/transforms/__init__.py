"""The transform catalogue: each function returns an :class:`afx.GradientTransformation`."""

from afx.transforms.apollo import scale_by_apollo
from afx.transforms.came import CameState, came_confidence
from afx.transforms.clipping import clip_by_rms
from afx.transforms.factored_rms import FactoredRmsState, RmsState, scale_by_factored_rms
from afx.transforms.fira import FiraState, fira_limit
from afx.transforms.momentum import EmaState, ema
from afx.transforms.preconditioner import MomentumState, preconditioner
from afx.transforms.quantize import quantize_state
from afx.transforms.rms import SecondMomentState, scale_by_rms
from afx.transforms.step_size import (
    StepSize,
    adam_bias_correction,
    constant,
    heavy_ball,
    learning_rate,
    param_rms,
    relative_step,
    scale,
    scale_by_learning_rate,
    scale_by_param_rms,
    scale_by_relative_step,
    scale_by_step_size,
    second_moment_correction,
)
from afx.transforms.weight_decay import add_decayed_weights

__all__ = [
    "CameState",
    "EmaState",
    "FactoredRmsState",
    "FiraState",
    "MomentumState",
    "RmsState",
    "SecondMomentState",
    "StepSize",
    "adam_bias_correction",
    "add_decayed_weights",
    "came_confidence",
    "clip_by_rms",
    "constant",
    "ema",
    "fira_limit",
    "heavy_ball",
    "learning_rate",
    "param_rms",
    "preconditioner",
    "quantize_state",
    "relative_step",
    "scale",
    "scale_by_apollo",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_param_rms",
    "scale_by_relative_step",
    "scale_by_rms",
    "scale_by_step_size",
    "second_moment_correction",
]
