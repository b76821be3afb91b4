"""The errors mmtune raises on purpose, importable without torch (the CLI maps them to exit codes)."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later" — a preempted run can be resumed with train.resume_from=latest


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or unsafe to load."""


class NonFiniteError(FloatingPointError):
    """A loss term or the gradient became NaN / inf: the run stops before the optimizer step."""


class RunInUseError(RuntimeError):
    """Another live process trains into the same output folder."""


class Preempted(RuntimeError):
    """A preemption signal stopped the run after a checkpoint of the step in flight (resume with
    ``train.resume_from=latest``); the CLI exits with ``mmtune.preemption.PREEMPTED_EXIT``."""


class DiskFullError(OSError):
    """A checkpoint or ``final/`` could not be written for lack of space; nothing partial was left behind."""


class PeerLostError(RuntimeError):
    """Another process of a multi-process run died or stopped answering; this one stops too."""
