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
