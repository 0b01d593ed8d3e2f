"""Every byte somaflow reads or writes goes through these fsspec helpers.

URLs may be local paths (the default), ``file://``, ``s3://``, ``gs://`` or
``memory://``. S3 options come from the environment so that one command line
works on a laptop and on a cluster:

* ``SOMAFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` — an S3-compatible endpoint;
* the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from somaflow.errors import InputError, ResultExistsError, StoreError

log = logging.getLogger(__name__)

_HASH_BLOCK = 8 << 20


def protocol_of(url: str) -> str:
    """Return the fsspec protocol of ``url`` (``"file"`` for plain paths)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def storage_options_for(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for ``url``: the caller's, completed from the environment.

    Parameters
    ----------
    url : str
        Any fsspec URL.
    storage_options : dict, optional
        Explicit options; they win over the environment.

    Returns
    -------
    dict
        Options to pass to ``fsspec.filesystem`` / ``xarray.to_zarr``.
    """
    opts = dict(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        endpoint = os.environ.get("SOMAFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get(
            "client_kwargs", {}
        ):
            opts["endpoint_url"] = endpoint
    return opts


def normalize_url(url: str) -> str:
    """Make local paths absolute and strip trailing slashes; leave remote URLs alone."""
    url = str(url)
    if protocol_of(url) == "file":
        path = url[len("file://") :] if url.startswith("file://") else url
        return os.path.abspath(os.path.expanduser(path))
    return url.rstrip("/")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(fs, path)`` for ``url``.

    Raises
    ------
    StoreError
        When the filesystem cannot be created (unknown protocol, missing driver).
    """
    url = normalize_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options))
    except (ImportError, ValueError) as exc:
        raise StoreError(
            f"cannot open store {url!r}: {exc}. Use a local path or an s3://, gs://, memory:// URL "
            "and install the matching fsspec driver."
        ) from exc
    return fs, path


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` names an existing file or directory/prefix."""
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.exists(path))
    except Exception as exc:  # drivers raise their own types (botocore, aiohttp ...)
        raise StoreError(
            f"cannot reach {url}: {type(exc).__name__}: {exc}. Check the URL, credentials and endpoint "
            "(SOMAFLOW_S3_ENDPOINT_URL for S3-compatible stores)."
        ) from exc


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete ``url`` recursively if it exists."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``."""
    url = normalize_url(url)
    if protocol_of(url) == "file":
        return os.path.join(url, *parts)
    return posixpath.join(url, *parts)


def sibling(url: str, name: str) -> str:
    """A URL next to ``url`` (same parent directory) with a different last component."""
    url = normalize_url(url)
    if protocol_of(url) == "file":
        return os.path.join(os.path.dirname(url), name)
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}"


def basename(url: str) -> str:
    """The last component of ``url``."""
    return normalize_url(url).rstrip("/").rsplit("/", 1)[-1]


def checksum(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Content checksum of a file or a directory tree, as ``"blake2b:<hex>"``.

    Files are hashed by content. A directory (a zarr store, a folder of TIFFs)
    is hashed over the sorted relative paths, sizes and contents of its files.

    Raises
    ------
    StoreError
        When ``url`` does not exist or cannot be read.
    """
    fs, path = filesystem(url, storage_options)
    try:
        if not fs.exists(path):
            raise StoreError(f"{url!r} does not exist. Check the path or URL.")
        h = hashlib.blake2b(digest_size=16)
        if fs.isdir(path):
            files = sorted(p for p in fs.find(path) if not fs.isdir(p))
            for f in files:
                rel = posixpath.relpath(f.replace(os.sep, "/"), path.replace(os.sep, "/"))
                h.update(rel.encode())
                h.update(str(fs.size(f)).encode())
                _hash_file(fs, f, h)
        else:
            _hash_file(fs, path, h)
    except OSError as exc:
        raise StoreError(f"cannot read {url!r}: {exc}") from exc
    return "blake2b:" + h.hexdigest()


def _hash_file(fs: Any, path: str, h: Any) -> None:
    with fs.open(path, "rb") as fh:
        while True:
            block = fh.read(_HASH_BLOCK)
            if not block:
                break
            h.update(block)


@contextlib.contextmanager
def atomic_output(
    url: str, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> Iterator[str]:
    """Write an output under a temporary name and move it into place on success.

    A crash leaves either the previous output untouched or the new complete
    one, never a half-written directory at ``url``. The temporary name sits next
    to ``url`` (``.NAME.partial-XXXX``) and is removed on failure.

    Parameters
    ----------
    url : str
        Final location.
    overwrite : bool
        Replace an existing output. Without it an existing ``url`` raises.

    Yields
    ------
    str
        The temporary URL to write to.

    Raises
    ------
    ResultExistsError
        ``url`` exists and ``overwrite`` is False (raised before anything is written).
    """
    url = normalize_url(url)
    fs, final = filesystem(url, storage_options)
    if fs.exists(final) and not overwrite:
        raise ResultExistsError(
            f"{url} already exists. Pass --overwrite to replace it, or choose another output."
        )
    token = uuid.uuid4().hex[:8]
    name = basename(url)
    tmp_url = sibling(url, f".{name}.partial-{token}")
    old_url = sibling(url, f".{name}.old-{token}")
    if protocol_of(url) == "file":
        os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        yield tmp_url
    except BaseException:
        _remove_settled(tmp_url, storage_options)
        raise
    _, tmp = filesystem(tmp_url, storage_options)
    _, old = filesystem(old_url, storage_options)
    fs.invalidate_cache()
    had_old = fs.exists(final)
    if had_old:
        _move(fs, final, old)
    _move(fs, tmp, final)
    if had_old:
        fs.rm(old, recursive=True)
    fs.invalidate_cache()
    log.debug("moved %s into place at %s", tmp_url, url)


def _remove_settled(url: str, storage_options: dict[str, Any] | None, tries: int = 6) -> None:
    """Remove a failed temporary output, again if tasks still in flight recreate parts of it.

    When one chunk of a parallel write fails, the scheduler stops submitting
    work but chunks already running finish and write their bytes; removing once
    could race them.
    """
    fs, path = filesystem(url, storage_options)
    for attempt in range(tries):
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
            if fs.exists(path):
                fs.rm(path, recursive=True)
        time.sleep(0.1 * (attempt + 1))
        with contextlib.suppress(Exception):
            fs.invalidate_cache()
            if not fs.exists(path):
                return
    log.warning("could not remove the temporary output %s; delete it by hand", url)


def _move(fs: Any, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``: atomic on a local filesystem, copy + delete elsewhere."""
    if "file" in fs.protocol:
        os.replace(src, dst)
        return
    fs.invalidate_cache()
    files = [f for f in fs.find(src) if not f.endswith("/")]
    for f in files:
        fs.copy(f, dst + f[len(src):])
    fs.rm(src, recursive=True)
    fs.invalidate_cache()


@contextlib.contextmanager
def local_file(url: str, storage_options: dict[str, Any] | None = None, *, what: str = "file") -> Iterator[str]:
    """A local path of the file at ``url``: the file itself, or a temporary copy of a remote one
    (for libraries that map or open local files only, e.g. ``safetensors.safe_open``).

    Raises
    ------
    StoreError
        The file does not exist or cannot be read; ``what`` names it in the message.
    InputError
        ``url`` is a directory.
    """
    fs, path = filesystem(url, storage_options)
    try:
        if fs.isdir(path):
            raise IsADirectoryError(path)
        if "file" in fs.protocol or "local" in fs.protocol:
            if not fs.exists(path):
                raise FileNotFoundError(path)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="somaflow-local-") as tmp:
            local = os.path.join(tmp, basename(url))
            fs.get(path, local)
            yield local
    except FileNotFoundError as exc:
        raise StoreError(f"{what} {url} does not exist. Check the path or URL.") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{what} {url} is a directory, not a file. Pass the file itself.") from exc
    except OSError as exc:
        raise StoreError(f"cannot read {what} {url}: {exc}. Check the path and permissions.") from exc
