"""Errors a user can act on: the one hierarchy. The CLI prints these as one line instead of a
traceback (set JAXDIFF_DEBUG=1 for the traceback).

    JaxdiffError
      ConfigError               a config file, key or value        (also a ValueError)
      DataError                 a dataset the user can fix         (also a ValueError)
        DatasetNotAvailableError  a TFDS dataset not prepared locally
      CheckpointError           a checkpoint / model folder missing, unsafe or corrupt (ValueError)
      ShardingError             a mesh or batch that does not fit the devices (ValueError)
      TrainingError             training cannot go on (diverged, incompatible run) (RuntimeError)
    JaxdiffWarning              what a user should know that does not stop the work (UserWarning)

Every module raises these classes (re-exported where they are used, e.g.
`jaxdiff.checkpoint.CheckpointError is jaxdiff.errors.CheckpointError`), so `except
jaxdiff.errors.CheckpointError` catches a bad folder, a bad single file and a bad training
checkpoint alike.
"""


class JaxdiffError(Exception):
    """Base of jaxdiff's own errors: each message names the problem and, where there is one, the fix."""


class ConfigError(JaxdiffError, ValueError):
    """A config file, key or value the user can fix."""


class DataError(JaxdiffError, ValueError):
    """A dataset problem the user can fix (bad name, bad file, bad option)."""


class DatasetNotAvailableError(DataError):
    """A TFDS dataset is not prepared in the data directory (and will not be downloaded)."""


class CheckpointError(JaxdiffError, ValueError):
    """A checkpoint or model folder that is missing, unsafe to read, corrupt, or does not fit the
    network."""


class ShardingError(JaxdiffError, ValueError):
    """A batch or mesh shape that cannot be laid out on the devices present."""


class TrainingError(JaxdiffError, RuntimeError):
    """Training cannot go on (diverged, or the work dir holds an incompatible run)."""


class JaxdiffWarning(UserWarning):
    """Something a user should know that does not stop the work (a skipped unreadable checkpoint,
    a scheduler option that is ignored); the CLI prints each as one `warning:` line."""


# What the CLI reports as a one-line message. ValueError covers bad arguments raised by the
# modules (an image size the U-Net cannot halve, an unknown sampler option, ...).
USER_ERRORS = (JaxdiffError, ValueError, FileNotFoundError)
