"""The package as users install it: a wheel built from the source, installed into a fresh
environment outside the source tree, runs its commands with the configs it ships."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ANYWHERE = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache", "*.pyc")


def not_source(folder: str, names: list[str]) -> set[str]:
    """What a checkout holds besides its source: environments, build output, runs, data."""
    top = {".venv", ".git", "build", "dist", "runs", "data"} if os.path.samefile(folder, REPO) else set()
    return (top & set(names)) | _ANYWHERE(folder, names)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(bin dir, environment)`` of a fresh virtual environment holding only the built wheel;
    torch and the other dependencies come from this test environment's site-packages (a .pth
    line), so nothing is downloaded and the pinned torch is reused."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=not_source)  # a clean tree: no stale build/ output in the wheel
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp / "wheels"), str(src)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (tmp / "wheels").iterdir()

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # dependencies only: a path in a .pth file joins sys.path, but the .pth files inside it (the
    # editable install of this checkout) are not processed, so the checkout stays invisible
    with open(os.path.join(site, "_test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                          str(wheel)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    return venv / "bin", env, tmp / "work"


def sh(installed, *cmd, timeout=300) -> subprocess.CompletedProcess:
    bin_dir, env, work = installed
    work.mkdir(exist_ok=True)
    res = subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], cwd=work, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_wheel_ships_its_configs_and_runs_outside_the_source_tree(installed, data_corpus):
    bin_dir, env, work = installed
    where = sh(installed, "python", "-c", "import albef_bal, albef_bal.config as c; print(albef_bal.__file__); "
               "print(c.shipped_configs_dir()); print(' '.join(c.shipped_config_names()))").stdout.split("\n")
    venv = str(bin_dir.parent)
    assert where[0].startswith(venv) and where[1].startswith(venv), where  # not the checkout
    assert where[1].endswith(os.path.join("albef_bal", "configs"))
    shipped = set(where[2].split())
    on_disk = {os.path.relpath(os.path.join(d, f), os.path.join(REPO, "configs")).replace(".yaml", "")
               for d, _, files in os.walk(os.path.join(REPO, "configs")) for f in files}
    assert shipped == on_disk  # every preset of configs/ is in the wheel

    assert "--config" in sh(installed, "albef-bal", "demo", "--help").stdout

    # a tiny pretraining from a shipped config name, in a directory with no configs/ beside it
    d = data_corpus["dir"]
    run = sh(installed, "albef-bal", "pretrain", "--config", "demo/tiny", "--output-dir", "run",
             "--set", f"data.train_shards={d}/train", "--set", f"data.val_split={d}/val.json",
             "--set", f"data.test_split={d}/test.json", "--set", f"data.tokenizer={d}/vocab.txt",
             "--set", "model.image_res=32", "--set", "train.max_steps=3", "--set", "train.micro_batch_size=8",
             "--set", "data.samples_per_epoch=64", "--set", "train.save_every=0", "--set", "data.num_workers=0",
             "--set", "train.threads=1")
    assert not os.path.exists(work / "configs")
    assert os.path.isfile(work / "run" / "export" / "model.safetensors"), run.stdout[-2000:]
    assert os.path.isfile(work / "run" / "export" / "tokenizer" / "vocab.txt")
    missing = subprocess.run([str(bin_dir / "albef-bal"), "pretrain", "--config", "demo/tyni"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "did you mean demo/tiny" in missing.stderr
