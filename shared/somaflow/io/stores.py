"""Every byte somaflow reads or writes goes through these fsspec helpers.

URLs may be local paths (the default), ``file://``, ``s3://``, ``gs://`` or
``memory://``. S3 options come from the environment so that one command line
works on a laptop and on a cluster:

* ``SOMAFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` — an S3-compatible endpoint;
* the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_REGION``;
* ``SOMAFLOW_S3_MAX_ATTEMPTS`` — attempts per request in botocore's ``standard``
  retry mode (default :data:`S3_MAX_ATTEMPTS`: 503 Slow Down, 5xx, throttling,
  reset or refused connections and timeouts are retried with jittered
  exponential backoff); s3fs retries a failed call (and a body cut short)
  :data:`S3FS_RETRIES` times on top for reset connections and cut bodies.
  ``SOMAFLOW_S3_CONNECT_TIMEOUT`` /
  ``SOMAFLOW_S3_READ_TIMEOUT`` (seconds) bound each attempt.

A failure that outlasts these retries is a store problem, raised as
:class:`~somaflow.errors.StoreUnavailableError` ("the store … did not answer
after N tries"), never as a broken input (:func:`is_transient`,
:func:`unavailable`).

Outputs (:func:`atomic_output`) are written in place on object stores and
committed by a marker written last (a zarr's ``complete`` attr; a single
object appears whole when its PUT completes): an object store has no rename,
and copy-then-delete would write every byte twice. On a local filesystem they
are written under a temporary name and renamed into place.
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

from somaflow.errors import InputError, ResultExistsError, StoreError, StoreUnavailableError

log = logging.getLogger(__name__)

#: default botocore attempts per S3 request (first try included), ``standard`` retry mode
S3_MAX_ATTEMPTS = 5
#: how many times s3fs repeats a call whose botocore attempts all failed (its class default)
S3FS_RETRIES = 5
#: seconds to connect / to wait for an answer, per attempt
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 30.0

#: file-listing fields that change with a file's content, by fsspec backend (strongest first)
#: (not a local file's ``created``, its ctime: a rename of the folder holding it changes that)
_IDENTITY_FIELDS = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "ino")


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
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": s3_max_attempts(), "mode": "standard"})
        config.setdefault("connect_timeout", _env_float("SOMAFLOW_S3_CONNECT_TIMEOUT", S3_CONNECT_TIMEOUT))
        config.setdefault("read_timeout", _env_float("SOMAFLOW_S3_READ_TIMEOUT", S3_READ_TIMEOUT))
        opts["config_kwargs"] = config
    return opts


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def s3_max_attempts() -> int:
    """botocore attempts per S3 request: ``SOMAFLOW_S3_MAX_ATTEMPTS`` or :data:`S3_MAX_ATTEMPTS`."""
    return max(1, int(_env_float("SOMAFLOW_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)))


#: exception type names (anywhere in the class hierarchy) of failures that a later try may not meet:
#: connections reset, refused or timed out, bodies cut short (botocore, aiohttp, urllib3, the stdlib)
_TRANSIENT_TYPES = frozenset({
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "FSTimeoutError", "HTTPClientError", "EndpointConnectionError",
    "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "IncompleteRead",
    "ResponseStreamingError", "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError",
    "ClientOSError", "ServerTimeoutError", "ProtocolError",
})
#: S3 error codes and phrases of a store that is busy or failing, not of a missing or refused object
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "Service Unavailable", "InternalError", "RequestTimeout",
                    "Throttling", "RequestLimitExceeded", "reduce your request rate", "Bad Gateway",
                    "Gateway Timeout", "Connection reset", "Server disconnected", "Connection was closed",
                    "Could not connect to the endpoint")


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a store that did not answer:
    a reset, refused or timed-out connection, a body cut short, a 5xx or a throttling answer.

    Errors that retrying cannot cure — a missing object, denied access, a malformed file — are not.
    Exceptions that crossed a process boundary (dask workers) lose their cause: their type names
    and messages are judged too.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StoreUnavailableError):
            return True
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        names = {t.__name__ for t in type(e).__mro__}
        if names & _TRANSIENT_TYPES:
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response.get("Error", {}).get("Code", ""))
            if (isinstance(status, int) and status >= 500) or any(c in code for c in _TRANSIENT_CODES):
                return True
        text = str(e)
        if any(c in text for c in _TRANSIENT_CODES):
            return True
        e = e.__cause__ or e.__context__
    return False


def store_name(url: str) -> str:
    """How a message names the store holding ``url``: the S3 endpoint and bucket, or the URL."""
    url = normalize_url(url)
    proto = protocol_of(url)
    if proto in ("s3", "s3a"):
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        endpoint = storage_options_for(url).get("endpoint_url")
        return f"s3://{bucket}" + (f" at {endpoint}" if endpoint else "")
    return url


def unavailable(url: str, exc: BaseException) -> StoreUnavailableError:
    """The error for a store that still failed after its retries (exit status 3): names the store,
    the number of tries and the last failure, on one line."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    tries = s3_max_attempts() if protocol_of(url) in ("s3", "s3a") else 1  # s3fs may add its own on top
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return StoreUnavailableError(
        f"the store {store_name(url)} did not answer after {tries} tries: {detail}. Check that it is up and "
        "reachable, then rerun (finished stages are kept)."
    )


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
        if is_transient(exc):
            raise unavailable(url, exc) from exc
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
    """Identity of a file or a directory tree from what the store knows, as ``"blake2b:<hex>"``.

    No data is read: the digest covers each file's relative name, size and the
    strongest content identity the backend lists — the ETag (S3; the MD5 of the
    content for single-part uploads), ``md5Hash``/``generation`` (GCS), or the
    modification time and inode (local disks: the quick check of ``rsync`` and
    ``make``). Rewriting a file changes its ETag or modification time, so a
    changed input still gives another checksum and invalidates results made
    from the old one; a copy of the same bytes elsewhere may give another one
    too (a recomputation, never a wrong reuse).

    Raises
    ------
    StoreError
        When ``url`` does not exist or cannot be listed
        (:class:`~somaflow.errors.StoreUnavailableError` when the store did
        not answer).
    """
    fs, path = filesystem(url, storage_options)
    try:
        fs.invalidate_cache()
        if not fs.exists(path):
            raise StoreError(f"{url!r} does not exist. Check the path or URL.")
        if fs.isdir(path):
            listing = [i for i in fs.find(path, detail=True).values() if i.get("type") != "directory"]
        else:
            listing = [fs.info(path)]
    except StoreError:
        raise
    except Exception as exc:  # drivers raise their own types (botocore, aiohttp ...)
        if is_transient(exc):
            raise unavailable(url, exc) from exc
        raise StoreError(f"cannot list {url!r}: {exc}. Check the path and permissions.") from exc
    return "blake2b:" + hashlib.blake2b(_identity_rows(listing, path).encode(), digest_size=16).hexdigest()


def _identity_rows(listing: list[dict[str, Any]], root: str) -> str:
    root = root.replace(os.sep, "/").rstrip("/")
    rows = []
    for info in listing:
        name = str(info.get("name", "")).replace(os.sep, "/")
        rel = name[len(root):].lstrip("/") if name.startswith(root) else name
        fields = [f"{f}={info[f]}" for f in _IDENTITY_FIELDS if info.get(f) not in (None, "")]
        rows.append("\t".join([rel, f"size={info.get('size')}", *fields]))
    return "\n".join(sorted(rows))


@contextlib.contextmanager
def atomic_output(
    url: str, *, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> Iterator[str]:
    """Where to write an output so that readers never take a partial one for a finished one.

    * Local filesystem: a temporary name next to ``url``
      (``.NAME.partial-XXXX``), renamed into place on success (the old output,
      if any, is moved aside first and removed after). A crash leaves the
      previous output or the complete new one; the temporary is removed on
      failure, or by the next run (``provenance.remove_partial_outputs``).
    * Object stores (S3, GCS, memory): ``url`` itself, after removing what is
      there when ``overwrite``. They have no rename, and copy-then-delete
      would write every byte twice; instead the output is committed by what is
      written last: a zarr's ``complete`` attr (``schema.write_dataset``,
      which readers require), or the single object a PUT makes appear whole.
      A failed write is removed.

    Parameters
    ----------
    url : str
        Final location.
    overwrite : bool
        Replace an existing output. Without it an existing ``url`` raises.

    Yields
    ------
    str
        The URL to write to.

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
    if protocol_of(url) != "file":
        fs.invalidate_cache()
        if fs.exists(final):
            fs.rm(final, recursive=True)
            fs.invalidate_cache()
        try:
            yield url
        except BaseException:
            _remove_settled(url, storage_options)
            raise
        fs.invalidate_cache()
        return
    token = uuid.uuid4().hex[:8]
    name = basename(url)
    tmp_url = sibling(url, f".{name}.partial-{token}")
    old_url = sibling(url, f".{name}.old-{token}")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        yield tmp_url
    except BaseException:
        _remove_settled(tmp_url, storage_options)
        raise
    had_old = os.path.exists(final)
    if had_old:
        os.replace(final, old_url)
    os.replace(tmp_url, final)
    if had_old:
        fs.rm(old_url, recursive=True)
    log.debug("moved %s into place at %s", tmp_url, url)


def _remove_settled(url: str, storage_options: dict[str, Any] | None, tries: int = 6) -> None:
    """Remove a failed output, again if tasks still in flight recreate parts of it.

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
    log.warning("could not remove the failed output %s; delete it by hand", url)


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
