"""The one exception type for mistakes a user can fix (config, data, weights)."""


class UserError(Exception):
    """A bad config key, missing file or malformed input.

    The message names the file or key and says what to do; run.py prints it without a stack trace and
    exits with code 2.
    """
