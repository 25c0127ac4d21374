"""S4 locks: one daemon per run directory, one daemon per VM, the holder named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aerate.host.daemon import DaemonError, pid_lock, take_lock

pytestmark = pytest.mark.unit

HOLD = ("import sys, time\nfrom aerate.host.daemon import pid_lock\n"
        "fd, _ = pid_lock(sys.argv[1])\n"
        "print('held' if fd is not None else 'busy', flush=True)\ntime.sleep(30)\n")


def test_second_holder_is_told_who_has_it(tmp_path: Path) -> None:
    path = str(tmp_path / "vms" / "web01.lock")
    other = subprocess.Popen([sys.executable, "-c", HOLD, path], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        fd, holder = pid_lock(path)
        assert fd is None and holder == str(other.pid)
    finally:
        other.kill()
        other.wait()
    fd, holder = pid_lock(path)   # released with its holder's death
    assert fd is not None and holder == ""
    assert Path(path).read_text().strip() == str(os.getpid())
    os.close(fd)


def test_daemon_lock_error_names_the_pid_and_the_fix(tmp_path: Path) -> None:
    fd = take_lock(str(tmp_path))
    try:
        child = subprocess.run(
            [sys.executable, "-c", "import sys\nfrom aerate.host.daemon import take_lock\n"
             "take_lock(sys.argv[1])", str(tmp_path)], capture_output=True, text=True)
        assert child.returncode != 0
        assert f"another aerated (pid {os.getpid()})" in child.stderr
        with pytest.raises(DaemonError):
            # flock is per open file: a second open in this process conflicts as well.
            take_lock(str(tmp_path))
    finally:
        os.close(fd)
