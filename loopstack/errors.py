"""The one exception type for mistakes a user can make (bad config, corpus, checkpoint, flag).

The CLI prints its message on one line and exits 2; bugs keep their tracebacks.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line naming the file, field or line."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that does not fit the typed config tree."""


# Exit code of `loopstack train` after SIGUSR1/SIGTERM: the step finished, a checkpoint was written, and the
# job wants to be requeued (EX_TEMPFAIL from sysexits.h). Launchers requeue on it; 0 means training finished.
EXIT_REQUEUE = 75

# Exit code of `loopstack train` when the run diverged (loss stuck above the uniform-prediction loss, or loss
# spikes that rollbacks did not cure): nothing more is saved, the message names the last good checkpoint.
# Launchers never requeue it: resuming would diverge again; the user changes the config first.
EXIT_DIVERGED = 3

# Exit code when the disk filled up (or another I/O failure) while writing a checkpoint: the partial checkpoint
# is removed, the earlier ones are kept (EX_IOERR from sysexits.h). Not requeued either.
EXIT_NO_SPACE = 74


class DivergedError(UserError):
    """Training diverged; the message says at which step and which checkpoint is the last good one."""

    exit_code = EXIT_DIVERGED


class NoSpaceError(UserError):
    """A checkpoint could not be written for lack of space; the message names path, need and free space."""

    exit_code = EXIT_NO_SPACE
