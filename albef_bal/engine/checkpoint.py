"""Training checkpoints: DeepSpeed checkpoint directories, written atomically, checked before use.

Layout under ``<output_dir>/checkpoints``::

    step_00001000/          a complete checkpoint: DeepSpeed's files, each rank's RNG states
                            (rng_rank{r}.pt), trainer_state.json, and manifest.json (every
                            file with its size at save time)
    .tmp-step_00002000/     a save in progress, or one that failed or was interrupted

Saving. Every rank writes into ``.tmp-step_N``; DeepSpeed's writes go through
:class:`GuardedCheckpointEngine`, which records a failed write (disk full, permission, a
filesystem gone away) instead of raising in the middle of DeepSpeed's collectives. The ranks
then agree: if any write failed, every rank raises :class:`CheckpointSaveError` naming the
file and the cause, rank 0 removes the partial directory, and the newest complete
checkpoint stays what it was. Otherwise rank 0 checks that it sees every rank's files with
their sizes (``train.output_dir`` must be shared by all nodes), writes the manifest and
renames the directory to ``step_N``. Only the last ``keep_last`` complete checkpoints are
kept.

Loading. :meth:`CheckpointManager.resolve` (rank 0, result broadcast) verifies a checkpoint
before anything is loaded: every file of the manifest present with its recorded size, and
every other file too checked by a weights-only unpickler that allows exactly the types
DeepSpeed stores (:func:`restricted_load`), so a planted pickle cannot run code on resume.
``--resume auto`` takes the newest checkpoint that passes and names the damaged ones it
passed over (``train.resume_fallback: false`` refuses instead). DeepSpeed's own loads then go
through the same restricted unpickler.

Everything needed for an exact resume is in a checkpoint: model (momentum encoders, queues
and pointer included), optimizer, scheduler, trainer counters and data position, and each
rank's RNG states.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import zipfile
from typing import Optional

import numpy as np
import torch

from .. import distributed as D
from ..checkpoints import CheckpointError

log = logging.getLogger("albef_bal")

_COMPLETE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"

# The non-container types DeepSpeed (0.19) pickles into its checkpoint files, by ZeRO stage
# and precision: ZeRO's stage enum and its fragment bookkeeping, and the fp16 loss scalers.
# A weights-only load allows these and nothing else (no callables, no modules).
DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the partial directory has been removed."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint to resume from is incomplete, truncated or holds unsafe objects."""


# --------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and numpy's global generators too (they are saved with torch's): with
    them, a rank's RNG file is a function of the seed and the step, like everything else."""
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------ reading and writing
def _deepspeed_types() -> list:
    import importlib
    found = []
    for name in DEEPSPEED_TYPES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: a file that needs the type is refused, by name
    return found


def restricted_load(path: str, map_location="cpu", mmap: bool = False):
    """``torch.load`` with the weights-only unpickler plus :data:`DEEPSPEED_TYPES`: tensors,
    containers, numbers, strings and those types; anything else raises (nothing runs)."""
    with torch.serialization.safe_globals(_deepspeed_types()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def check_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from safely (None when it can): not a PyTorch file,
    unreadable, or holding objects beyond :func:`restricted_load`'s. Memory-maps zip-format
    files, so only their pickle is read."""
    try:
        restricted_load(path, mmap=zipfile.is_zipfile(path))
        return None
    except Exception as e:  # noqa: BLE001 - every failure is a reason to refuse the file
        text = " ".join(str(e).split())
        if "weights_only" in text.lower() or "Unsupported global" in text or "WeightsUnpickler" in text:
            found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            return (f"it holds Python objects a weights-only load refuses{what}; unpickling it could run "
                    f"code, so it is not loaded")
        return f"not readable as a PyTorch file ({type(e).__name__}: {text[:200]})"


class _WholeWrites:
    """A file for ``torch.save`` whose ``write`` writes everything or fails, and remembers
    the failure: torch's zip writer reports a failed write only as a position mismatch
    ("unexpected pos ..."), which says nothing of a full disk."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = 0
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):  # a full disk ends a write short, then fails with ENOSPC
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = self.error or e
            raise
        self.size += done
        return done

    def flush(self) -> None:
        pass


def write_torch_file(obj, path: str, zipfile_format: bool = True) -> int:
    """``torch.save`` to ``path``, synced to disk; returns the size in bytes. A failed write
    raises ``OSError`` with its errno (disk full, quota, permission)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    out = _WholeWrites(fd)
    try:
        torch.save(obj, out, _use_new_zipfile_serialization=zipfile_format)
        os.fsync(fd)
        return out.size
    except Exception as e:
        if out.error is not None and out.error is not e:
            raise out.error from e
        raise
    finally:
        os.close(fd)


def describe_write_error(path: str, e: BaseException) -> str:
    """``path: cause``, with the free space of the filesystem when the disk is full."""
    cause = f"[Errno {e.errno}] {e.strerror}" if isinstance(e, OSError) and e.strerror else \
        f"{type(e).__name__}: {e}"
    code = getattr(e, "errno", None)
    if code == errno.EDQUOT:
        cause += "; over the disk quota"
    elif code == errno.ENOSPC or "No space left" in str(e):
        try:
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
            cause += f"; the disk is full ({free / 2**20:.1f} MiB free on that filesystem)"
        except OSError:
            cause += "; the disk is full"
    return f"{path}: {cause}"


class GuardedCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine for one save or load.

    ``save``: writes through :func:`write_torch_file` and records the files written (with
    sizes) and the first failure instead of raising, so every rank leaves DeepSpeed's
    ``save_checkpoint`` through the same collectives. ``load``: :func:`restricted_load`,
    unless ``trusted``."""

    def __init__(self, inner, tmp_dir: str = "", trusted: bool = False):
        self._inner = inner
        self._tmp = tmp_dir
        self._trusted = trusted
        self.written: dict[str, int] = {}
        self.error: Optional[str] = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, state_dict, path: str):
        if self.error is not None:
            return  # the first failure decides; do not fill the disk any further
        try:
            size = write_torch_file(state_dict, path, getattr(self._inner, "zipfile_serialization", True))
            self.written[os.path.relpath(path, self._tmp)] = size
        except Exception as e:  # noqa: BLE001 - reported on every rank after the save
            self.error = describe_write_error(path, e)
            try:
                os.remove(path)
            except OSError:
                pass

    def load(self, path: str, map_location=None):
        if self._trusted:
            return self._inner.load(path, map_location=map_location)
        return restricted_load(path, map_location=map_location)


def _guard(engine, guard: GuardedCheckpointEngine):
    """Install ``guard`` as ``engine``'s checkpoint engine; returns the undo function. The
    copy of DeepSpeed's recovery script (zero_to_fp32.py) beside the checkpoints is a
    convenience: a failure there is logged, not fatal."""
    inner, copy_script = engine.checkpoint_engine, engine._copy_recovery_script

    def copy_recovery_script(save_path):
        try:
            copy_script(save_path)
        except OSError as e:
            log.warning("could not copy DeepSpeed's recovery script into %s: %s", save_path, e)

    engine.checkpoint_engine = guard
    engine._copy_recovery_script = copy_recovery_script

    def undo():
        engine.checkpoint_engine = inner
        engine._copy_recovery_script = copy_script
    return undo


def _agree(error: Optional[str]) -> Optional[str]:
    """The first error of any rank (in rank order), on every rank; None when all succeeded."""
    if D.get_world_size() == 1:
        return error
    import torch.distributed as dist
    errors: list = [None] * D.get_world_size()
    dist.all_gather_object(errors, error)
    for rank, e in enumerate(errors):
        if e is not None:
            return f"(rank {rank}) {e}"
    return None


def _broadcast(obj):
    if D.get_world_size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, output_dir: str, keep_last: int = 3):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep_last = keep_last

    # ------------------------------------------------------------- discovery
    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _COMPLETE.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.isfile(os.path.join(path, STATE_FILE)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> Optional[str]:
        done = self.complete()
        return done[-1][1] if done else None

    def remove_leftovers(self) -> list[str]:
        """Delete partial saves of earlier runs (``.tmp-*``); call only while holding the
        run directory's lock. Returns their names."""
        if not os.path.isdir(self.root):
            return []
        gone = sorted(n for n in os.listdir(self.root) if n.startswith(TMP_PREFIX))
        for name in gone:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return gone

    # ---------------------------------------------------------- verification
    def verify(self, path: str, world_size: Optional[int] = None, check_pickles: bool = True) -> Optional[str]:
        """Why the checkpoint at ``path`` must not be resumed from (``"file: reason"``), or
        None when it is intact: the trainer state readable, the manifest's files present
        with their sizes, an RNG file for every rank that saved, and (``check_pickles``)
        every other file passing :func:`check_file`."""
        state_path = os.path.join(path, STATE_FILE)
        try:
            with open(state_path, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{state_path}: unreadable ({e})"
        manifest_path = os.path.join(path, MANIFEST_FILE)
        if os.path.isfile(manifest_path):
            try:
                with open(manifest_path, encoding="utf-8") as f:
                    manifest = json.load(f)
                files, saved_world = dict(manifest["files"]), int(manifest["world_size"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                return f"{manifest_path}: unreadable ({e})"
            for name, size in sorted(files.items()):
                p = os.path.join(path, name)
                if not os.path.isfile(p):
                    return f"{p}: missing (listed in {MANIFEST_FILE})"
                actual = os.path.getsize(p)
                if actual != size:
                    return f"{p}: {actual} bytes, but {size} were written at save time (truncated or replaced)"
        else:  # written before manifests existed: at least every rank's RNG file
            saved_world = world_size or 1
            log.warning("%s has no %s (an older checkpoint): file sizes cannot be checked", path, MANIFEST_FILE)
        for r in range(saved_world):
            p = os.path.join(path, f"rng_rank{r}.pt")
            if not os.path.isfile(p):
                return f"{p}: missing (rank {r}'s RNG states)"
        for dirpath, _, names in (os.walk(path) if check_pickles else []):
            for name in sorted(names):
                p = os.path.join(dirpath, name)
                if name in (STATE_FILE, MANIFEST_FILE):
                    continue
                why = check_file(p)
                if why:
                    return f"{p}: {why}"
        return None

    def resolve(self, spec: Optional[str], fallback: bool = True, trusted: bool = False,
                world_size: Optional[int] = None) -> Optional[str]:
        """Collective (rank 0 decides, the others follow): the checkpoint to resume from.

        ``None`` -> no resume; ``"auto"`` -> the newest complete checkpoint that verifies
        (None when there is none); when newer ones are damaged they are named, and with
        ``fallback=False`` the run is refused instead. A path -> that checkpoint, which
        must verify. ``trusted`` skips the unpickler check (files the user vouches for)."""
        if spec is None:
            return None
        decision: tuple = (None, None)
        if D.is_main_process():
            try:
                decision = (self._resolve(spec, fallback, trusted, world_size), None)
            except CheckpointError as e:
                decision = (None, str(e))
        path, error = _broadcast(decision)
        if error:
            raise DamagedCheckpointError(error)
        return path

    def _resolve(self, spec: str, fallback: bool, trusted: bool, world_size: Optional[int]) -> Optional[str]:
        hint = ("If you made this checkpoint yourself and trust its files, set train.trust_checkpoint=true "
                "to load it with DeepSpeed's full unpickler.")
        if spec != "auto":
            path = spec.rstrip("/")
            if not os.path.isfile(os.path.join(path, STATE_FILE)):
                raise CheckpointError(f"train.resume: {spec} is not a complete checkpoint directory (no "
                                      f"{STATE_FILE}); complete ones are named step_N under {self.root}")
            why = self.verify(path, world_size, check_pickles=not trusted)
            if why:
                raise CheckpointError(f"train.resume: checkpoint {path} is damaged: {why}."
                                      + (f" {hint}" if "could run code" in why else ""))
            return path
        damaged = []
        for _, path in reversed(self.complete()):
            why = self.verify(path, world_size, check_pickles=not trusted)
            if why is None:
                if damaged:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return path
            damaged.append((path, why))
            if not fallback:
                older = [p for _, p in self.complete() if p != path]
                raise CheckpointError(
                    f"the newest checkpoint {path} is damaged: {why}. Not resuming (train.resume_fallback is "
                    f"false): resume from an older one with --resume PATH" + (f" (e.g. {older[-1]})" if older else "")
                    + ", or set train.resume_fallback=true to take the newest intact one."
                    + (f" {hint}" if "could run code" in why else ""))
            log.error("checkpoint %s is damaged and is skipped: %s", path, why)
        if damaged:
            listing = "; ".join(f"{why}" for _, why in damaged)
            raise CheckpointError(f"no intact checkpoint under {self.root} to resume from ({listing}). Move the "
                                  f"checkpoints directory away to start afresh." + (
                                      f" {hint}" if any("could run code" in w for _, w in damaged) else ""))
        return None

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Collective: every rank calls it. Returns the final checkpoint path; raises
        :class:`CheckpointSaveError` on every rank when any rank's write failed."""
        name = f"step_{step:08d}"
        tmp = os.path.join(self.root, TMP_PREFIX + name)
        final = os.path.join(self.root, name)
        error = None
        if D.is_main_process():
            try:
                os.makedirs(self.root, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
            except OSError as e:
                error = describe_write_error(tmp, e)
        self._fail_if(_agree(error), tmp)

        guard = GuardedCheckpointEngine(engine.checkpoint_engine, tmp)
        undo = _guard(engine, guard)
        try:
            engine.save_checkpoint(self.root, tag=TMP_PREFIX + name, client_state={"trainer": trainer_state},
                                   save_latest=False)
        finally:
            undo()
        error = guard.error
        written = dict(guard.written)
        if error is None:
            rng_name = f"rng_rank{D.get_rank()}.pt"
            try:
                written[rng_name] = write_torch_file(rng_state(), os.path.join(tmp, rng_name))
            except OSError as e:
                error = describe_write_error(os.path.join(tmp, rng_name), e)
        self._fail_if(_agree(error), tmp)

        files = self._gather_files(written)
        error = None
        if D.is_main_process():
            try:
                self._commit(tmp, final, trainer_state, files)
            except (OSError, CheckpointSaveError) as e:
                error = str(e) if isinstance(e, CheckpointSaveError) else describe_write_error(tmp, e)
        self._fail_if(_agree(error), tmp)
        if D.is_main_process():
            self._prune()
        D.barrier()
        return final

    def _fail_if(self, error: Optional[str], tmp: str) -> None:
        if error is None:
            return
        if D.is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        newest = self.latest()
        raise CheckpointSaveError(
            f"saving the checkpoint failed: {error}. The partial checkpoint {tmp} was removed; "
            + (f"the newest complete checkpoint is still {newest}." if newest else "there is no earlier checkpoint."))

    @staticmethod
    def _gather_files(written: dict) -> dict:
        if D.get_world_size() == 1:
            return dict(written)
        import torch.distributed as dist
        every: list = [None] * D.get_world_size()
        dist.all_gather_object(every, written)
        files: dict = {}
        for w in every:
            files.update(w)
        return files

    def _commit(self, tmp: str, final: str, trainer_state: dict, files: dict) -> None:
        # every rank's files must be visible here: a node-local output_dir would leave
        # the other nodes' files elsewhere (NFS may show a new file's size late: retry)
        for attempt in range(20):
            missing = [n for n, size in sorted(files.items())
                       if not os.path.isfile(os.path.join(tmp, n)) or os.path.getsize(os.path.join(tmp, n)) != size]
            if not missing:
                break
            time.sleep(0.25)
        else:
            raise CheckpointSaveError(
                f"{os.path.join(tmp, missing[0])} was written by another rank but is not visible (with its size) "
                f"from rank 0; train.output_dir must be on a filesystem that every node shares")
        state_path = os.path.join(tmp, STATE_FILE)
        with open(state_path, "w", encoding="utf-8") as f:
            json.dump(trainer_state, f, indent=1)
        files = dict(files, **{STATE_FILE: os.path.getsize(state_path)})
        with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": int(trainer_state.get("step", 0)), "world_size": D.get_world_size(),
                       "files": files}, f, indent=1)
        if os.path.exists(final):  # the same step saved again: keep the old one until the new is in place
            old = os.path.join(self.root, TMP_PREFIX + "old-" + os.path.basename(final))
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    def _prune(self) -> None:
        done = self.complete()
        for _, path in done[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        self.remove_leftovers()

    # ------------------------------------------------------------------ load
    def load(self, engine, path: str, trusted: bool = False) -> dict:
        """Collective: restore engine state and this rank's RNG; return the trainer state.
        ``path`` comes from :meth:`resolve` (verified)."""
        root, tag = os.path.split(path.rstrip("/"))
        undo = _guard(engine, GuardedCheckpointEngine(engine.checkpoint_engine, trusted=trusted))
        try:
            load_path, client = engine.load_checkpoint(root, tag=tag, load_module_strict=True,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            undo()
        if load_path is None:
            raise DamagedCheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
        rng_file = os.path.join(path, f"rng_rank{D.get_rank()}.pt")
        if not os.path.isfile(rng_file):
            raise DamagedCheckpointError(
                f"{rng_file}: missing; rank {D.get_rank()}'s RNG states cannot be restored (was the checkpoint "
                f"written by fewer ranks than {D.get_world_size()}? an exact resume needs the same number)")
        set_rng_state(restricted_load(rng_file) if not trusted else torch.load(rng_file, weights_only=False))
        return client["trainer"]
