"""One extraction per cache at a time: an advisory lock file `<cache>/_locks/extract.lock`.

Two writers of one Zarr shard lose data silently, so a second `pipeline extract` on a cache that is
being extracted refuses at once, naming the holder, instead of sharing the shards. The lock is an
fcntl (flock) lock held by the process that plans and drives the run (the dask client, in a
distributed run): the kernel drops it when that process dies, even by kill -9, so a stale lock
never blocks a resume. Forked children (DataLoader decode workers) would share the lock and keep it
for seconds after a kill -9 of their parent, so they close their copy of the descriptor at once. The
file itself stays (removing a lock file races with the next taker); its JSON names the last holder
and is only read when the lock is busy.

Object stores have no locks: there the caller is told, and must not start two runs at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
from collections.abc import Iterator

from pipeline.errors import UserError
from pipeline.storage import is_local, now, open_fs

logger = logging.getLogger(__name__)  # progress lines: the CLI shows INFO on stderr

LOCKS = "_locks"
EXTRACT_LOCK = f"{LOCKS}/extract.lock"

_held: set[int] = set()  # lock descriptors this process holds


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')})"


@contextlib.contextmanager
def extract_lock(cache_url: str) -> Iterator[None]:
    """Hold the cache's extraction lock for the body; UserError at once when another process holds it."""
    fs, root = open_fs(cache_url, writable=True)
    if not is_local(fs):
        logger.info(
            f"note: {cache_url} is not a local path and cannot be locked: run one extraction on it at a time"
        )
        yield
        return
    os.makedirs(os.path.join(root, LOCKS), exist_ok=True)
    fd = os.open(os.path.join(root, EXTRACT_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{cache_url} is being extracted by {_holder(fd)}; wait for it to finish "
                "(then rerun to resume) or use another --cache-dir"
            ) from None
        _held.add(fd)
        holder = {"host": platform.node(), "pid": os.getpid(), "started": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        _held.discard(fd)
        os.close(fd)  # closing the descriptor releases the flock
