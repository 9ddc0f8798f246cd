"""The errors a user can fix.  The command lines print them as one line and exit 2 (``cli.EXIT``)."""


class UserError(ValueError):
    """Input the user can fix (a value, a file, a run id): the command lines print it as one line."""


class ConfigError(UserError):
    """A configuration value or key the run cannot use."""
