import subprocess
import sys

from albef_bal.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 2  # no subcommand: usage and a non-zero status
    out = capsys.readouterr().out
    assert "convert" in out


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "albef_bal", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "usage: albef-bal" in res.stdout


def test_config_errors_are_reported_not_raised(tmp_path, capsys):
    rc = main(["convert", "albef", str(tmp_path / "x.pth"), str(tmp_path / "o"), "--set", "model.nope=1"])
    assert rc == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err
