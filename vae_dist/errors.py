"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A failure with a cause the user can fix; its message is the whole report."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
