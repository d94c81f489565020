"""errno <-> NBD error values ("Error values"), in both directions.

The server maps what its storage raised to the few values the spec defines
(anything else is EIO); a client maps an NBD error back to an errno to raise
an OSError its callers understand.
"""
from __future__ import annotations

import errno

from . import constants as k

__all__ = ["ERRNO_TO_NBD", "NBD_TO_ERRNO", "nbd_error", "to_errno"]

ERRNO_TO_NBD = {
    errno.EPERM: k.EPERM, errno.EACCES: k.EPERM, errno.EROFS: k.EPERM,
    errno.EIO: k.EIO, errno.ENOMEM: k.ENOMEM, errno.EINVAL: k.EINVAL,
    errno.ENOSPC: k.ENOSPC, errno.EDQUOT: k.ENOSPC, errno.EFBIG: k.ENOSPC,
    errno.EOVERFLOW: k.EOVERFLOW, errno.ENOTSUP: k.ENOTSUP, errno.ESHUTDOWN: k.ESHUTDOWN,
}

NBD_TO_ERRNO = {
    k.EPERM: errno.EPERM, k.EIO: errno.EIO, k.ENOMEM: errno.ENOMEM, k.EINVAL: errno.EINVAL,
    k.ENOSPC: errno.ENOSPC, k.EOVERFLOW: errno.EOVERFLOW, k.ENOTSUP: errno.ENOTSUP,
    k.ESHUTDOWN: errno.ESHUTDOWN,
}


def nbd_error(exc: BaseException) -> int:
    """The NBD error to answer for an exception raised by the storage."""
    if isinstance(exc, OSError) and exc.errno in ERRNO_TO_NBD:
        return ERRNO_TO_NBD[exc.errno]
    return k.EIO


def to_errno(error: int) -> int:
    """The errno for an NBD error value from a reply. The spec defines only
    the values above ("Error values"); anything else is squashed to EINVAL,
    as qemu's client does."""
    return NBD_TO_ERRNO.get(error, errno.EINVAL)
