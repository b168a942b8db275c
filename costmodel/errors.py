"""The one exception type users see.

A `CostModelError` carries a one-paragraph message (what was received, what is accepted) and the
exit code the CLI uses: 2 for bad usage, 1 for an analysis that failed.
"""


class CostModelError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CostModelError):
    """The user asked for something malformed or unknown (exit code 2)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class AnalysisError(CostModelError):
    """The model could not be built, captured or analysed (exit code 1)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


class CaptureFailed(AnalysisError):
    """The model could not be captured at a point (it cannot run there, or the tracer cannot follow
    it): `point` is where, `reason` the first line of what failed."""

    def __init__(self, message: str, point: dict | None = None, reason: str = ""):
        super().__init__(message)
        self.point = dict(point or {})
        self.reason = reason or message


class OutsideLimits(AnalysisError):
    """A point beyond a limit of the model (a table indexed by positions, ...): `limit` says which."""

    def __init__(self, message: str, point: dict, limit):
        super().__init__(message)
        self.point, self.limit = dict(point), limit
