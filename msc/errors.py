"""The one exception type users see: a clear, single-line message about what was wrong."""


class MscError(Exception):
    """A user-facing error: bad input, an impossible plan, a dead peer.

    The CLI prints ``str(err)`` on one line and exits non-zero; no traceback.
    """
