"""The exception tree of kachery-fs.

Every module raises only these (or lets a genuine bug surface as something else).
Each class names a *condition*, not a transport detail, so the three tiers stay
separate: wire errors (HTTP status, socket errors) are translated into these in
exactly one place per source (``kachery_fs._http.check_response``), and these are
translated into errno values in exactly one place (``kachery_fs.fs.errno_map``) and
into one-line messages in exactly one place (``kachery_fs.cli``).
"""

from __future__ import annotations


class KacheryError(Exception):
    """Base of every error that kachery-fs raises on purpose.

    ``str(error)`` is a complete, one-line message fit to show a user.
    """


class InvalidInput(KacheryError):
    """The caller gave something malformed: a bad hash, URI, name or argument."""


class NameTooLong(InvalidInput):
    """A file name over :data:`kachery_fs.state.NAME_MAX` bytes (``ENAMETOOLONG``)."""


class NotADirectory(InvalidInput):
    """A path's directory part names something else (``ENOTDIR``)."""


class IsADirectory(InvalidInput):
    """A file operation on a directory (``EISDIR``)."""


class CrossDevice(InvalidInput):
    """A rename or link between channels, which are separate file systems (``EXDEV``)."""


class NotFound(KacheryError):
    """The thing asked for does not exist (in this source, or anywhere we looked)."""


class PermissionDenied(KacheryError):
    """The node is not allowed to do this (hub permission, signature refused, EACCES)."""


class NotPermitted(PermissionDenied):
    """An operation no one may do here, whatever the permission bits (``EPERM``): a hard
    link to a directory, a change to a built-in directory."""


class IntegrityError(KacheryError):
    """Bytes did not match their SHA-1, or a download was truncated or overlong."""


class CorruptLocalFile(IntegrityError):
    """A file in the local store no longer matches its hash (disk fault, outside edit)."""


class ProtocolError(KacheryError):
    """A server answered in a way the protocol forbids (e.g. ``200`` to a ``Range`` GET)."""


class Conflict(KacheryError):
    """A precondition failed: the object already exists, a generation did not match."""


class NotEmpty(Conflict):
    """A directory to remove or replace still has names in it (``ENOTEMPTY``)."""


class Unavailable(KacheryError):
    """A service could not be reached or answered with a transient failure.

    Retrying later may succeed.  ``retry_after`` is a server's hint in seconds, if any.
    """

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Unavailable):
    """A wait ran past the deadline its caller set, or a transfer stopped making progress."""


class NoSpace(KacheryError):
    """The disk (or quota) that holds the node's store or database is full (``ENOSPC``).

    Raised instead of SQLite's "database or disk is full" (see :func:`as_no_space`); the
    operation changed nothing: a name keeps its previous content.
    """


#: SQLite's primary result code for "database or disk is full".
_SQLITE_FULL = 13


def as_no_space(exc: BaseException, what: str) -> NoSpace | None:
    """``exc`` as :class:`NoSpace` when it is SQLite's ``SQLITE_FULL`` (a write found the
    disk full), else None. Duck-typed (``sqlite_errorcode``), so this module needs no
    sqlite3."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
        return NoSpace(f"{what}: the disk is full ({exc})")
    return None


class NewerDatabase(KacheryError):
    """A database file was made by a newer kachery-fs (its schema version is past the
    newest this one knows): it is left untouched, and the message names the kachery-fs
    that made it, to upgrade to (see ``kachery_fs._sqlite``)."""


class ReadOnly(KacheryError):
    """A write was attempted on something that can only be read."""


class NotMounted(KacheryError):
    """A mount point is not mounted (or not by kachery-fs)."""


def leaves(exc: BaseException):
    """The exceptions inside (nested) exception groups, in order; ``exc`` if not a group.

    trio raises a nursery's errors wrapped in groups; callers that show or map an error
    look at what is inside.
    """
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc
