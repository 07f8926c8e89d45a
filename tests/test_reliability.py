"""Resume, pre-emption and checkpoint failures, through the real CLI on real shards.

One uninterrupted two-rank run (the module's ``reference``) is the yardstick: a run that is
killed, signalled and resumed several times, through every launcher, must end with the same
export (max abs diff 0 in fp32), the same trainer state and the same skip counts. The shards
carry planted faults, so every run skips samples. Each run is a tiny model for 24 steps.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from albef_bal.engine.checkpoint import CheckpointManager, restricted_load
from workers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
STEPS = 40  # 5 epochs of 8 steps (128 pairs per epoch, 8 per rank and step, 2 ranks)
SAVE_EVERY = 4

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------- set-up
@pytest.fixture(scope="module")
def corpus(data_corpus, tmp_path_factory):
    """The shared synthetic shards (32 px) plus two shards of planted faults."""
    out = tmp_path_factory.mktemp("reliability_faults")
    write_faulty_shards(out)
    return {"shards": [data_corpus["shards"], str(out / "faulty0.tar"), str(out / "faulty1.tar")],
            "vocab": data_corpus["vocab"]}


def write_faulty_shards(train_dir) -> None:
    from PIL import Image

    from albef_bal.data.tario import ShardWriter
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (20, 180, 20)).save(buf, "JPEG")
    jpg = buf.getvalue()
    for s in range(2):
        with ShardWriter(os.path.join(train_dir, f"faulty{s}.tar")) as w:
            for i in range(24):
                kind, key = (i + s) % 6, f"fault{s}_{i:02d}"
                if kind == 0:
                    w.write(key, {"jpg": b"\xff\xd8 not a jpeg" * 4, "txt": b"a broken image"})
                elif kind == 1:
                    w.write(key, {"jpg": jpg, "txt": b" ?! "})
                elif kind == 2:
                    w.write(key, {"jpg": jpg, "txt": "caf\xe9".encode("latin-1")})
                elif kind == 3:
                    w.write(key, {"jpg": jpg})
                else:
                    w.write(key, {"jpg": jpg, "txt": b"a large green square"})


@pytest.fixture(scope="module")
def config(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability_config") / "tiny.yaml"
    path.write_text(f"""
_base_: {ROOT}/configs/demo/tiny.yaml
model:
  image_res: 32
  vision: {{patch_size: 8, width: 64, depth: 2, heads: 2}}
  text: {{width: 48, layers: 3, fusion_layer: 1, heads: 2, intermediate: 96}}
  embed_dim: 16
  queue_size: 64
data:
  train_shards: {json.dumps(corpus["shards"])}
  tokenizer: {corpus["vocab"]}
  val_split: null
  test_split: null
  samples_per_epoch: 128
  shuffle_buffer: 32
  num_workers: 1
  shard_retry_delay: 0.0
train:
  epochs: {STEPS // 8}
  deepspeed_config: {ROOT}/configs/deepspeed/zero2.json
  micro_batch_size: 8
  save_every: {SAVE_EVERY}
  keep_last: 20
  log_every: 1
  tensorboard: false
  warmup_steps: 4
  threads: 1
""")
    return str(path)


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(extra)
    return e


class Run:
    """One launch of ``albef-bal pretrain`` (by torchrun, launch/pretrain.sh, SLURM-style
    variables, or one plain process), its log in ``<out>.<n>.log``."""

    def __init__(self, kind: str, config: str, out, *sets: str, preexec_fn=None):
        self.out = str(out)
        os.makedirs(self.out, exist_ok=True)
        self.metrics_start = os.path.getsize(self.metrics) if os.path.exists(self.metrics) else 0
        n = len([f for f in os.listdir(os.path.dirname(self.out)) if f.startswith(os.path.basename(self.out) + ".")])
        self.log = f"{self.out}.{n}.log"
        args = ["-c", config, "--set", f"train.output_dir={self.out}", "--resume", "auto"]
        for s in sets:
            args += ["--set", s]
        port = str(free_port())
        logf = open(self.log, "w")
        common = dict(cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)
        if kind == "torchrun":
            self.procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                            "--master_port", port, "-m", "albef_bal", "pretrain", *args],
                                           env=env(), **common)]
        elif kind == "script":  # launch/pretrain.sh: the deepspeed launcher, two ranks on this node
            self.procs = [subprocess.Popen(["bash", "launch/pretrain.sh", config, *args[2:]],
                                           env=env(NUM_GPUS="2", MASTER_PORT=port), **common)]
        elif kind == "slurm":  # what `srun` starts: one process per rank, no launcher between
            self.procs = [subprocess.Popen([sys.executable, "-m", "albef_bal", "pretrain", *args],
                                           env=env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port), **common)
                          for r in (0, 1)]
        elif kind == "two_nodes":  # two torchrun "nodes" of one rank each, one rendezvous
            self.procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                            "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
                                            "127.0.0.1", "--master_port", port, "-m", "albef_bal", "pretrain",
                                            *args], env=env(), **common)
                          for node in (0, 1)]
        elif kind == "sbatch":  # launch/slurm_pretrain.sbatch (MODE=srun) with stand-ins for srun & co
            fake = os.path.join(os.path.dirname(self.out), "fake_slurm")
            os.makedirs(fake, exist_ok=True)
            self.fake_slurm = fake
            self.procs = [subprocess.Popen(
                ["bash", os.path.join(ROOT, "launch", "slurm_pretrain.sbatch"), config, *args[2:]],
                env=env(PATH=os.path.join(HERE, "fake_slurm") + os.pathsep + BIN + os.pathsep + os.environ["PATH"],
                        FAKE_SLURM_DIR=fake, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
                        SLURM_GPUS_PER_NODE="2", MASTER_PORT=port, OMP_NUM_THREADS="1"),
                **dict(common, cwd=fake))]
        elif kind == "single":
            self.procs = [subprocess.Popen([sys.executable, "-m", "albef_bal", "pretrain", *args], env=env(),
                                           **common)]
        else:
            raise ValueError(kind)

    @property
    def metrics(self) -> str:
        return os.path.join(self.out, "metrics.jsonl")

    def steps(self) -> list[int]:
        """Steps logged by this launch."""
        if not os.path.exists(self.metrics):
            return []
        with open(self.metrics) as f:
            f.seek(self.metrics_start)
            return [json.loads(line)["step"] for line in f.read().splitlines() if line.strip()]

    def wait_for_step(self, step: int, timeout: float = 300) -> int:
        end = time.time() + timeout
        while time.time() < end:
            done = self.steps()
            if done and done[-1] >= step:
                return done[-1]
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"the run ended before step {step}:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no step {step} within {timeout} s:\n{self.output()[-3000:]}")

    def wait(self, timeout: float = 300) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-3000:]}")

    def processes(self) -> list[psutil.Process]:
        """Every live process of this launch: launchers, ranks, data workers."""
        out = []
        for p in self.procs:
            try:
                top = psutil.Process(p.pid)
                out += [top] + top.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return out

    def ranks(self) -> list[psutil.Process]:
        return [p for p in self.processes() if _is_rank(p)]

    def kill(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def _rank_of(p: psutil.Process):
    """The rank a launcher (LOCAL_RANK) or srun (SLURM_PROCID) gave the process, or None."""
    try:
        e = p.environ()
        return e.get("LOCAL_RANK", e.get("SLURM_PROCID"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _is_rank(p: psutil.Process) -> bool:
    """A training process: it has a rank and its parent has none (data workers are forks of
    their rank and share its environment)."""
    try:
        return _rank_of(p) is not None and _rank_of(p.parent()) is None
    except (psutil.NoSuchProcess, AttributeError):
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> bool:
    """Whether all ``procs`` ended (zombies count: orphans are reaped by init, not by us)."""
    end = time.time() + timeout
    while time.time() < end:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def newest_state(out) -> dict:
    mgr = CheckpointManager(str(out))
    with open(os.path.join(mgr.latest(), "trainer_state.json")) as f:
        return json.load(f)


def export_diff(a, b) -> float:
    from safetensors.torch import load_file
    x = load_file(os.path.join(a, "export", "model.safetensors"))
    y = load_file(os.path.join(b, "export", "model.safetensors"))
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The uninterrupted run: two ranks under torchrun."""
    out = tmp_path_factory.mktemp("reliability_reference") / "run"
    run = Run("torchrun", config, out)
    assert run.wait() == [0], run.output()[-3000:]
    state = newest_state(out)
    assert state["step"] == STEPS and sum(state["data_skipped"].values()) > 0  # the faults were met
    return str(out)


# ------------------------------------------------------------------ resume is exact
def test_interrupted_every_way_and_resumed_equals_uninterrupted(config, reference, tmp_path):
    """One run, stopped six ways and resumed each time, ends exactly where the uninterrupted
    run ends (export, trainer state, skip counts, last metrics row):

    1. kill -9 of a rank under torchrun (a second job started meanwhile is refused);
    2. kill -9 of torchrun: its orphaned ranks save and stop;
    3. SIGTERM to the process group of launch/pretrain.sh: exit 0;
    4. SIGUSR1 to launch/slurm_pretrain.sbatch (MODE=srun, with stand-ins for srun, scancel
       and scontrol): every process of the step, data workers included, gets it; exit 0
       and a requeue;
    5. SIGTERM to torchrun's process group: the ranks save and exit in time;
    6. the three newest checkpoints damaged (a pickle that runs code, a truncated file, a
       deleted RNG file): named and passed over; a plain resume runs to the end."""
    out = tmp_path / "run"
    marker = tmp_path / "payload_ran"

    # 1. a second job on the same directory is refused at once; then kill -9 of rank 1
    run = Run("torchrun", config, out)
    run.wait_for_step(1)
    second = Run("single", config, out)
    assert second.wait(timeout=60) == [2]
    assert f"albef-bal pretrain: error: train.output_dir: {out} is in use by another run (pid " in second.output()
    assert "Traceback" not in second.output()
    run.wait_for_step(6)
    ranks = run.ranks()
    assert len(ranks) == 2, [p.cmdline() for p in run.processes()]
    max(ranks, key=lambda p: p.environ()["RANK"]).kill()
    assert run.wait() != [0]

    # 2. kill -9 of the launcher: the ranks notice, save and stop instead of running on
    run = Run("torchrun", config, out)
    start = run.wait_for_step(1)
    ranks = run.ranks()
    assert len(ranks) == 2
    run.wait_for_step(start + 1)
    run.procs[0].kill()
    assert wait_gone(ranks, timeout=120), "orphaned ranks kept running"
    log = run.output()
    assert "its launcher (pid" in log and "exited; saving a checkpoint" in log
    stopped = newest_state(out)["step"]
    assert stopped == run.steps()[-1] < STEPS

    # 3. SIGTERM to the process group of launch/pretrain.sh (as a scheduler sends it)
    run = Run("script", config, out)
    run.wait_for_step(stopped + 2)
    os.killpg(run.procs[0].pid, signal.SIGTERM)
    assert run.wait() == [0], run.output()[-3000:]
    stopped = newest_state(out)["step"]
    assert stopped == run.steps()[-1] < STEPS
    assert "passing it to the ranks" in run.output() and "killed by signal" not in run.output()

    # 4. SIGUSR1 to the Slurm batch script near the time limit
    run = Run("sbatch", config, out)
    run.wait_for_step(stopped + 2)
    assert len(run.processes()) >= 6  # script, srun, two ranks and their data workers
    os.kill(run.procs[0].pid, signal.SIGUSR1)
    assert run.wait() == [0], run.output()[-3000:]
    assert "killed by signal" not in run.output()
    assert open(os.path.join(run.fake_slurm, "requeued")).read().strip() == "4242"
    stopped = newest_state(out)["step"]
    assert stopped == run.steps()[-1] < STEPS

    # 5. SIGTERM to torchrun's process group: torchrun passes it on; the ranks save and exit
    run = Run("torchrun", config, out)
    run.wait_for_step(stopped + 2)
    os.killpg(run.procs[0].pid, signal.SIGTERM)
    run.wait()  # torchrun's own status reports the signal
    log = run.output()
    stopped = newest_state(out)["step"]
    assert stopped == run.steps()[-1] < STEPS
    assert f"stopped at step {stopped} (received SIGTERM)" in log
    assert "killed by signal" not in log and "forcefully exiting" not in log  # no rank or worker killed

    # 6. damage the three newest checkpoints, then resume to the end
    mgr = CheckpointManager(str(out))
    done = [p for _, p in mgr.complete()]
    assert len(done) >= 4, done
    payload_file = os.path.join(done[-1], "mp_rank_00_model_states.pt")
    write_payload(payload_file, marker)
    truncated = os.path.join(done[-2], "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    removed = os.path.join(done[-3], "rng_rank1.pt")
    os.remove(removed)
    run = Run("torchrun", config, out)
    assert run.wait() == [0], run.output()[-3000:]
    log = run.output()
    assert not marker.exists()  # the pickled code never ran
    assert f"{payload_file}: it holds Python objects a weights-only load refuses (exec)" in log
    assert f"{truncated}: " in log and "were written at save time" in log
    assert f"{removed}: missing" in log
    assert f"resuming from {done[-4]}" in log

    assert export_diff(reference, out) == 0.0
    assert newest_state(out) == newest_state(reference)  # step, position, samples, skips per reason

    def last_row(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            row = [json.loads(line) for line in f][-1]
        return {k: v for k, v in row.items() if k in ("step", "samples") or k.startswith(("loss", "data_skipped"))}
    assert last_row(out) == last_row(reference)


class Payload:
    """Unpickling it writes ``marker``: what a planted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def write_payload(path: str, marker) -> None:
    """Replace ``path`` by a torch pickle that runs code, padded to the size of the file it
    replaces (so that only the unpickler check can tell)."""
    buf = io.BytesIO()
    torch.save({"module": {}, "payload": Payload(marker)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    size = os.path.getsize(path) if os.path.exists(path) else len(data)
    assert len(data) <= size
    with open(path, "wb") as f:
        f.write(data + bytes(size - len(data)))


def test_two_node_simulation_equals_one_node(config, reference, tmp_path):
    """Two torchrun "nodes" of one rank each (LOCAL_RANK 0 on both) give the same shards per
    rank, the same checkpoint files and the same export as two ranks on one node."""
    out = tmp_path / "run"
    run = Run("two_nodes", config, out)
    assert run.wait() == [0, 0], run.output()[-3000:]
    assert export_diff(reference, out) == 0.0  # hence the same data on each rank
    ref, got = CheckpointManager(reference).latest(), CheckpointManager(str(out)).latest()
    assert sorted(os.listdir(ref)) == sorted(os.listdir(got))
    assert {"rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(got))
    for name in ("trainer_state.json", "manifest.json"):
        assert json.load(open(os.path.join(ref, name))) == json.load(open(os.path.join(got, name)))
    for name in ("rng_rank0.pt", "rng_rank1.pt"):
        a, b = restricted_load(os.path.join(ref, name)), restricted_load(os.path.join(got, name))
        assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]
        assert torch.equal(a["numpy"]["keys"], b["numpy"]["keys"])


def test_every_kind_of_damage_is_named(reference, tmp_path):
    """Each file of a real checkpoint, missing, truncated, grown, or replaced by a pickle that
    runs code, makes ``verify`` name that file; ``resolve`` passes over damaged checkpoints,
    refuses when told not to fall back, and refuses when nothing intact is left."""
    from albef_bal.checkpoints import CheckpointError
    from albef_bal.engine.checkpoint import DamagedCheckpointError
    src = os.path.join(reference, "checkpoints", "step_00000024")
    marker = tmp_path / "payload_ran"

    def fresh():
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        shutil.copytree(src, tmp_path / "c")
        return str(tmp_path / "c")
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.verify(fresh()) is None
    for name in sorted(os.listdir(src)):
        if name == "manifest.json":
            continue
        path = os.path.join(fresh(), name)
        os.remove(path)
        assert mgr.verify(os.path.dirname(path)).startswith(f"{path}: ")
        path = os.path.join(fresh(), name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1)
        assert mgr.verify(os.path.dirname(path)).startswith(f"{path}: ")
        if name.endswith(".pt"):
            path = os.path.join(fresh(), name)
            write_payload(path, marker)
            assert mgr.verify(os.path.dirname(path)) == (
                f"{path}: it holds Python objects a weights-only load refuses (exec); unpickling it "
                f"could run code, so it is not loaded")
    assert not marker.exists()
    live = tmp_path / "live.pt"
    write_payload(str(live), marker)
    torch.load(str(live), weights_only=False)  # the payload works: a plain load runs it
    assert marker.exists()
    marker.unlink()
    planted = os.path.join(fresh(), "extra.pt")
    write_payload(planted, marker)  # in no manifest, still checked
    assert mgr.verify(os.path.dirname(planted)).startswith(f"{planted}: it holds Python objects")
    assert not marker.exists()

    # resolve: fall back past damaged ones, or refuse
    run = tmp_path / "run"
    for step in (16, 20, 24):
        shutil.copytree(os.path.join(reference, "checkpoints", f"step_{step:08d}"),
                        run / "checkpoints" / f"step_{step:08d}")
    write_payload(str(run / "checkpoints" / "step_00000024" / "rng_rank0.pt"), marker)
    mgr = CheckpointManager(str(run))
    assert mgr.resolve("auto") == str(run / "checkpoints" / "step_00000020")
    with pytest.raises(DamagedCheckpointError, match=r"newest checkpoint .*step_00000024 is damaged: .*rng_rank0.pt: "
                                                     r"it holds.*train.resume_fallback is false.*step_00000020"):
        mgr.resolve("auto", fallback=False)
    with pytest.raises(DamagedCheckpointError, match="train.trust_checkpoint=true"):
        mgr.resolve(str(run / "checkpoints" / "step_00000024"))
    os.remove(run / "checkpoints" / "step_00000020" / "rng_rank1.pt")
    os.remove(run / "checkpoints" / "step_00000016" / "manifest.json")  # as written by older versions
    with open(run / "checkpoints" / "step_00000016" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        CheckpointManager(str(run)).resolve("auto", world_size=2)
    assert not marker.exists()


# -------------------------------------------------------------- failed saves
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(config, reference, tmp_path):
    """Disk full (a small tmpfs where this machine allows mounting one; otherwise a file-size
    limit, an equally real write error): the save names the file and the cause, removes its
    partial directory, and the previous checkpoint stays intact and loadable."""
    out = tmp_path / "run"
    out.mkdir()
    previous = os.path.join(reference, "checkpoints", "step_00000008")
    size = sum(os.path.getsize(os.path.join(previous, f)) for f in os.listdir(previous))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + size // 3}", "tmpfs", str(out)],
                             capture_output=True).returncode == 0
    try:
        shutil.copytree(previous, out / "checkpoints" / "step_00000008")
        limit = None if mounted else 256 * 1024

        def file_size_limit():
            if limit:
                import resource
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        run = Run("torchrun", config, out, preexec_fn=file_size_limit)
        assert run.wait() != [0]
        log = run.output()
        cause = "No space left on device" if mounted else "File too large"
        assert "albef-bal pretrain: error: saving the checkpoint failed: " in log
        assert f"{out}/checkpoints/.tmp-step_00000012/" in log and cause in log, log[-3000:]
        assert f"the newest complete checkpoint is still {out}/checkpoints/step_00000008" in log
        left = os.listdir(out / "checkpoints")
        assert [n for n in left if n.startswith("step_") or n.startswith(".tmp")] == ["step_00000008"], left
        mgr = CheckpointManager(str(out))
        assert mgr.verify(mgr.latest()) is None
        for name in os.listdir(mgr.latest()):
            if name.endswith(".pt"):
                restricted_load(os.path.join(mgr.latest(), name))
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)


# ------------------------------------------------------------------- fast failures
@pytest.mark.parametrize("case", ["no_shards", "output_is_a_file", "output_under_a_file", "no_resume_dir"])
def test_user_errors_fail_before_the_training_stack_loads_naming_the_key(config, tmp_path, case):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    sets, expected = {
        "no_shards": (["data.train_shards=/nonexistent/shards/{00000..00063}.tar"],
                      "albef-bal pretrain: error: data.train_shards: '/nonexistent/shards/{00000..00063}.tar' "
                      "matches no file"),
        "output_is_a_file": ([], f"albef-bal pretrain: error: train.output_dir: {a_file} is a file"),
        "output_under_a_file": ([], f"albef-bal pretrain: error: train.output_dir: cannot write to {a_file}/run"),
        "no_resume_dir": ([f"train.resume={tmp_path}/nowhere"],
                          f"albef-bal pretrain: error: train.resume: {tmp_path}/nowhere is not a directory"),
    }[case]
    out = {"output_is_a_file": a_file, "output_under_a_file": a_file / "run"}.get(case, tmp_path / "run")
    # the CLI's own main(), run in a child that reports afterwards which heavy modules it had
    # imported: "before compute" is checked as "before the training stack was imported", which
    # does not depend on how loaded the machine is (a wall-clock bound did)
    probe = ("import sys\nfrom albef_bal.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
             "except SystemExit as e:\n    rc = e.code\n"
             "print('IMPORTED', sorted(m for m in ('deepspeed', 'albef_bal.engine.pretrain', "
             "'albef_bal.engine.trainer') if m in sys.modules), file=sys.stderr)\nsys.exit(rc)\n")
    cmd = [sys.executable, "-c", probe, "pretrain", "-c", config, "--set", f"train.output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 2 and expected in res.stderr, res.stderr[-2000:]
    assert "IMPORTED []" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
