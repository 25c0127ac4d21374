"""The VM tooling without a VM: domain XML per shape, recipe keys, apt mirror parsing, the
checker's own honesty, and bad setups failing with a message that names the missing piece.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from aerate.deploy import domain as dom_mod
from aerate.deploy import image as img
from aerate.deploy.domain import (
    AGENT_PORT,
    GUEST_AGENT_PORT,
    HARNESS_PORT,
    DomainError,
    DomainSpec,
    domain_xml,
    hugepages_needed,
)
from aerate.deploy.vm import Daemon, HarnessError, ensure_daemons

pytestmark = pytest.mark.unit
CHECKER = Path(img.GUEST_DIR) / "aerate-checker"


def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="t1", kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"),
        disk=Path("/r/disk.qcow2"), agent_socket=Path("/r/aerate.sock"),
        serial_log=Path("/l/t1-serial.log"))
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def parse(s: DomainSpec) -> ET.Element:
    return ET.fromstring(domain_xml(s))


# --- domain XML ----------------------------------------------------------------------------


def test_memfd_shape_shares_a_memfd() -> None:
    root = parse(spec(backing="memfd"))
    assert root.get("type") == "qemu"
    assert root.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert root.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert root.find("memoryBacking/hugepages") is None


def test_hugetlbfs_shape_asks_for_2mib_pages() -> None:
    s = spec(backing="hugetlbfs", memory_mib=1024)
    page = parse(s).find("memoryBacking/hugepages/page")
    assert page is not None and (page.get("size"), page.get("unit")) == ("2048", "KiB")
    assert hugepages_needed(s) == 512
    assert hugepages_needed(spec(backing="memfd")) == 0


def test_private_shape_is_libvirts_default_anonymous_ram() -> None:
    assert parse(spec(backing="private")).find("memoryBacking") is None


def test_channels_balloon_console_disk_and_kernel() -> None:
    root = parse(spec(free_page_reporting=True, memory_mib=768, vcpus=3))
    chans = {c.find("target").get("name"): c for c in root.iter("channel")}  # type: ignore[union-attr]
    assert set(chans) == {AGENT_PORT, GUEST_AGENT_PORT}
    src = chans[AGENT_PORT].find("source")
    assert src is not None and (src.get("mode"), src.get("path")) == ("bind", "/r/aerate.sock")
    assert root.find("devices/memballoon").get("freePageReporting") == "on"  # type: ignore[union-attr]
    assert root.find("devices/serial/log").get("file") == "/l/t1-serial.log"  # type: ignore[union-attr]
    assert root.find("devices/disk/source").get("file") == "/r/disk.qcow2"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert "root=/dev/vda" in (root.findtext("os/cmdline") or "")
    assert (root.findtext("memory"), root.findtext("vcpu")) == ("768", "3")
    plain = parse(spec())
    assert plain.find("devices/memballoon").get("freePageReporting") is None  # type: ignore[union-attr]


def channel_names(root: ET.Element) -> list[str | None]:
    return [t.get("name") for t in root.iterfind("devices/channel/target")]


def test_harness_port_only_when_asked() -> None:
    assert HARNESS_PORT in channel_names(parse(spec(harness_socket=Path("/r/h.sock"))))
    assert HARNESS_PORT not in channel_names(parse(spec()))


def test_kvm_type_passes_the_host_cpu_through() -> None:
    root = parse(spec(domain_type="kvm"))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]


def test_extra_xml_lands_where_asked_and_bad_xml_is_named() -> None:
    root = parse(spec(extra_devices=["<watchdog model='i6300esb' action='reset'/>"],
                      extra_domain=["<description>fault run</description>"]))
    assert root.find("devices/watchdog").get("model") == "i6300esb"  # type: ignore[union-attr]
    assert root.findtext("description") == "fault run"
    with pytest.raises(DomainError, match="t1: extra device XML is not well-formed"):
        domain_xml(spec(extra_devices=["<watchdog"]))


def test_ovmf_smm_firmware_boots_the_kernel_with_smm_on(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    code, vars_ = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"")
    vars_.write_bytes(b"")
    monkeypatch.setattr(dom_mod, "OVMF_CODE_SMM", code)
    monkeypatch.setattr(dom_mod, "OVMF_VARS", vars_)
    root = parse(spec(firmware="ovmf-smm", nvram=Path("/r/VARS.fd")))
    loader = root.find("os/loader")
    assert loader is not None and loader.text == str(code)
    assert (loader.get("type"), loader.get("secure"), loader.get("readonly")) == \
        ("pflash", "yes", "yes")
    nvram = root.find("os/nvram")
    assert nvram is not None and nvram.text == "/r/VARS.fd" and nvram.get("template") == str(vars_)
    assert root.find("features/smm").get("state") == "on"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/k/vmlinuz"  # still direct kernel boot
    # SeaBIOS (the default) gets neither.
    plain = parse(spec())
    assert plain.find("os/loader") is None and plain.find("features/smm") is None
    with pytest.raises(DomainError, match="nvram"):
        domain_xml(spec(firmware="ovmf-smm"))
    with pytest.raises(DomainError, match="q35"):
        domain_xml(spec(firmware="ovmf-smm", nvram=Path("/r/V.fd"), machine="pc"))
    monkeypatch.setattr(dom_mod, "OVMF_CODE_SMM", tmp_path / "gone.fd")
    with pytest.raises(DomainError, match="package ovmf"):
        domain_xml(spec(firmware="ovmf-smm", nvram=Path("/r/V.fd")))


@pytest.mark.parametrize("kw, field", [({"backing": "tmpfs"}, "backing"),
                                       ({"firmware": "coreboot"}, "firmware"),
                                       ({"domain_type": "xen"}, "type"),
                                       ({"memory_mib": 64}, "too little RAM"),
                                       ({"backing": "hugetlbfs", "memory_mib": 1025}, "2 MiB")])
def test_bad_specs_are_refused_by_name(kw: dict[str, object], field: str) -> None:
    with pytest.raises(DomainError, match=field):
        domain_xml(spec(**kw))


# --- image recipe --------------------------------------------------------------------------

DEB822 = """\
Types: deb
URIs: http://mirror.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb
# a comment
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
"""


def test_mirror_comes_from_the_suite_entry_of_apt_sources() -> None:
    assert img.parse_apt_mirror({"debian.sources": DEB822}) == "http://mirror.invalid/debian"
    one_line = "deb [arch=amd64] http://one.invalid/debian bookworm main\n"
    assert img.parse_apt_mirror({"sources.list": one_line}) == "http://one.invalid/debian"
    disabled = "Enabled: no\n" + DEB822.split("\n\n")[1]
    assert img.parse_apt_mirror({"x.sources": disabled}) is None
    assert img.parse_apt_mirror({"x.sources": DEB822}, suite="trixie") is None


def test_recipe_hash_follows_content(tmp_path: Path) -> None:
    a = tmp_path / "packages"
    a.write_text("systemd\n")
    h1 = img.recipe_hash([a])
    assert img.recipe_hash([a]) == h1
    a.write_text("systemd\nudev\n")
    assert img.recipe_hash([a]) != h1


def test_deb_hash_ignores_build_timestamps(tmp_path: Path) -> None:
    def make(name: str, when: int, body: bytes = b"print(1)\n") -> Path:
        tree = tmp_path / name
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "DEBIAN/control").write_text("Package: demo\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: x <x@example.org>\nDescription: d\n")
        (tree / "usr/lib").mkdir(parents=True)
        (tree / "usr/lib/x.py").write_bytes(body)
        for p in tree.rglob("*"):
            os.utime(p, (when, when))
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(tree) + ".deb"],
                       check=True, capture_output=True)
        return Path(str(tree) + ".deb")
    one, two = make("a", 1_600_000_000), make("b", 1_700_000_000)
    assert img.deb_content_hash(one) == img.deb_content_hash(two)
    assert img.deb_content_hash(make("c", 1_600_000_000, b"print(2)\n")) != \
        img.deb_content_hash(one)


def test_each_suite_has_its_own_base_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    # The default suite's key is what it was before suites (its cached base stays valid).
    assert img.base_key() == img.recipe_hash(img.base_recipe_files(),
                                             f"bookworm/{img.VARIANT}/amd64")[:16]
    assert img.base_key("bullseye") != img.base_key()
    with pytest.raises(img.ImageError, match=r"no guest image recipe for Debian suite 'sid'"):
        img.ensure_base(tmp_path / "cache", suite="sid")


def test_package_list_parses() -> None:
    assert img.read_package_list("# c\nsystemd  # pid 1\n\nudev\n") == ["systemd", "udev"]


# --- bad setups fail clearly ---------------------------------------------------------------


def test_no_debootstrap_on_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("AERATE_MIRROR", "http://mirror.invalid/debian")
    with pytest.raises(img.ImageError, match=r"debootstrap not found on PATH.*package debootstrap"):
        img.ensure_base(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("base-*")), "a failed build left a half tree"


def test_missing_kernel_in_guest_is_named(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(img.ImageError, match=r"no kernel image.*linux-image-amd64"):
        img.find_kernel(tmp_path)
    (tmp_path / "boot/vmlinuz-6.1.0-9-amd64").write_bytes(b"")
    with pytest.raises(img.ImageError, match=r"no initramfs .*initrd.img-6.1.0-9-amd64"):
        img.find_kernel(tmp_path)


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "root.img").write_bytes(b"")
    (tmp_path / "initrd.img").write_bytes(b"")
    gi = img.GuestImage(root=tmp_path / "root.img", kernel=tmp_path / "vmlinuz",
                        initrd=tmp_path / "initrd.img", key="k", build_seconds=0.0)
    with pytest.raises(img.ImageError, match=f"guest kernel {tmp_path}/vmlinuz is missing"):
        gi.check()


def test_no_space_is_named_with_numbers(tmp_path: Path) -> None:
    with pytest.raises(img.ImageError, match=r"not enough space for the guest image in .*MiB "
                                             r"free, .*MiB needed.*AERATE_CACHE"):
        img.check_free_space(tmp_path / "not/yet", 1 << 60, "the guest image")


def test_failed_step_names_the_step_and_shows_its_output() -> None:
    with pytest.raises(img.ImageError) as info:
        img.run_step("configure-base", ["sh", "-c", "echo early; echo 'E: broken dep'; exit 3"])
    msg = str(info.value)
    assert "'configure-base' failed (exit 3)" in msg and "E: broken dep" in msg


def test_no_libvirtd_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    absent = Daemon("libvirtd", tmp_path / "none.pid", tmp_path / "none.sock",
                    "libvirt-daemon-system")
    with pytest.raises(HarnessError, match=r"libvirtd is not running and not installed.*"
                                           r"libvirt-daemon-system"):
        ensure_daemons([absent])


# --- the checker workload ------------------------------------------------------------------


def run_checker(*args: str) -> tuple[int, dict[str, object]]:
    p = subprocess.run([sys.executable, str(CHECKER), *args], capture_output=True, text=True,
                       timeout=120, check=False)
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


def test_checker_passes_on_intact_memory() -> None:
    rc, s = run_checker("--mib", "32", "--duration", "1", "--churn", "1")
    assert rc == 0 and s["corrupted"] == 0 and s["passes"] >= 2  # type: ignore[operator]
    assert s["freed_pages"] == s["kept_pages"] == 4096


def test_checker_reports_zeroed_pages_and_fails() -> None:
    rc, s = run_checker("--mib", "32", "--duration", "0", "--inject-zero-pages", "3")
    assert rc == 1 and s["corrupted"] == 3
    assert all(c["zero_page"] for c in s["first_corruptions"])  # type: ignore[attr-defined]


def test_prune_cache_keeps_current_recent_and_young(tmp_path: Path) -> None:
    old = 1_000_000_000.0
    for i in range(7):
        d = tmp_path / f"image-b-{i}"
        d.mkdir()
        (d / "done").write_text("{}")
        os.utime(d / "done", (old + i, old + i))  # last used long ago, 6 newest
    young = tmp_path / "image-b-young"
    young.mkdir()
    (young / "done").write_text("{}")
    removed = img.prune_cache(["b-0"], tmp_path, keep_recent=2)
    left = sorted(p.name for p in tmp_path.glob("image-*"))
    # young + the next most recent stay (keep 2), b-0 is current; the rest were stale.
    assert left == ["image-b-0", "image-b-6", "image-b-young"], left
    assert len(removed) == 5
