"""Opening an object store: which ``storage`` values are URIs, and the pyarrow file system of one
(sweeps.objstore uses it for the working copies, sweeps.objlock for a lock on a store other than S3)."""
from __future__ import annotations

import os

from .errors import StorageError


def is_remote(storage) -> bool:
    """True for an object-store URI (``s3://...``); a local path (or ``file://``) is not."""
    s = str(storage)
    return "://" in s and not s.startswith("file://")


def filesystem(uri: str):
    """``(pyarrow file system, path inside it)`` for ``uri``.

    ``s3://``: ``pyarrow.fs.S3FileSystem`` with the endpoint of ``$AWS_ENDPOINT_URL_S3`` or
    ``$AWS_ENDPOINT_URL`` (MinIO, Ceph, a local ``moto_server``) and the region of ``$AWS_REGION`` or
    ``$AWS_DEFAULT_REGION``; credentials come from the AWS SDK's usual chain (``$AWS_ACCESS_KEY_ID`` /
    ``$AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role), on every node. Other schemes:
    ``pyarrow.fs.FileSystem.from_uri``.
    """
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0].lower()
    try:
        if scheme == "s3":
            kw = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                u = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
                kw.update(endpoint_override=u.netloc, scheme=u.scheme)
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                kw["region"] = region
            return pafs.S3FileSystem(**kw), uri[len("s3://"):].strip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    except (ValueError, OSError) as e:  # (pyarrow.lib.ArrowInvalid is a ValueError)
        raise StorageError(f"storage {uri!r} cannot be opened ({e}); give s3://BUCKET/PREFIX (endpoint and "
                           f"region from $AWS_ENDPOINT_URL and $AWS_REGION), gs://BUCKET/PREFIX, or a local "
                           f"folder") from None
