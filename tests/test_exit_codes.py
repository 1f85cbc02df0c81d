"""Every error that is the user's to fix is a UsageError: each command prints it as one line, labelled
with its kind, and exits 2 (sdd_train.exit_codes); ConfigError stays the kind for configs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import TINY
from sdd_train.config import ConfigError
from sdd_train.data.sources import DataError
from sdd_train.exit_codes import EXIT_CONFIG, CheckpointUnusable, UsageError, error_line, report_usage_error
from sdd_train.kernels import BackendUnavailable
from sdd_train.train.__main__ import main


@pytest.mark.parametrize("kind,label", [(UsageError, "usage error"), (ConfigError, "config error"),
                                        (DataError, "data error"), (CheckpointUnusable, "checkpoint error"),
                                        (BackendUnavailable, "backend error")])
def test_every_kind_is_a_usage_error_with_its_label(kind, label, capsys):
    assert issubclass(kind, UsageError) and issubclass(kind, ValueError)
    assert report_usage_error(kind("x: what to change\n  and why")) == EXIT_CONFIG
    assert capsys.readouterr().err == f"{label}: x: what to change and why\n"  # one line, whatever the message


def test_other_exceptions_get_a_plain_label():
    assert error_line(FileNotFoundError("nope")) == "error: nope"
    assert issubclass(BackendUnavailable, RuntimeError)  # where it is raised mid-forward, as before


def test_a_data_error_of_sdd_train_is_exit_2_with_one_line(tmp_path, capsys):
    """A missing dataset is not a config error: its own kind, one line, exit 2, nothing written."""
    run = tmp_path / "run"
    code = main([TINY, f"run_dir={run}", "train.device=cpu", "data.source=prepared",
                 f"data.datasets=[{{path: {tmp_path / 'nope'}}}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("data error: ") and "nope" in err and len(err.splitlines()) == 1, err
    assert not run.exists()


def test_a_backend_error_of_sdd_train_is_exit_2_with_one_line(tmp_path, capsys):
    code = main([TINY, f"run_dir={tmp_path / 'run'}", "train.device=cpu", "model.attention_backend=flash"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("backend error: model.attention_backend: 'flash' needs"), err
    assert len(err.splitlines()) == 1


def test_a_checkpoint_error_of_sdd_ckpt_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The installed entry point, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "sdd_train.checkpoint", "list", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint error: {tmp_path}: no checkpoints"), proc.stderr
