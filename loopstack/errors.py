"""The one exception type for mistakes a user can make (bad config, corpus, checkpoint, flag).

The CLI prints its message on one line and exits 2; bugs keep their tracebacks.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line naming the file, field or line."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that does not fit the typed config tree."""
