"""Calibration data (sources -> CalibrationSet) and, in runner.py, the layer-wise pipeline."""
from .data import CalibrationSet, builtin_text, load_calibration, load_eval_ids

__all__ = ["CalibrationSet", "builtin_text", "load_calibration", "load_eval_ids"]
