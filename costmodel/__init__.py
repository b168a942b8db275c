"""costmodel: static FLOPs, bytes, memory and roofline time of PyTorch models, as formulas in the
dimensions the user names. See `costmodel.analyze` and the `costmodel` command."""

from .api import Point, Report, analyze
from .validate.stats import measure_complexity
from .errors import AnalysisError, CostModelError, UsageError
from .symbols import dim_symbol, symbols_for

__all__ = ["analyze", "measure_complexity", "Report", "Point", "CostModelError", "UsageError", "AnalysisError", "dim_symbol", "symbols_for"]
