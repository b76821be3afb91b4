"""The errors mmtune raises on purpose, importable without torch (the CLI maps them to exit codes)."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or unsafe to load."""


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient became NaN / inf: the run stops before the optimizer step."""


class RunInUseError(RuntimeError):
    """Another live process trains into the same output folder."""
