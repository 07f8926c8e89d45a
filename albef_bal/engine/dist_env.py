"""Process-group start-up from the standard launcher variables.

``deepspeed``, ``torchrun`` and ``accelerate launch`` set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; under ``srun`` the SLURM_* equivalents are mapped onto them;
a single process without any launcher gets a one-rank group on a free local port. The
same command therefore works everywhere.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Iterator, Optional

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHER_PID: Optional[int] = None
_LAUNCHER_CHECKED = False


def launcher_pid() -> Optional[int]:
    """The pid of the launcher process (torchrun, the deepspeed launcher) that started this
    rank, or None when there is none (one plain process, srun): a launcher sets LOCAL_RANK
    for each rank it starts, before any of this module's filling-in."""
    fill_env_from_launcher()
    return _LAUNCHER_PID


def fill_env_from_launcher() -> None:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT present in the environment."""
    global _LAUNCHER_PID, _LAUNCHER_CHECKED
    env = os.environ
    if not _LAUNCHER_CHECKED:
        _LAUNCHER_CHECKED = True
        _LAUNCHER_PID = os.getppid() if "LOCAL_RANK" in env else None
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun with one task per GPU: SLURM numbers the tasks; MASTER_ADDR/PORT come from the
        # batch script (see launch/slurm_pretrain.sbatch)
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if int(env["WORLD_SIZE"]) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; start the ranks with deepspeed, "
                               "torchrun, accelerate launch or srun (see launch/README.md)")
        env["MASTER_PORT"] = str(_free_port())


def _installed_ninja_dir() -> Optional[str]:
    """The folder of the ``ninja`` executable that pip installed with the ninja package (a
    DeepSpeed dependency): next to this interpreter, or wherever that package's files say."""
    bindir = os.path.dirname(sys.executable)
    if os.access(os.path.join(bindir, "ninja"), os.X_OK):
        return bindir
    try:  # e.g. an environment that reaches its dependencies through a .pth line
        from importlib.metadata import PackageNotFoundError, files
        for f in files("ninja") or ():
            if f.name == "ninja" and "bin" in f.parts and os.access(f.locate(), os.X_OK):
                return os.path.dirname(os.path.abspath(f.locate()))
    except (ImportError, PackageNotFoundError):
        pass
    return None


@contextlib.contextmanager
def _installed_ninja_first() -> Iterator[None]:
    """PATH with the installed ninja first while DeepSpeed starts. On CPU it JIT-builds a
    communication op with whichever ``ninja`` PATH finds first, and pip's ninja and a system
    one reject each other's build records ("command line changed"): every start whose PATH
    differed from the last (an activated environment or not, a launcher that prepends its
    bin/) rebuilt the op, 30-60 s of both cores."""
    bindir = _installed_ninja_dir()
    path = os.environ.get("PATH")
    if bindir is None:
        yield
        return
    os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def init_distributed() -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on CPU) and return this rank's device."""
    import deepspeed
    import torch.distributed as dist
    fill_env_from_launcher()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        with _installed_ninja_first():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if device.type == "cpu":
            _unlink_shm_buffer()
    return device


def shm_buffer_path(rank: int) -> str:
    """The shared-memory file of DeepSpeed's CPU all-reduce op for this rank (its name as
    DeepSpeed 0.19.8's ``shm.cpp`` builds it from the user id, MASTER_ADDR and MASTER_PORT)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _unlink_shm_buffer() -> None:
    """Remove this rank's file of DeepSpeed's CPU shared-memory all-reduce as soon as every
    rank has mapped every other's. DeepSpeed creates one (69 MB, RAM-backed) per rank when
    all ranks are on one machine (LOCAL_SIZE = world size, as the ``deepspeed`` launcher
    sets) and never deletes it, so each such run leaked them into /dev/shm. The mappings stay
    valid after the unlink; training never uses the op (it serves inference all-reduce)."""
    import torch.distributed as dist
    path = shm_buffer_path(dist.get_rank())
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    dist.barrier()  # every rank returned from the op's initialize: all buffers are mapped
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
