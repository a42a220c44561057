import os
import subprocess
import sys

import pytest

from soundscape_ssl.core.threads import THREAD_ENV_VARS, pin_threads_from_argv, threads_from_argv


def test_threads_from_argv_reads_both_spellings_and_falls_back() -> None:
    assert threads_from_argv(["--rows", "5", "--threads", "3"], default=2) == 3
    assert threads_from_argv(["--threads=4"], default=2) == 4
    assert threads_from_argv(["--rows", "5"], default=2) == 2
    assert threads_from_argv(["--threads"], default=7) == 7  # no value: argparse reports it later


def test_pin_sets_every_variable_and_refuses_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert pin_threads_from_argv(["--threads", "3"], default=1) == 3
    assert all(os.environ[name] == "3" for name in THREAD_ENV_VARS)
    with pytest.raises(ValueError, match="at least 1"):
        pin_threads_from_argv(["--threads", "0"], default=1)


def test_importing_it_loads_no_numpy() -> None:
    # it must act before numpy reads its thread variables
    code = "import sys, soundscape_ssl.core.threads; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
