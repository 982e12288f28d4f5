"""The `clipcrawl` command's parser: one command imports only its own module (the driver's memory
and start-up time), and the full parser still lists every command. No Spark."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from spark_jobs import cli

REPO = Path(__file__).resolve().parent.parent


def test_every_command_name_is_its_modules_name():
    for name, module in cli.STAGES.items():
        assert importlib.import_module(module).NAME == name


def test_a_command_imports_only_its_module():
    """Parsing `download ...` in a fresh interpreter must not import the other stages, nor pandas and
    pyarrow (which the filter and export modules' udfs import): both cost every driver memory."""
    code = ("import sys; from spark_jobs import cli; "
            "a = cli.parser_for(['download', '--output', 'x']).parse_args(['download', '--output', 'x']); "
            "print(a._module.NAME); "
            "print(sorted(m for m in sys.modules if m in ('pandas', 'pyarrow') "
            "or (m.startswith('spark_jobs.') and m.rsplit('.', 1)[1] in "
            "[v.rsplit('.', 1)[1] for v in cli.STAGE_MODULES])))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["download", "['spark_jobs.download']"]


def test_the_whole_parser_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in cli.STAGES)


def test_an_unknown_command_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["downlaod", "--output", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'downlaod'" in err and "download" in err


def test_one_commands_help_is_that_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["download", "--help"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    assert "--retry-failed" in shown and "--profile" in shown and "usage: clipcrawl download" in shown
