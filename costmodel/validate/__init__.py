"""Validation: the real step run on a device (one runner for the meters and the validator), the
meters of peak memory, and the statistics of the doubling experiment."""
