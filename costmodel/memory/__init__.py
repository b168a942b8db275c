"""Memory: the liveness timeline of a captured step (tensors, attention buffers, optimizer state)
reduced to a peak formula, and the OOM verdicts and limit searches built on it."""
