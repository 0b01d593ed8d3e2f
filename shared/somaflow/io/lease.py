"""A lease on an output: one run at a time writes a result, on a local disk or an object store.

The lease is a small JSON object next to the output (``RESULT.lease`` for
``--out RESULT``) naming its owner (host, process id, a random token) and an
expiry time. A run takes it before it plans or writes anything and renews it
from a background thread while it works (every ``ttl / 4`` seconds); it
deletes it when it ends. A second run on the same output finds a live lease and
refuses at once (:class:`~somaflow.errors.ResultLockedError`, one line, exit
status 3) without touching anything, so it can never remove the first run's
in-flight outputs. A run that crashed (SIGKILL, a lost node) stops renewing:
its lease expires after ``ttl`` seconds and the next run takes it over; on the
machine it ran on (same host name and kernel boot) a lease whose process no
longer exists is taken over at once, so a killed run resumes without waiting.

Creation is exclusive: ``O_CREAT | O_EXCL`` on a local disk, a conditional
``PUT`` (``If-None-Match: *``, S3's compare-and-set, through s3fs's
``mode="create"``) on an object store. Taking over an expired lease deletes it
and creates a new one the same exclusive way, then reads it back, so of two
runs that race for it at most one proceeds.

The time to live defaults to :data:`DEFAULT_TTL` seconds;
``SOMAFLOW_LEASE_TTL`` (seconds) changes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from somaflow.errors import ResultLockedError, StoreError
from somaflow.io import stores

log = logging.getLogger(__name__)

#: seconds a lease lives without renewal (a crashed run's lease expires after this)
DEFAULT_TTL = 60.0
#: suffix of the lease object next to an output
SUFFIX = ".lease"

_held: dict[str, Lease] = {}
_held_lock = threading.Lock()


def lease_url(out_url: str) -> str:
    """Where the lease of ``out_url`` lives: ``RESULT.lease`` beside it."""
    return stores.normalize_url(out_url) + SUFFIX


def default_ttl() -> float:
    """The lease's time to live: ``SOMAFLOW_LEASE_TTL`` seconds, else :data:`DEFAULT_TTL`."""
    try:
        ttl = float(os.environ.get("SOMAFLOW_LEASE_TTL", DEFAULT_TTL))
    except ValueError:
        return DEFAULT_TTL
    return ttl if ttl > 0 else DEFAULT_TTL


def _now() -> float:
    return time.time()


def _store_error(url: str, exc: BaseException) -> StoreError:
    return StoreError(f"cannot write to {url}: {exc}. Choose an --out where you can write (check the path, "
                      "its permissions and the store's credentials).")


def _create(url: str, body: bytes) -> bool:
    """Create the object at ``url`` holding ``body`` unless it exists; False when it does."""
    fs, path = stores.filesystem(url)
    try:
        if stores.protocol_of(url) == "file":
            parent = os.path.dirname(path) or "."
            if not os.path.isdir(parent):
                try:
                    os.makedirs(parent, exist_ok=True)
                except FileExistsError as exc:  # a parent is a file
                    raise NotADirectoryError(f"{parent} is not a folder") from exc
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            return True
        if stores.protocol_of(url) in ("s3", "s3a"):
            try:
                fs.pipe_file(path, body, mode="create")
            except FileExistsError:
                return False
            fs.invalidate_cache(path)
            return True
        fs.invalidate_cache()
        if fs.exists(path):  # stores without a conditional write (memory://): best effort
            return False
        fs.pipe_file(path, body)
        return True
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileExistsError):
            return False
        raise _store_error(url, exc) from exc


def _read(url: str) -> dict[str, Any] | None:
    """The lease record at ``url``, None when there is none (an unreadable one counts as expired)."""
    fs, path = stores.filesystem(url)
    try:
        fs.invalidate_cache(path)
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _store_error(url, exc) from exc
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {"expires": 0}
    except ValueError:
        return {"expires": 0}


def _delete(url: str) -> None:
    fs, path = stores.filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
    fs.invalidate_cache()


@dataclass
class Lease:
    """A lease held by this process on one output (see the module docstring)."""

    url: str
    ttl: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    depth: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        expires = _now() + self.ttl
        return {"owner": {"host": platform.node(), "boot": _boot_id(), "pid": os.getpid(), "token": self.token},
                "expires": expires,
                "expires_at": dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat(timespec="seconds"),
                "ttl": self.ttl}

    def body(self) -> bytes:
        return json.dumps(self.record(), indent=2).encode()

    def renew(self) -> bool:
        """Push the expiry forward; False when the lease is no longer ours (taken over after expiring)."""
        current = _read(self.url)
        if current is None or current.get("owner", {}).get("token") != self.token:
            return False
        fs, path = stores.filesystem(self.url)
        fs.pipe_file(path, self.body())
        return True

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    log.warning("the lease %s was taken over by another run", self.url)
                    return
            except Exception as exc:  # a store hiccup: try again at the next beat
                log.warning("could not renew the lease %s: %s", self.url, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._keep_alive, name="somaflow-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            current = _read(self.url)
            if current is not None and current.get("owner", {}).get("token") == self.token:
                _delete(self.url)


def _boot_id() -> str | None:
    """This kernel boot's id (Linux), which tells this machine's process ids from another's."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _holder_is_dead(record: dict[str, Any]) -> bool:
    """True when the lease's owner ran on this machine (host and boot) and its process is gone."""
    owner = record.get("owner") or {}
    boot = _boot_id()
    if boot is None or owner.get("host") != platform.node() or owner.get("boot") != boot:
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, OSError):
        return False
    return False


def _holder(record: dict[str, Any]) -> str:
    owner = record.get("owner") or {}
    left = max(0.0, float(record.get("expires", 0)) - _now())
    return (f"process {owner.get('pid', '?')} on {owner.get('host', '?')} holds its lease "
            f"(it expires {left:.0f} s after that run stops)")


def acquire(out_url: str, ttl: float | None = None) -> Lease:
    """Take the lease of ``out_url`` (re-entrant within one process) and start renewing it.

    Raises
    ------
    ResultLockedError
        Another run holds a live lease on ``out_url`` (exit status 3).
    StoreError
        The lease cannot be written: the location is not writable.
    """
    url = lease_url(out_url)
    with _held_lock:
        if url in _held:
            _held[url].depth += 1
            return _held[url]
    lease = Lease(url, ttl or default_ttl())
    for _ in range(3):
        if _create(url, lease.body()):
            mine = _read(url)
            if mine is not None and mine.get("owner", {}).get("token") == lease.token:
                break
            continue
        current = _read(url)
        if current is None:
            continue  # released meanwhile: try again
        if float(current.get("expires", 0)) > _now() and not _holder_is_dead(current):
            raise ResultLockedError(
                f"{stores.normalize_url(out_url)} is being written by another run: {_holder(current)}. "
                f"Wait for that run, or choose another --out (a crashed run's lease, {url}, expires by itself).")
        log.info("taking over the lease %s of a run that ended (expired or its process gone)", url)
        _delete(url)
    else:
        raise ResultLockedError(f"could not take the lease {url}: other runs keep taking it. Retry later.")
    lease.start()
    with _held_lock:
        _held[url] = lease
    return lease


def release(lease: Lease) -> None:
    """Give back a lease taken by :func:`acquire` (the outermost release deletes it)."""
    with _held_lock:
        lease.depth -= 1
        if lease.depth > 0:
            return
        _held.pop(lease.url, None)
    lease.release()


@contextlib.contextmanager
def held(out_url: str, ttl: float | None = None) -> Iterator[Lease]:
    """The lease of ``out_url`` for the duration of the block (:func:`acquire`, then :func:`release`)."""
    lease = acquire(out_url, ttl)
    try:
        yield lease
    finally:
        release(lease)


def check_writable(prefix: str) -> None:
    """Write and delete a probe object under ``prefix`` (creating the folder on a local disk).

    Raises
    ------
    StoreError
        ``prefix`` cannot be written (a parent is a file, a read-only or
        pseudo filesystem such as ``/proc``, no permission, an unreachable store).
    """
    probe = stores.join(prefix, f".somaflow-probe-{uuid.uuid4().hex[:8]}")
    made: list[str] = []  # local folders the probe created: removed again, nothing is left behind
    if stores.protocol_of(prefix) == "file":
        folder = stores.filesystem(prefix)[1]
        while folder and not os.path.exists(folder):
            made.append(folder)
            folder = os.path.dirname(folder.rstrip("/"))
    if not _create(probe, b""):
        return
    with contextlib.suppress(Exception):
        _delete(probe)
    for folder in made:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(folder)
