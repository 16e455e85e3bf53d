"""The `nanoseek` entry point: every registered subcommand has a working --help; errors are one line."""
import subprocess
import sys

import pytest

from nanoseek.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: nanoseek {name}" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "nanoseek", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: nanoseek" in out.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nanoseek", "convert", str(tmp_path / "missing"),
                          str(tmp_path / "dst")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("nanoseek convert: error:")
    assert not (tmp_path / "dst").exists()
