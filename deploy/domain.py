"""libvirt domain XML for the aerate guest shapes, and detection of working KVM.

Shapes (``DomainSpec.backing``):

- ``memfd``     — guest RAM in a shared memfd: the host can punch holes in it.
- ``hugetlbfs`` — shared memfd backed by 2 MiB hugetlb pages (host pages must be reserved,
  see :func:`aerate.deploy.vm.reserved_hugepages`).
- ``private``   — libvirt's default private anonymous RAM: only the balloon can reclaim.

Every shape gets the aerate virtio-serial port ``org.aerate.agent.0`` as a unix socket the host
connects to, the qemu-guest-agent port (and, for the test harness, ``org.aerate.harness.0``),
a virtio memballoon (optionally with ``freePageReporting``; ``autodeflate`` for private
RAM), a serial console logged to a
file, a virtio disk and direct kernel boot.
:func:`domain_xml` is pure; :func:`detect_domain_type` runs QEMU once and caches its answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT = "org.aerate.agent.0"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
# Test harness only: a second qemu-ga the harness reaches without libvirt (aerate.deploy.qga).
HARNESS_PORT = "org.aerate.harness.0"
BACKINGS = ("memfd", "hugetlbfs", "private")
DOMAIN_TYPES = ("kvm", "qemu")
HUGEPAGE_KIB = 2048
FIRMWARES = ("seabios", "ovmf-smm")
#: Debian's OVMF built with SMM_REQUIRE (and Secure Boot, which stays off with the empty
#: variable store below: no keys enrolled, so the unsigned initrd boots).
OVMF_CODE_SMM = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

# Kernel command line for a quick, debuggable boot of the test guest.
DEFAULT_CMDLINE = (
    "root=/dev/vda rw rootfstype=ext4 console=ttyS0,115200 panic=-1 "
    "random.trust_cpu=on tsc=reliable mitigations=off systemd.show_status=false "
    "systemd.log_target=kmsg loglevel=4"
)


class DomainError(ValueError):
    """A domain specification cannot be turned into a working libvirt domain."""


@dataclass(frozen=True)
class DomainSpec:
    """Everything that makes one test domain; paths are host paths."""

    name: str
    kernel: Path
    initrd: Path
    disk: Path
    agent_socket: Path
    serial_log: Path
    backing: str = "memfd"
    memory_mib: int = 1024
    vcpus: int = 2
    domain_type: str = "qemu"
    free_page_reporting: bool = False
    balloon_autodeflate: bool | None = None
    """The guest's balloon driver gives pages back on OOM (QEMU deflate-on-oom); None:
    on for ``private`` RAM, which only the balloon reclaims, off otherwise."""
    cmdline: str = DEFAULT_CMDLINE
    disk_format: str = "qcow2"
    machine: str = "q35"
    harness_socket: Path | None = None
    """Host socket of the harness agent port; None leaves the port out."""
    extra_devices: Sequence[str] = field(default_factory=tuple)
    """XML fragments appended to <devices> (tests add devices this way)."""
    extra_domain: Sequence[str] = field(default_factory=tuple)
    """XML fragments appended to <domain> (e.g. <metadata>, <memtune>)."""
    firmware: str = "seabios"
    """"seabios" (QEMU's default) or "ovmf-smm": OVMF with SMM on (q35 only), which needs
    ``nvram``, the path libvirt copies the variable store template to."""
    nvram: Path | None = None
    on_reboot: str = "destroy"
    """What a guest reboot does: "destroy" (the harness default: a test guest that reboots
    is gone) or "restart" (libvirt's own default: QEMU resets the machine and the same
    process, memory backing and channel sockets carry on, which the lease tests need)."""

    def validate(self) -> None:
        """Raise DomainError naming the bad field."""
        if self.backing not in BACKINGS:
            raise DomainError(f"domain {self.name}: backing {self.backing!r} not in {BACKINGS}")
        if self.domain_type not in DOMAIN_TYPES:
            raise DomainError(
                f"domain {self.name}: type {self.domain_type!r} not in {DOMAIN_TYPES}")
        if self.memory_mib < 128:
            raise DomainError(f"domain {self.name}: {self.memory_mib} MiB is too little RAM")
        if self.backing == "hugetlbfs" and self.memory_mib % (HUGEPAGE_KIB // 1024):
            raise DomainError(
                f"domain {self.name}: hugetlbfs RAM must be a multiple of 2 MiB, "
                f"not {self.memory_mib} MiB")
        if self.vcpus < 1:
            raise DomainError(f"domain {self.name}: vcpus must be >= 1")
        if self.firmware not in FIRMWARES:
            raise DomainError(
                f"domain {self.name}: firmware {self.firmware!r} not in {FIRMWARES}")
        if self.firmware == "ovmf-smm":
            if self.machine != "q35" or self.nvram is None:
                raise DomainError(f"domain {self.name}: OVMF with SMM needs machine q35 and "
                                  f"an nvram path")
            for f in (OVMF_CODE_SMM, OVMF_VARS):
                if not f.is_file():
                    raise DomainError(f"domain {self.name}: {f} is missing: install the "
                                      f"Debian package ovmf (deploy/setup-host does it)")


def hugepages_needed(spec: DomainSpec) -> int:
    """Host 2 MiB hugepages the domain needs (0 unless hugetlbfs-backed)."""
    if spec.backing != "hugetlbfs":
        return 0
    return spec.memory_mib * 1024 // HUGEPAGE_KIB


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _fragment(xml: str, where: str, name: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainError(f"domain {name}: extra {where} XML is not well-formed: {exc}") from exc


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for ``spec`` (pure)."""
    spec.validate()
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus))

    if spec.backing != "private":
        mb = _sub(dom, "memoryBacking")
        if spec.backing == "hugetlbfs":
            hp = _sub(mb, "hugepages")
            _sub(hp, "page", size=str(HUGEPAGE_KIB), unit="KiB")
        # memfd needs no hugetlbfs mount on the host and gives the daemon an fd to punch.
        _sub(mb, "source", type="memfd")
        _sub(mb, "access", mode="shared")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.firmware == "ovmf-smm":
        # secure='yes': the flash is writable only from SMM (libvirt then requires SMM on).
        _sub(os_el, "loader", str(OVMF_CODE_SMM), readonly="yes", secure="yes", type="pflash")
        _sub(os_el, "nvram", str(spec.nvram), template=str(OVMF_VARS))
    _sub(os_el, "kernel", str(spec.kernel))
    _sub(os_el, "initrd", str(spec.initrd))
    _sub(os_el, "cmdline", spec.cmdline)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.firmware == "ovmf-smm":
        _sub(features, "smm", state="on")
    if spec.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", spec.on_reboot)
    _sub(dom, "on_crash", "destroy")

    dev = _sub(dom, "devices")
    # No USB controller: libvirt adds one to q35 by default; it only costs boot time here.
    _sub(dev, "controller", type="usb", model="none")
    disk = _sub(dev, "disk", type="file", device="disk")
    # The overlay is thrown away after the test: never wait for it to reach the platter.
    _sub(disk, "driver", name="qemu", type=spec.disk_format, cache="unsafe", discard="unmap")
    _sub(disk, "source", file=str(spec.disk))
    _sub(disk, "target", dev="vda", bus="virtio")

    chan = _sub(dev, "channel", type="unix")
    _sub(chan, "source", mode="bind", path=str(spec.agent_socket))
    _sub(chan, "target", type="virtio", name=AGENT_PORT)
    ga = _sub(dev, "channel", type="unix")
    _sub(ga, "target", type="virtio", name=GUEST_AGENT_PORT)
    if spec.harness_socket is not None:
        hc = _sub(dev, "channel", type="unix")
        _sub(hc, "source", mode="bind", path=str(spec.harness_socket))
        _sub(hc, "target", type="virtio", name=HARNESS_PORT)

    # A pty the operator can `virsh console` to, mirrored to a log file by virtlogd.
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "target", port="0")
    _sub(serial, "log", file=str(spec.serial_log), append="off")
    console = _sub(dev, "console", type="pty")
    _sub(console, "target", type="serial", port="0")

    balloon_attrs = {"model": "virtio"}
    if spec.free_page_reporting:
        balloon_attrs["freePageReporting"] = "on"
    autodeflate = spec.balloon_autodeflate
    if autodeflate if autodeflate is not None else spec.backing == "private":
        # A last line of defence if the balloon reclaimer deflates too late: the guest
        # takes pages back from the balloon before its OOM killer picks a victim.
        balloon_attrs["autodeflate"] = "on"
    balloon = _sub(dev, "memballoon", **balloon_attrs)
    _sub(balloon, "stats", period="5")
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    for frag in spec.extra_devices:
        dev.append(_fragment(frag, "device", spec.name))

    # QEMU runs as root without relabelling: the cached base image is shared by every test
    # domain and must not have its owner flipped back and forth by libvirt's DAC driver.
    sec = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
    _sub(sec, "label", "+0:+0")
    for frag in spec.extra_domain:
        dom.append(_fragment(frag, "domain", spec.name))
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


# ---------------------------------------------------------------------------------------------
# Accelerator detection: try KVM for real, with a timeout, and remember the answer per boot.

def probe_accel(accel: str, kernel: Path, qemu: str = "qemu-system-x86_64",
                timeout: float = 8.0) -> bool:
    """True if QEMU with ``-accel accel`` boots ``kernel`` to its first panic within ``timeout``.

    A firmware-only probe is not enough: on the development machines KVM runs SeaBIOS fine
    and hangs once the kernel takes over. Without a root file system the kernel panics a
    second or so after start (``panic=-1`` reboots, ``-no-reboot`` makes QEMU exit).
    """
    with tempfile.TemporaryDirectory(prefix="aerate-accel-") as tmp:
        log = Path(tmp) / "serial.log"
        argv = [qemu, "-accel", accel, "-machine", "pc", "-m", "128", "-nodefaults",
                "-nographic", "-display", "none", "-no-reboot", "-serial", f"file:{log}",
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 loglevel=1"]
        if accel == "kvm":
            argv += ["-cpu", "host"]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False  # the hang KVM shows where it does not work
        except FileNotFoundError:
            return False
        try:
            booted = "Kernel panic" in log.read_text(errors="replace")
        except OSError:
            booted = False
        return proc.returncode == 0 and booted


def probe_kernel() -> Path | None:
    """A kernel to probe with: the host's newest /boot/vmlinuz-*, if readable."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    for k in reversed(kernels):
        if os.access(k, os.R_OK):
            return k
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def detect_domain_type(kernel: Path | None = None, cache: Path | None = None) -> str:
    """'kvm' if KVM really boots ``kernel`` here, else 'qemu' (TCG); $AERATE_DOMAIN_TYPE wins.

    ``kernel`` defaults to the host's; with no kernel to try, TCG is the safe answer. The
    probe costs up to 8 s when KVM hangs, so its answer is cached per host boot.
    """
    forced = os.environ.get("AERATE_DOMAIN_TYPE")
    if forced:
        if forced not in DOMAIN_TYPES:
            raise DomainError(f"AERATE_DOMAIN_TYPE={forced!r} not in {DOMAIN_TYPES}")
        return forced
    if not os.path.exists("/dev/kvm"):
        return "qemu"
    cache = cache or Path(os.environ.get("AERATE_RUN", "/run/aerate"))
    stamp = cache / "accel.json"
    boot = _boot_id()
    try:
        cached = json.loads(stamp.read_text())
        if cached.get("boot_id") == boot and cached.get("domain_type") in DOMAIN_TYPES:
            return str(cached["domain_type"])
    except (OSError, ValueError):
        pass
    kernel = kernel or probe_kernel()
    if kernel is None:
        return "qemu"
    kind = "kvm" if probe_accel("kvm", kernel) else "qemu"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"boot_id": boot, "domain_type": kind}))
    except OSError:
        pass  # caching is an optimisation; the answer stands without it
    return kind
