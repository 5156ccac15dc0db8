"""The one exception type that the CLI turns into a single line of error."""


class DistillError(Exception):
    """A problem with the user's input (paths, configs, data): reported as one line, exit code 2."""
