"""Keep outputs apart from inputs: an output may never be, hold, or sit inside an input.

Every command that writes (``run``, ``ingest``, each session of ``archive``,
``export``, ``report``) checks its output against its inputs before it touches
anything, with or without ``--overwrite``: replacing an output is the user's
call, destroying an input never is.

URLs are compared after normalisation: local paths are made absolute with
symbolic links resolved (``/data/link/movie.tif`` and the file it points to
are the same input); object-store URLs are reduced to their canonical
protocol (``s3a://`` is ``s3://``, ``gcs://`` is ``gs://``) and a path with
empty and ``.`` components removed and no trailing slash.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

from somaflow.errors import OutputConflictError
from somaflow.io import stores

#: protocol aliases that name the same store
_ALIASES = {"s3a": "s3", "gcs": "gs", "local": "file"}


def canonical_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of ``url`` in a form equal for equal locations (pure but for symlinks).

    Parameters
    ----------
    url : str
        A local path or an fsspec URL.

    Returns
    -------
    tuple of str
        The canonical protocol (``"file"`` for local paths) and the path:
        absolute with symlinks resolved for local paths, ``bucket/key`` with
        normalised separators for object stores.
    """
    url = str(url)
    protocol = stores.protocol_of(url)
    protocol = _ALIASES.get(protocol, protocol)
    if protocol == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return "file", os.path.realpath(os.path.expanduser(path))
    rest = url.split("://", 1)[1]
    path = posixpath.normpath("/" + rest).lstrip("/")
    return protocol, "" if path == "." else path


def _inside(inner: str, outer: str) -> bool:
    """True when path ``inner`` equals ``outer`` or lies under it."""
    if inner == outer:
        return True
    prefix = outer if outer.endswith("/") else outer + "/"
    return outer == "" or inner.startswith(prefix)


def overlap(out_url: str, input_url: str) -> str | None:
    """How ``out_url`` collides with ``input_url``, or None when they are apart.

    Returns
    -------
    str or None
        ``"is"`` (the same location), ``"contains"`` (the input lies inside the
        output), ``"inside"`` (the output lies inside the input) or None.
    """
    op, opath = canonical_url(out_url)
    ip, ipath = canonical_url(input_url)
    if op != ip:
        return None
    if opath == ipath:
        return "is"
    if _inside(ipath, opath):
        return "contains"
    if _inside(opath, ipath):
        return "inside"
    return None


def check_output_apart(out_url: str, inputs: Iterable[str | None], *, what: str = "--out",
                       fix: str = "Choose an --out outside every input.") -> None:
    """Refuse an output that is, contains, or lies inside any of ``inputs``.

    Parameters
    ----------
    out_url : str
        Where a command would write (a result, its work store, a report ...).
    inputs : iterable of str or None
        Everything the command reads (None entries are ignored).
    what : str
        How the message names the output (e.g. ``"--out"``).
    fix : str
        The message's last sentence: what to do instead.

    Raises
    ------
    OutputConflictError
        On any overlap, whatever ``--overwrite`` says (exit status 2).
    """
    for input_url in inputs:
        if not input_url:
            continue
        how = overlap(out_url, input_url)
        if how is None:
            continue
        shown = stores.normalize_url(input_url)
        where = {"is": "is the input", "contains": f"contains the input {shown}",
                 "inside": f"lies inside the input {shown}"}[how]
        raise OutputConflictError(
            f"{what} {stores.normalize_url(out_url)} {where}; writing there would destroy it. {fix}"
        )
