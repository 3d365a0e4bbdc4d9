"""The errors segbatch raises on purpose, in one place.

``SegbatchError`` is the base the command line catches: its message names
the cause and the fix, and is shown as one line without a traceback.
Anything else reaching the command line is a bug.

The storage faults split the way the contract does: a fault that is
provably one object's own (empty, truncated, not an image, too large, gone
though just listed) becomes that object's error row; any other fault
(``StorageFault``) is never written as a row. It fails the shard (the
driver retries it; a rerun resumes it), and when it is the whole store's
(``StoreUnavailable``: credentials expired or revoked, a missing bucket, a
wrong region) the driver stops the job with one message naming the fix.
"""

from __future__ import annotations


class SegbatchError(Exception):
    """A failure the user can act on; the message names the cause and the fix."""

    exit_code = 1


class UsageError(SegbatchError):
    """The command as given cannot run (a bad option, a missing bucket, a bad
    manifest or checkpoint): exit status 2, as for a usage error."""

    exit_code = 2


class StorageFault(SegbatchError, OSError):
    """Storage failed in a way that is not the object's own fault: throttling
    or resets that outlasted the retries, or access refused.

    url: the object (credentials masked); kind: ``transient``, ``denied``,
    ``no-bucket`` or ``redirect``. Never becomes an error row.
    """

    def __init__(self, message: str, url: str = "", kind: str = "transient"):
        super().__init__(message)
        self.url = url
        self.kind = kind

    def __reduce__(self):  # Ray pickles it from an actor to the driver
        return (type(self), (str(self), self.url, self.kind))


class StoreUnavailable(StorageFault):
    """The store refuses this job as a whole (expired or revoked credentials,
    a missing bucket, a wrong region or endpoint). ``fix`` says what to do."""

    def __init__(self, message: str, url: str = "", kind: str = "denied", fix: str = ""):
        super().__init__(message, url, kind)
        self.fix = fix

    def __reduce__(self):
        return (type(self), (str(self), self.url, self.kind, self.fix))


class BucketMissing(StoreUnavailable):
    """The bucket a URL names does not exist (or the endpoint or region is
    wrong): the command as given cannot run, so exit status 2 as for a usage error."""

    exit_code = 2
