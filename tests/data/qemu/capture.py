"""Re-create the QEMU monitor captures under tests/data/qemu/<case>/.

Run as root on a machine with qemu-system-x86_64 (TCG is enough):

    .venv/bin/python tests/data/qemu/capture.py [case ...]

Each case starts a real QEMU (no guest OS; most cases stay stopped with -S), asks it what
the unit tests of aerate.host.qemu_map parse, and writes one file per answer:
query-memdev.json, qom-objects.json, machine.json (below/above-4g sizes),
query-memory-devices.json, query-memory-size-summary.json, mtree-f.txt, mtree.txt,
ramblock.txt, gpa2hva.txt and the kernel's view of the process (maps.txt,
smaps-large.txt, fd.txt) plus case.json, the command line. `capture.py libvirt` writes
libvirt domain XML (libvirt/*.xml) and one libvirt-started guest's monitor answers.
Hugepage pools are grown for the hugetlb cases and restored afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aerate.deploy.qemu import BareQemu

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
MIB = 1 << 20


def memfd(ident: str, size: int, **extra: str) -> list[str]:
    opts = ",".join(f"{k}={v}" for k, v in extra.items())
    return ["-object", f"memory-backend-memfd,id={ident},size={size},{opts}".rstrip(",")]


def file_backend(ident: str, size: int, path: str, share: str) -> list[str]:
    return [
        "-object",
        f"memory-backend-file,id={ident},size={size},mem-path={path},share={share}",
    ]


def case_args(case: str, scratch: str) -> tuple[list[str], dict[str, int], bool]:
    """Command line, hugepage pool needs {size_kib: pages}, and whether to let it run."""
    hp: dict[str, int] = {}
    run = False
    if case == "pc-1g-memfd-vga":
        args = ["-machine", "pc,memory-backend=pc.ram", "-m", "1G", "-device", "VGA"]
        args += memfd("pc.ram", GIB, share="on")
    elif case == "pc-5g-memfd":
        args = ["-machine", "pc,memory-backend=pc.ram", "-m", "5G"]
        args += memfd("pc.ram", 5 * GIB, share="on")
    elif case == "q35-1g-memfd":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G"]
        args += memfd("pc.ram", GIB, share="on")
    elif case == "q35-5g-memfd":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "5G"]
        args += memfd("pc.ram", 5 * GIB, share="on")
    elif case == "q35-1g-memfd-running":
        # Firmware has run (no bootable device): PAM shadowing changed the low 1 MiB.
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G"]
        args += memfd("pc.ram", GIB, share="on")
        run = True
    elif case == "q35-1g-memfd-hugetlb2m":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G"]
        args += memfd("pc.ram", GIB, share="on", hugetlb="on", hugetlbsize="2M")
        hp = {"2048": 512}
    elif case == "pc-5g-memfd-hugetlb2m":
        args = ["-machine", "pc,memory-backend=pc.ram", "-m", "5G"]
        args += memfd("pc.ram", 5 * GIB, share="on", hugetlb="on", hugetlbsize="2M")
        hp = {"2048": 2560}
    elif case == "q35-2g-memfd-hugetlb1g":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "2G"]
        args += memfd("pc.ram", 2 * GIB, share="on", hugetlb="on", hugetlbsize="1G")
        hp = {"1048576": 2}
    elif case == "pc-1g-file-shm":
        args = ["-machine", "pc,memory-backend=pc.ram", "-m", "1G"]
        args += file_backend("pc.ram", GIB, f"/dev/shm/aerate-capture-{os.getpid()}", "on")
    elif case == "q35-1g-file-hugetlbfs":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G"]
        args += file_backend("pc.ram", GIB, f"{scratch}/hugetlbfs/guest-ram", "on")
        hp = {"2048": 512}
    elif case == "q35-1g-file-private":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G"]
        args += file_backend("pc.ram", GIB, f"/dev/shm/aerate-capture-{os.getpid()}", "off")
    elif case == "pc-1g-ram-default":
        # Plain -m: QEMU creates its default private anonymous backend "pc.ram".
        args = ["-machine", "pc", "-m", "1G"]
    elif case == "pc-1g-ram-shared":
        args = ["-machine", "pc,memory-backend=pc.ram", "-m", "1G"]
        args += ["-object", f"memory-backend-ram,id=pc.ram,size={GIB},share=on"]
    elif case == "q35-3g-numa-memfd":
        # Two NUMA nodes; node 1 straddles the q35 low-memory end (2 GiB).
        args = ["-machine", "q35", "-m", "3G", "-smp", "2"]
        args += memfd("ram-node0", GIB, share="on") + memfd("ram-node1", 2 * GIB, share="on")
        args += ["-numa", "node,nodeid=0,cpus=0,memdev=ram-node0"]
        args += ["-numa", "node,nodeid=1,cpus=1,memdev=ram-node1"]
    elif case == "q35-1g-dimm-memfd":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G,slots=2,maxmem=4G"]
        args += memfd("pc.ram", GIB, share="on") + memfd("dimm0", 512 * MIB, share="on")
        args += ["-device", "pc-dimm,id=dimm0,memdev=dimm0"]
    elif case == "q35-1g-virtio-mem-memfd":
        args = ["-machine", "q35,memory-backend=pc.ram", "-m", "1G,maxmem=4G"]
        args += memfd("pc.ram", GIB, share="on") + memfd("vmem0", GIB, share="on")
        args += ["-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=256M"]
    else:
        raise SystemExit(f"unknown case {case}")
    return args, hp, run


CASES = [
    "pc-1g-memfd-vga",
    "pc-5g-memfd",
    "q35-1g-memfd",
    "q35-5g-memfd",
    "q35-1g-memfd-running",
    "q35-1g-memfd-hugetlb2m",
    "pc-5g-memfd-hugetlb2m",
    "q35-2g-memfd-hugetlb1g",
    "pc-1g-file-shm",
    "q35-1g-file-hugetlbfs",
    "q35-1g-file-private",
    "pc-1g-ram-default",
    "pc-1g-ram-shared",
    "q35-3g-numa-memfd",
    "q35-1g-dimm-memfd",
    "q35-1g-virtio-mem-memfd",
]


def pool_path(size_kib: str) -> Path:
    return Path(f"/sys/kernel/mm/hugepages/hugepages-{size_kib}kB/nr_hugepages")


def large_smaps(pid: int, floor: int = 16 * MIB) -> str:
    """The smaps entries of mappings of at least `floor` bytes (RAM and its neighbours)."""
    keep: list[str] = []
    entry: list[str] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines(keepends=True):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            entry = [line] if end - start >= floor else []
            if entry:
                keep.append(line)
        elif entry:
            keep.append(line)
    return "".join(keep)


def smm_facts(qmp: Any) -> dict[str, Any]:
    """What host/qemu_map.py gather asks about SMM/TSEG (machine type, smm, MCH TSEG)."""
    out = {p: qmp("qom-get", {"path": "/machine", "property": p}) for p in ("type", "smm")}
    if "q35" in str(out["type"]):
        out["extended-tseg-mbytes"] = qmp("qom-get", {"path": "/machine/q35/mch",
                                                      "property": "extended-tseg-mbytes"})
    return out


def capture(case: str) -> None:
    scratch = tempfile.mkdtemp(prefix="aerate-capture-")
    args, hp, run = case_args(case, scratch)
    saved = {k: pool_path(k).read_text().strip() for k in hp}
    mounted = False
    qemu = None
    try:
        for size_kib, pages in hp.items():
            pool_path(size_kib).write_text(str(int(saved[size_kib]) + pages))
            got = int(pool_path(size_kib).read_text())
            if got < int(saved[size_kib]) + pages:
                raise SystemExit(f"{case}: could only reserve {got} pages of {size_kib} KiB")
        if "hugetlbfs" in case:
            os.mkdir(f"{scratch}/hugetlbfs")
            subprocess.run(
                ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", f"{scratch}/hugetlbfs"],
                check=True,
            )
            mounted = True
        log = open(f"{scratch}/qemu.log", "wb")  # noqa: SIM115 - closed with the scratch dir
        qemu = BareQemu(args, f"{scratch}/qmp.sock", stopped=not run, log=log)
        qmp = qemu.qmp
        if run:
            time.sleep(3)
        out = HERE / case
        out.mkdir(exist_ok=True)
        pid = str(os.getpid())
        shown = [a.replace(scratch, "$SCRATCH").replace(pid, "$PID") for a in qemu.argv]
        (out / "case.json").write_text(json.dumps({"argv": shown}, indent=1) + "\n")

        def dump(name: str, value: Any) -> None:
            (out / name).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")

        dump("query-memdev.json", qmp("query-memdev"))
        dump("qom-objects.json", qmp("qom-list", {"path": "/objects"}))
        machine = {}
        for prop in ("below-4g-mem-size", "above-4g-mem-size", "memory-backend"):
            try:
                machine[prop] = qmp("qom-get", {"path": "/machine", "property": prop})
            except RuntimeError as exc:
                machine[prop] = {"error": str(exc)}
        dump("machine.json", machine)
        dump("smm.json", smm_facts(qmp))
        dump("query-memory-devices.json", qmp("query-memory-devices"))
        dump("query-memory-size-summary.json", qmp("query-memory-size-summary"))
        (out / "mtree-f.txt").write_text(qmp.hmp("info mtree -f"))
        (out / "mtree.txt").write_text(qmp.hmp("info mtree"))
        (out / "ramblock.txt").write_text(qmp.hmp("info ramblock"))
        # Host virtual addresses of a few guest addresses, for the backing resolver.
        probes = [0, 0x100000, 0x40000000 - 0x1000, 0x100000000]
        lines = []
        for gpa in probes:
            lines.append(f"gpa2hva {gpa:#x}\n" + qmp.hmp(f"gpa2hva {gpa:#x}"))
        (out / "gpa2hva.txt").write_text("".join(lines))
        (out / "maps.txt").write_text(Path(f"/proc/{qemu.pid}/maps").read_text())
        (out / "smaps-large.txt").write_text(large_smaps(qemu.pid))
        fds = []
        for fd in sorted(os.listdir(f"/proc/{qemu.pid}/fd"), key=int):
            try:
                fds.append(f"{fd} -> {os.readlink(f'/proc/{qemu.pid}/fd/{fd}')}")
            except FileNotFoundError:
                continue
        (out / "fd.txt").write_text("\n".join(fds).replace(scratch, "$SCRATCH") + "\n")
        qmp("quit")
        qmp.close()
        qemu.proc.wait(timeout=10)
        print(f"captured {case}")
    finally:
        if qemu is not None:
            qemu.kill()
        if mounted:
            subprocess.run(["umount", f"{scratch}/hugetlbfs"], check=True)
        for size_kib, value in saved.items():
            pool_path(size_kib).write_text(value)
        for leftover in Path("/dev/shm").glob(f"aerate-capture-{os.getpid()}"):
            leftover.unlink()
        shutil.rmtree(scratch, ignore_errors=True)


DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>{memory}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>{cpu}
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <channel type='unix'>
      <target type='virtio' name='org.aerate.agent.0'/>
    </channel>{devices}
  </devices>
</domain>
"""

MEMFD = """
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>"""

LIBVIRT_DOMAINS: dict[str, dict[str, str]] = {
    "private": {"devices": "\n    <memballoon model='virtio'/>"},
    "memfd-shared": {"memory": MEMFD, "devices": "\n    <memballoon model='virtio'/>"},
    "hugepages": {"memory": "\n  <memoryBacking><hugepages/></memoryBacking>"},
    "hugepages-memfd-shared": {
        "memory": "\n  <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages>"
                  "<source type='memfd'/><access mode='shared'/></memoryBacking>",
    },
    "file-shared": {
        "memory": "\n  <memoryBacking><source type='file'/><access mode='shared'/>"
                  "</memoryBacking>",
    },
    "memfd-shared-locked": {
        "memory": "\n  <memoryBacking><source type='memfd'/><access mode='shared'/><locked/>"
                  "</memoryBacking>",
        "devices": "\n    <memballoon model='none'/>",
    },
    "numa-mixed-access": {
        "memory": "\n  <memoryBacking><source type='memfd'/></memoryBacking>",
        "cpu": "\n  <cpu><numa><cell id='0' cpus='0' memory='128' unit='MiB' memAccess='shared'/>"
               "<cell id='1' cpus='1' memory='128' unit='MiB'/></numa></cpu>",
    },
    "memfd-shared-hostdev-pci": {
        "memory": MEMFD,
        "devices": "\n    <hostdev mode='subsystem' type='pci' managed='yes'><source>"
                   "<address domain='0x0000' bus='0x03' slot='0x00' function='0x1'/>"
                   "</source></hostdev>",
    },
    "memfd-shared-interface-hostdev": {
        "memory": MEMFD,
        "devices": "\n    <interface type='hostdev' managed='yes'><source>"
                   "<address type='pci' domain='0x0000' bus='0x04' slot='0x10' function='0x2'/>"
                   "</source></interface>",
    },
    "memfd-shared-hostdev-mdev": {
        "memory": MEMFD,
        "devices": "\n    <hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
                   "<address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>",
    },
    "memfd-shared-hostdev-usb": {
        "memory": MEMFD,
        "devices": "\n    <hostdev mode='subsystem' type='usb'><source>"
                   "<vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>",
    },
}


def virsh(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["virsh", "-c", "qemu:///system", *args], input=stdin, text=True,
                         capture_output=True)
    if out.returncode:
        raise RuntimeError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def capture_libvirt() -> None:
    """Domain XML as libvirt writes it back, plus one live TCG domain's monitor answers.

    Needs libvirtd (and virtlogd) running. Domains are defined, dumped and undefined; the
    live one is created transient and destroyed.
    """
    out = HERE / "libvirt"
    out.mkdir(exist_ok=True)
    for case, parts in LIBVIRT_DOMAINS.items():
        name = f"aerate-capture-{case}"
        xml = DOMAIN.format(name=name, memory=parts.get("memory", ""), cpu=parts.get("cpu", ""),
                            devices=parts.get("devices", ""))
        with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
            f.write(xml)
            f.flush()
            virsh("define", f.name)
        try:
            (out / f"{case}.inactive.xml").write_text(virsh("dumpxml", "--inactive", name))
        finally:
            virsh("undefine", name)
        print(f"captured libvirt/{case}.inactive.xml")
    name = "aerate-capture-live"
    xml = DOMAIN.format(name=name, memory=MEMFD, cpu="",
                        devices="\n    <memballoon model='virtio'/>")
    with tempfile.NamedTemporaryFile("w", suffix=".xml") as f:
        f.write(xml)
        f.flush()
        virsh("create", f.name)
    try:
        time.sleep(2)  # let the firmware run, as a real guest would have
        (out / "memfd-shared.live.xml").write_text(virsh("dumpxml", name))
        live = HERE / "libvirt-q35-256m-memfd-running"
        live.mkdir(exist_ok=True)

        def qmp(cmd: str, args: dict[str, Any] | None = None) -> Any:
            msg: dict[str, Any] = {"execute": cmd, **({"arguments": args} if args else {})}
            return json.loads(virsh("qemu-monitor-command", name, json.dumps(msg)))["return"]

        def dump(fname: str, value: Any) -> None:
            (live / fname).write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")

        dump("query-memdev.json", qmp("query-memdev"))
        dump("qom-objects.json", qmp("qom-list", {"path": "/objects"}))
        dump("query-memory-devices.json", qmp("query-memory-devices"))
        dump("query-memory-size-summary.json", qmp("query-memory-size-summary"))
        dump("smm.json", smm_facts(qmp))
        for fname, line in (("mtree-f.txt", "info mtree -f"), ("mtree.txt", "info mtree"),
                            ("ramblock.txt", "info ramblock")):
            (live / fname).write_text(virsh("qemu-monitor-command", "--hmp", name, line))
        print("captured libvirt/memfd-shared.live.xml and libvirt-q35-256m-memfd-running")
    finally:
        virsh("destroy", name)


def main() -> None:
    for case in sys.argv[1:] or [*CASES, "libvirt"]:
        if case == "libvirt":
            capture_libvirt()
        else:
            capture(case)


if __name__ == "__main__":
    main()
