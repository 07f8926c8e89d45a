"""`albef-bal pretrain` on real (synthetic) shards, started the ways users start it:
the deepspeed launcher (--num_gpus 2 on CPU, and the hostfile path of launch/pretrain.sh),
SLURM-style variables, and a plain single process. Two CPU ranks each."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from workers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "make_synthetic.py"), str(out), "--train", "512",
                    "--val", "16", "--test", "16", "--shard-size", "64"], check=True, capture_output=True)
    return out


def overrides(corpus, out):
    sets = [f"data.train_shards={corpus}/train", f"data.tokenizer={corpus}/vocab.txt", "data.val_split=null",
            "data.test_split=null", "data.samples_per_epoch=256", "train.epochs=1", "data.num_workers=0",
            "train.log_every=1", "train.save_every=4", "train.tensorboard=false", f"train.output_dir={out}"]
    return [x for s in sets for x in ("--set", s)]


def env():
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    return e


def check_run(out, world):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["step"] == 256 // (16 * world)  # micro batch 16 per rank
    assert rows[-1]["samples"] == 256
    assert os.path.isfile(os.path.join(out, "export", "model.safetensors"))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert f"step_{256 // (16 * world):08d}" in ckpts


def run(cmd, e=None):
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=e or env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(corpus, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
         "--module", "albef_bal", "pretrain", "-c", "configs/demo/tiny.yaml", *overrides(corpus, out)])
    check_run(out, 2)
    # the deepspeed launcher sets LOCAL_SIZE, so DeepSpeed's CPU op made one shared-memory
    # file per rank; the engine removes them once mapped (they used to stay in /dev/shm)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


@pytest.mark.slow
def test_launch_script_with_hostfile(corpus, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    e = env()
    e.update(HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
             LAUNCH_ARGS="--no_ssh_check")
    res = run(["bash", "launch/pretrain.sh", "configs/demo/tiny.yaml", *overrides(corpus, out)], e)
    assert "--hostfile" in res.stdout + res.stderr or "localhost" in res.stdout + res.stderr
    check_run(out, 2)
    # the script always passes --resume auto: a second start finds the run complete and
    # continues from its last checkpoint instead of starting over
    shutil.rmtree(out / "export")
    run(["bash", "launch/pretrain.sh", "configs/demo/tiny.yaml", *overrides(corpus, out)], e)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))  # nothing re-trained
    assert (out / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_slurm_variables_give_two_ranks(corpus, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        e = env()
        e.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "albef_bal", "pretrain", "-c", "configs/demo/tiny.yaml",
                                       *overrides(corpus, out)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:]
    check_run(out, 2)


@pytest.mark.slow
def test_single_process_without_launcher_and_bad_config(corpus, tmp_path):
    out = tmp_path / "run"
    run([sys.executable, "-m", "albef_bal", "pretrain", "-c", "configs/demo/tiny.yaml", *overrides(corpus, out),
         "--set", "data.samples_per_epoch=64"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["step"] == 4
    # a batch that does not divide the queue is refused before any work, naming the keys
    res = subprocess.run([sys.executable, "-m", "albef_bal", "pretrain", "-c", "configs/demo/tiny.yaml",
                          *overrides(corpus, tmp_path / "bad"), "--set", "train.micro_batch_size=24"],
                         cwd=ROOT, capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 2
    assert "must be a multiple of the global micro batch (train.micro_batch_size 24" in res.stderr
    assert "model.queue_size (" in res.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
