"""Running the test worker scripts (tests/dist_worker.py, tests/balance_worker.py): one
process, or several under torchrun, and the workers' shared command-line entry point."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port nobody listens on now: each launch gets its own, so that tests running at
    the same time (pytest -n) never meet at one rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(worker: str, scenario: str, out, nproc: int, args):
    """``worker scenario out key=value...`` on ``nproc`` processes (on a free port); asserts
    it succeeded."""
    if nproc == 1:
        cmd = [sys.executable, worker, scenario, str(out), *args]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), worker, scenario, str(out), *args]
        env = dict(os.environ)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def worker_main(scenarios: dict) -> None:
    """``python WORKER SCENARIO OUT key=value...``: run the scenario function named on the
    command line, then tear the process group down (see albef_bal.distributed.shutdown)."""
    logging.basicConfig(level=logging.WARNING)
    scenario, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    kv = dict(a.split("=", 1) for a in sys.argv[3:])
    scenarios[scenario](out, kv)
    from albef_bal.distributed import shutdown
    shutdown()


def torchrun_module(args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m albef_bal ARGS`` as ``nproc`` CPU ranks under torchrun, from this checkout,
    on a free port; returns the finished process (the caller checks it)."""
    port = free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), "-m", "albef_bal", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
