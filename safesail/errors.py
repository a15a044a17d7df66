"""Errors meant for users: one sentence saying what is wrong and what to do."""


class UserError(Exception):
    """An expected mistake (bad path, bad config, mismatched inputs).

    The CLI prints the message alone (no traceback) and exits with status 2.
    Write the message as one sentence: what was wrong, and what to do.
    """
