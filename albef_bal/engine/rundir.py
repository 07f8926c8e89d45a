"""The run directory (``train.output_dir``): checked before any work, held by one job at a time.

:func:`check_output_dir` refuses, within a second of start-up, a path that is a file, sits
under a file, cannot be written, or is held by a live run. :class:`RunDirLock` is an
exclusive ``flock`` on ``<output_dir>/.lock``, taken by rank 0 for as long as the run lives:
a second job started on the same directory (a requeued job while orphaned ranks of the first
still run, two users' commands, a restart typed too early) is refused with the holder's host,
pid and start time instead of interleaving its checkpoints with the other's. The kernel drops
the lock when the holding process dies, however it dies, so there is never a stale lock to
remove by hand.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import time
from typing import Optional

from .. import distributed as D
from ..config import ConfigError

log = logging.getLogger("albef_bal")

LOCK_FILE = ".lock"


class RunDirError(ConfigError):
    """The output directory cannot be used (not a directory, not writable, in use)."""


def check_output_dir(path: str, key: str = "train.output_dir") -> None:
    """Create ``path`` if needed, prove it writable and not held by a live run, or raise
    :class:`RunDirError`."""
    if not path:
        raise RunDirError(f"{key} is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"{key}: {path} is a file, not a directory; choose another {key}")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise RunDirError(f"{key}: cannot write to {path} ({reason})") from None
    check_not_in_use(path, key)


def check_not_in_use(path: str, key: str = "train.output_dir") -> None:
    """Refuse at once when a live run holds ``path``'s lock: a shared, non-blocking probe
    (the ranks of one job probe at the same time without conflict; the lock itself is taken
    later, by rank 0, once every rank has passed this point)."""
    lock = os.path.join(path, LOCK_FILE)
    if not os.path.isfile(lock):
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirError(_in_use(key, path, _read_holder(fd))) from None
    except OSError:
        pass  # no flock on this filesystem: RunDirLock says so
    finally:
        os.close(fd)  # drops the probe's shared lock


def _in_use(key: str, path: str, holder: str) -> str:
    return (f"{key}: {path} is in use by another run ({holder}). Two jobs in one directory would overwrite "
            f"each other's checkpoints: wait for it to stop (it saves a checkpoint on SIGTERM) or choose another "
            f"{key}")


class RunDirLock:
    """Collective: rank 0 holds ``<output_dir>/.lock``; every rank raises the same
    :class:`RunDirError` when another live process holds it."""

    def __init__(self, output_dir: str, key: str = "train.output_dir"):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.key = key
        self._fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        error = self._try_lock() if D.is_main_process() else None
        if D.get_world_size() > 1:
            import torch.distributed as dist
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise RunDirError(error)
        return self

    def _try_lock(self) -> Optional[str]:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"{self.key}: cannot create the lock file {self.path} ({e})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return _in_use(self.key, os.path.dirname(self.path), holder)
        except OSError as e:  # a filesystem without flock (some Lustre/NFS mounts)
            log.warning("%s: cannot lock %s (%s); a second job on this directory would not be refused",
                        self.key, self.path, e)
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
