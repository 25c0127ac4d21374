"""The end-to-end scenario shared by the demo, the vm tests and the benchmark.

A real ``aerated`` process (its own run directory, so it never meets an operator's daemon
on this host), a guest from deploy/vm.py, a workload in the guest that allocates, touches
and frees memory, and the host backing of that guest's RAM read from the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aerate.agent import procfs
from aerate.deploy.image import check_free_space
from aerate.deploy.vm import Guest, HarnessError
from aerate.host.ctl import CtlError, request
from aerate.host.libvirt_conn import PID_DIR

MiB = 1 << 20
#: Below this much RAM, QEMU's q35 and pc machines put all of it below 4 GiB, from address
#: 0, at the same offset in its backing (hw/i386/pc_q35.c, pc_piix.c: lowmem 0xb0000000 or
#: more): guest-physical address == offset in the memfd, with no map to trust.
FLAT_RAM_LIMIT = 0xB0000000
_SEEK_DATA, _SEEK_HOLE = 3, 4


class ScenarioError(HarnessError):
    """The scenario could not run; the message says which step and why."""


@dataclass
class DaemonView:
    """What an operator sees of a running aerated: its control socket and its log."""

    run_dir: Path
    log: Path

    def status(self) -> dict[str, Any]:
        """``aeratectl status --json`` of this daemon."""
        answer: dict[str, Any] = request({"cmd": "status"}, str(self.run_dir))
        return answer

    def vm(self, name: str) -> dict[str, Any]:
        """One VM's status, or {} if the daemon does not list it (yet)."""
        with contextlib.suppress(CtlError, ValueError):
            for vm in self.status().get("vms", []):
                if vm.get("vm") == name:
                    return dict(vm)
        return {}

    def guest(self, name: str, part: str) -> dict[str, Any]:
        """One part of the VM's last statistics from its agent ("engine", "free_first"), or
        {} before the first."""
        return dict((self.vm(name).get("guest") or {}).get(part) or {})

    def pass_over(self, name: str) -> bool:
        """The session runs, the agent reported at least one batch and its pass is over."""
        vm = self.vm(name)
        phase = ((vm.get("guest") or {}).get("engine") or {}).get("phase")
        return vm.get("state") == "running" and phase == "idle" and vm.get("batches", 0) > 0

    def set(self, name: str, **values: Any) -> dict[str, Any]:
        """``aeratectl set NAME key=value...``."""
        answer: dict[str, Any] = request({"cmd": "set", "vm": name, "settings": values},
                                         str(self.run_dir))
        if not answer.get("ok"):
            raise ScenarioError(f"aeratectl set {name}: {answer.get('error')}")
        return answer

    def log_text(self) -> str:
        """What the daemon logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Aerated(DaemonView):
    """A running aerated process and where it keeps its socket and log."""

    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def aerated(run_dir: Path, config_text: str = "", extra: tuple[str, ...] = ()
            ) -> Iterator[Aerated]:
    """Run aerated from this checkout until the block ends (then SIGTERM, then SIGKILL)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "aerated.toml"
    config.write_text(config_text)
    log = run_dir / "aerated.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aerate.host.daemon", "--run-dir", str(run_dir),
             "--config", str(config), "--metrics", "off", "--log-level", "debug", *extra],
            stdout=out, stderr=subprocess.STDOUT)
    d = Aerated(run_dir, log, proc)
    try:
        wait_for(lambda: (run_dir / "aerated.sock").exists() or proc.poll() is not None,
                 30, "aerated control socket")
        if proc.poll() is not None:
            raise ScenarioError(f"aerated exited {proc.returncode}:\n{d.log_text()[-3000:]}")
        yield d
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)   # a test may have left it stopped
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def backing_read_after(daemon: Aerated, name: str, since: float, timeout: float = 30) -> int:
    """The VM's host backing figure (status ``backing_allocated_bytes``) from a read the
    daemon made after ``since`` (time.monotonic()): it re-reads the figure every few
    seconds, and a peak taken from an older, lower read is one a fall can never undercut."""
    def fresh() -> int:
        v = daemon.vm(name)
        age = v.get("backing_allocated_age_s")
        return int(v["backing_allocated_bytes"]) if age is not None \
            and time.monotonic() - age > since else 0

    return int(wait_for(fresh, timeout, f"a backing figure of {name} read after the touch"))


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``pred`` until it is truthy; ScenarioError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ScenarioError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def qemu_pid(name: str) -> int:
    """The pid of the QEMU process of running domain ``name`` (libvirt's pid file)."""
    return int(Path(PID_DIR, f"{name}.pid").read_text().strip())


def ram_memfd(guest: Guest) -> str:
    """The /proc path of the guest's RAM memfd in its QEMU process (the one memfd of the
    guest's RAM size), found from QEMU's fds, independently of aerated."""
    pid = qemu_pid(guest.name)
    size = guest.spec.memory_mib * MiB
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        with contextlib.suppress(OSError):
            if os.readlink(path).startswith("/memfd:") and os.stat(path).st_size == size:
                found.append(path)
    if len(found) != 1:
        raise ScenarioError(f"{guest.name}: expected one {size >> 20} MiB memfd in QEMU "
                            f"{pid}, found {len(found)}")
    return found[0]


def ram_allocated(guest: Guest) -> int:
    """Bytes the host kernel has allocated to the guest's RAM memfd (st_blocks)."""
    return os.stat(ram_memfd(guest)).st_blocks * 512


def data_extents(guest: Guest, gpa: int, length: int) -> list[tuple[int, int]]:
    """The pieces of guest-physical [gpa, gpa+length) the host holds in the RAM memfd, as
    [start, end) guest addresses: the data extents lseek(SEEK_DATA/SEEK_HOLE) finds. A
    discard (punch) shows as a hole; a page the guest wrote and nobody punched stays data.
    Only for guests with less than FLAT_RAM_LIMIT of RAM, where the address is the offset
    (read independently of the map aerated builds, which is under test)."""
    size = guest.spec.memory_mib * MiB
    if size > FLAT_RAM_LIMIT or gpa < 0 or gpa + length > size:
        raise ScenarioError(f"{guest.name}: gpa {gpa:#x}+{length:#x} is not flat guest RAM "
                            f"at its own offset ({size >> 20} MiB guest)")
    fd = os.open(ram_memfd(guest), os.O_RDONLY)
    try:
        out: list[tuple[int, int]] = []
        pos, end = gpa, gpa + length
        while pos < end:
            try:
                data = os.lseek(fd, pos, _SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = os.lseek(fd, data, _SEEK_HOLE)
            out.append((data, min(hole, end)))
            pos = hole
        return out
    finally:
        os.close(fd)


def allocated_in(guest: Guest, gpa: int, length: int) -> int:
    """Bytes of guest-physical [gpa, gpa+length) the host holds (see data_extents)."""
    return sum(b - a for a, b in data_extents(guest, gpa, length))


HOG = r"""
import mmap, sys, time
mib, hold = int(sys.argv[1]), float(sys.argv[2])
m = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\x5a" * (1 << 20)
for i in range(mib):
    m.write(chunk)
print("touched", flush=True)
open("/run/aerate-hog.ready", "w").close()
time.sleep(hold)
m.close()
"""


@dataclass
class Hog:
    """A guest process holding ``mib`` MiB of touched memory until it exits."""

    guest: Guest
    mib: int
    hold_s: float
    result: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def start(self) -> None:
        """Start it (in a thread: guest-exec blocks until the process exits)."""
        self.guest.check("rm -f /run/aerate-hog.ready")

        def run() -> None:
            rc, out, err = self.guest.run(["python3", "-c", HOG, str(self.mib), str(self.hold_s)],
                                          timeout=self.hold_s + 600)
            self.result.update(rc=rc, out=out, err=err, ended=time.monotonic())

        self.thread = threading.Thread(target=run, name="hog", daemon=True)
        self.thread.start()
        wait_for(lambda: self.guest.run("test -e /run/aerate-hog.ready", 30)[0] == 0
                 or not self.thread or not self.thread.is_alive(), self.hold_s + 300,
                 f"the guest to touch {self.mib} MiB")
        if "rc" in self.result and self.result["rc"] != 0:
            raise ScenarioError(f"hog failed in the guest: {self.result}")

    def join(self) -> float:
        """Wait for it to exit (its memory is freed then); returns that moment."""
        assert self.thread is not None
        self.thread.join(self.hold_s + 660)
        if self.result.get("rc") != 0:
            raise ScenarioError(f"hog failed in the guest: {self.result}")
        return float(self.result["ended"])


def hog_comes_back(daemon: Aerated, guest: Guest, mib: int, hold_s: float, target: float,
                   timeout: float = 120) -> tuple[int, float]:
    """Touch ``mib`` MiB in the guest for ``hold_s`` seconds, free it, and wait until the
    VM's backing (status ``backing_allocated_bytes``) is ``target`` bytes below its peak.

    Returns (bytes it fell, seconds from the free until then). On timeout the ScenarioError
    also gives the peak, the fall, the VM's status and the daemon's log tail.
    """
    hog = Hog(guest, mib, hold_s=hold_s)
    hog.start()
    peak = backing_read_after(daemon, guest.name, time.monotonic())
    freed_at = hog.join()

    def returned() -> int:
        return int(peak - daemon.vm(guest.name)["backing_allocated_bytes"])

    try:
        wait_for(lambda: returned() >= target, timeout,
                 f"{target / MiB:.0f} MiB of the freed memory to return")
    except ScenarioError as e:
        raise ScenarioError(f"{e}: peak {peak >> 20} MiB, returned {returned() >> 20} MiB; "
                            f"{daemon.vm(guest.name)}\n{daemon.log_text()[-5000:]}") from e
    return returned(), time.monotonic() - freed_at


def scratch_disk(path: Path, mib: int, label: str) -> str:
    """A sparse raw file of ``mib`` MiB with an empty ext4 labelled ``label`` on it (made
    on the host with mkfs.ext4), for files a guest writes beyond its image's free space
    (about 1 GiB); returns the domain XML of the virtio disk that holds it, for
    ``booted(extra_devices=...)``. The guest mounts it by label (``mount -L``)."""
    check_free_space(path.parent, mib * MiB, f"a {mib} MiB scratch disk")
    with open(path, "wb") as f:
        f.truncate(mib * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True,
                   capture_output=True, timeout=300)
    return (f"<disk type='file' device='disk'><driver name='qemu' type='raw' "
            f"cache='unsafe'/><source file='{path}'/><target dev='vdb' bus='virtio'/></disk>")


def columns(rows: Sequence[Sequence[Any]], width: int = 13) -> str:
    """A benchmark's side-by-side table: each row's label left, its values right-aligned in
    columns ``width`` wide."""
    label = max(len(str(r[0])) for r in rows) + 2
    return "\n".join(str(r[0]).ljust(label) + "".join(str(c).rjust(width) for c in r[1:])
                     for r in rows)


def guest_meminfo(guest: Guest) -> procfs.MemInfo:
    """The guest's /proc/meminfo ('kB' fields in bytes)."""
    return procfs.parse_meminfo(guest.check("cat /proc/meminfo"))


def guest_cpu_seconds(guest: Guest) -> float:
    """Busy CPU time of the whole guest so far (all CPUs, from its /proc/stat)."""
    line = guest.check("head -1 /proc/stat").split()
    ticks = [int(x) for x in line[1:]]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle, iowait
    hz = int(guest.check("getconf CLK_TCK").strip() or 100)
    return busy / hz


def start_checker(guest: Guest, mib: int, duration: float, churn: int = 0) -> None:
    """Run aerate-checker in the guest as a transient unit (result read by checker_result)."""
    guest.check(f"systemd-run --unit=aerate-checker --collect -p StandardOutput=file:"
                f"/run/aerate-checker.json /usr/local/bin/aerate-checker --mib {mib} "
                f"--duration {duration:.0f} --churn {churn}")


def checker_result(guest: Guest, timeout: float = 600) -> dict[str, Any]:
    """Wait for the checker unit to finish and return its JSON summary."""
    wait_for(lambda: guest.run("systemctl is-active -q aerate-checker", 30)[0] != 0,
             timeout, "aerate-checker to finish", interval=2)
    out = guest.check("cat /run/aerate-checker.json")
    try:
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise ScenarioError(f"aerate-checker printed no summary: {out!r}") from e
    return result


def agent_status(guest: Guest) -> str:
    """The agent's STATUS= line as systemd shows it ("waiting: ...", "filling: ...")."""
    return guest.check("systemctl show -p StatusText --value aerate-agent").strip()


def stall_with_a_report_in_flight(guest: Guest, daemon: Aerated, mib: int = 768,
                                  just_before: Callable[[], Any] | None = None) -> Any:
    """Free ``mib`` MiB in the guest, SIGSTOP the daemon in the middle of the pass that
    follows, and wait until a report of that pass waits for its ack.

    Mid-pass the guest holds a fresh lease token (each ack carries one), so its next report
    goes out while the daemon is stopped. An idle guest would first ask for a token, which
    a stopped daemon never answers, and report nothing: right, but not a report in flight.
    The daemon's lease (``lease_s``) must outlast what the caller does next: the guest
    returns the batch one lease after the token. ``just_before`` runs right before the
    SIGSTOP (a status read, say); its result is returned."""
    # Held 2.5 s: the agent sees free memory fall on two idle ticks in a row and
    # re-validates the blocks it believes aerated (agent/cycle.py raw_units). A shorter hog
    # takes and frees them between ticks, the belief goes stale and the freed memory may
    # not count as raw, so no pass starts (seen after a guest reboot: issue 15).
    hog = Hog(guest, mib, hold_s=2.5)
    hog.start()
    hog.join()
    wait_for(lambda: agent_status(guest).startswith(("filling", "waiting")), 120,
             "the agent's pass to start")
    result = just_before() if just_before is not None else None
    daemon.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: agent_status(guest).startswith("waiting"), 60,
             "the agent to report a batch and wait for its ack")
    return result


def free_backed(guest: Guest) -> int:
    """Host bytes behind the guest's RAM beyond what the guest uses (MemTotal - MemFree):
    backed memory that is free in the guest. Unlike the backing itself it does not move
    when the guest's own use grows (page cache, slab after a workload), so it says what a
    free page reporter left behind. Read guest first, host second."""
    info = dict(line.split(":", 1) for line in guest.check(
        "grep -E '^(MemTotal|MemFree):' /proc/meminfo").splitlines())
    used = (int(info["MemTotal"].split()[0]) - int(info["MemFree"].split()[0])) << 10
    return ram_allocated(guest) - used


def steady_of(read: Callable[[], int], seconds: float = 6.0, limit: float = 600.0) -> int:
    """Wait until ``read()`` stops moving (within 4 MiB over ``seconds``, or ``limit``
    seconds have passed); return it."""
    last, t0 = read(), time.monotonic()
    while True:
        time.sleep(seconds)
        now = read()
        if (last >= 0 and abs(now - last) < 4 * MiB) or time.monotonic() - t0 > limit:
            return int(now)
        last = now


#: Seeded churn (issue 15), run in the guest: overlapping ``stress-ng --vm 1 --verify``
#: jobs of random sizes and lifetimes, at most ``most`` at once, random gaps. A job whose
#: verify fails exits non-zero. Prints one JSON line: jobs started, jobs that failed.
CHURN = r"""
import json, random, subprocess, sys, time
seed, dur, lo, hi, life_max, most = (int(a) for a in sys.argv[1:7])
rng = random.Random(seed)
end = time.monotonic() + dur
running, started, failed = [], 0, []
while time.monotonic() < end or running:
    for p in [p for p in running if p.poll() is not None]:
        running.remove(p)
        if p.returncode != 0:
            failed.append((p.args[4], p.returncode, p.stderr.read()[-300:]))
    if time.monotonic() < end and len(running) < most:
        mib = rng.randint(lo, hi)
        life = min(rng.randint(2, life_max), max(1, int(end - time.monotonic())))
        running.append(subprocess.Popen(
            ["stress-ng", "--vm", "1", "--vm-bytes", "%dM" % mib, "--verify",
             "--timeout", "%ds" % life, "--quiet"], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True))
        started += 1
    time.sleep(rng.uniform(0.2, 1.5))
print(json.dumps({"jobs": started, "failed": failed}))
"""


@dataclass
class Churn:
    """The seeded churn running in ``guest`` (a thread: guest-exec blocks until it ends)."""

    guest: Guest
    seed: int
    seconds: int
    lo_mib: int
    hi_mib: int
    life_s: int
    jobs: int = 2
    result: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            rc, out, err = self.guest.run(
                ["python3", "-c", CHURN, *(str(v) for v in (
                    self.seed, self.seconds, self.lo_mib, self.hi_mib, self.life_s,
                    self.jobs))], timeout=self.seconds + 600)
            self.result.update(rc=rc, out=out, err=err, ended=time.monotonic())

        self.thread = threading.Thread(target=run, name="churn", daemon=True)
        self.thread.start()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def join(self) -> dict[str, Any]:
        """Wait for the last job; returns {"jobs", "failed", "ended"} (failed: the jobs
        that failed, a verify failure among them, or the churn itself)."""
        assert self.thread is not None
        self.thread.join(self.seconds + 660)
        try:
            summary: dict[str, Any] = json.loads(
                str(self.result.get("out", "")).strip().splitlines()[-1])
        except (ValueError, IndexError):
            summary = {"jobs": 0, "failed": [("churn", self.result.get("rc"),
                                              str(self.result.get("err", ""))[-300:])]}
        summary["ended"] = self.result.get("ended", time.monotonic())
        return summary
