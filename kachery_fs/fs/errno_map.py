"""The one place where project exceptions become errno values (STYLE rule 1).

Only ``FUSEError`` may leave a pyfuse3 handler: anything else takes the whole mount
down. Every handler body runs inside :func:`fuse_errors`.
"""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager

import pyfuse3

from ..errors import (
    Conflict,
    CrossDevice,
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    IsADirectory,
    NameTooLong,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PermissionDenied,
    ProtocolError,
    ReadOnly,
    Unavailable,
    as_no_space,
    leaves,
)

log = logging.getLogger(__name__)

_ERRNO = [  # a class comes before its bases
    (NotFound, errno.ENOENT),
    (NotPermitted, errno.EPERM),
    (PermissionDenied, errno.EACCES),
    (IntegrityError, errno.EIO),
    (ProtocolError, errno.EIO),
    (DeadlineExceeded, errno.ETIMEDOUT),
    (Unavailable, errno.EIO),
    (NoSpace, errno.ENOSPC),
    (ReadOnly, errno.EROFS),
    (NotEmpty, errno.ENOTEMPTY),
    (Conflict, errno.EEXIST),
    (NameTooLong, errno.ENAMETOOLONG),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (CrossDevice, errno.EXDEV),
    (InvalidInput, errno.EINVAL),
]


def errno_for(exc: BaseException) -> int | None:
    """The errno of a project error (``DeadlineExceeded`` is ``ETIMEDOUT``: it comes before
    ``Unavailable``, its base); None for anything else. In an exception group (trio's
    nurseries raise them), the first project error inside decides."""
    if isinstance(exc, BaseExceptionGroup):
        return next((code for leaf in leaves(exc) if (code := errno_for(leaf)) is not None),
                    None)
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    if as_no_space(exc, "") is not None:  # SQLite's own error, from a path not translated
        return errno.ENOSPC
    return None


@contextmanager
def fuse_errors(operation: str):
    """Translate whatever a handler raises into ``FUSEError``; log what is not expected."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except OSError as exc:
        # Local I/O (ENOSPC on the store's disk, EDQUOT, ...) keeps its errno.
        log.warning("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    except Exception as exc:
        code = errno_for(exc)
        if code is None:
            log.exception("%s: unexpected error; answering EIO", operation)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if code == errno.ENOENT:
            log.debug("%s: %s", operation, exc)
        else:
            log.warning("%s: %s", operation, exc)
        raise pyfuse3.FUSEError(code) from None
