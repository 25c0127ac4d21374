"""Build (or reuse) the aerate test guest image: Debian, systemd as PID 1, aerate-agent enabled.

Two cached stages under ``$AERATE_CACHE`` (default ``/var/cache/aerate``):

1. *base* — ``debootstrap --variant=minbase`` + the packages in ``deploy/guest/packages``,
   configured by ``deploy/guest/configure-base``. Keyed by a hash of the recipe files; slow
   (minutes), rebuilt only when the recipe changes.
2. *image* — the base tree plus the Debian packages python3-aerate and aerate-agent built
   from the working tree (``dpkg-buildpackage``, deploy/packaging.py) and installed with
   ``dpkg -i`` as an operator would (their maintainer scripts enable the unit; the udev
   rule and unit come from the package), the checker workload and the harness agent, packed
   into an ext4 file system image with ``mkfs.ext4 -d`` (no loop mounts). Keyed by base
   hash + the packages' content hash; fast.

The kernel and initramfs are installed *inside* the guest (``/lib/modules`` matches) and copied
out next to the image for direct kernel boot.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aerate.deploy import packaging

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(__file__).resolve().parent / "guest"

SUITE = "bookworm"
#: Debian suites the guest image builds for: the default one, and an older real guest
#: (Debian 11: kernel 5.10, Python 3.9, systemd 247) to show what the agent does without
#: what newer kernels and service managers offer.
SUITES = (SUITE, "bullseye")
VARIANT = "minbase"
# Space a cold build needs in the cache: debootstrap tree + kernel (~1 GiB) + image + slack.
BASE_SPACE_BYTES = 3 << 30
IMAGE_SPACE_BYTES = 2 << 30
# Free space inside the guest's root file system beyond what the files take.
IMAGE_HEADROOM_BYTES = 1 << 30
OUTPUT_TAIL_LINES = 40


class ImageError(RuntimeError):
    """The guest image cannot be built or used; the message names the missing piece."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: root file system image (raw ext4) and the kernel to boot it with."""

    root: Path
    kernel: Path
    initrd: Path
    key: str
    build_seconds: float
    """Seconds this call spent building (0.0 when fully cached)."""
    suite: str = SUITE
    """The Debian suite of the guest's root file system."""

    def check(self) -> None:
        """Raise ImageError unless every file of the image exists."""
        for what, path in (("root image", self.root), ("kernel", self.kernel),
                           ("initramfs", self.initrd)):
            if not path.is_file():
                raise ImageError(
                    f"guest {what} {path} is missing: rebuild with "
                    f"`python -m aerate.deploy.image` or delete {path.parent}"
                )


def cache_dir() -> Path:
    """Where images are cached: $AERATE_CACHE or /var/cache/aerate."""
    return Path(os.environ.get("AERATE_CACHE", "/var/cache/aerate"))


# ---------------------------------------------------------------------------------------------
# Pure helpers


def read_package_list(text: str) -> list[str]:
    """Package names from a ``packages`` file: one per line, ``#`` comments, blanks ignored."""
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def recipe_hash(files: Sequence[Path], extra: str = "") -> str:
    """Hash of the base recipe: names and contents of ``files`` plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for path in sorted(files):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def deb_content_hash(deb: Path) -> str:
    """Hash of a .deb's control and data members (names, modes, bytes), independent of the
    build's timestamps."""
    h = hashlib.sha256()
    for part in ("--ctrl-tarfile", "--fsys-tarfile"):
        data = subprocess.run(["dpkg-deb", part, str(deb)], capture_output=True,
                              check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                h.update(f"{m.name}\0{m.mode:o}\0{m.linkname}\0".encode())
                f = tf.extractfile(m) if m.isfile() else None
                h.update((f.read() if f else b"") + b"\0")
    return h.hexdigest()


def parse_apt_mirror(sources: dict[str, str], suite: str = SUITE) -> str | None:
    """The archive URI serving ``suite`` from apt source files (deb822 or one-line format).

    ``sources`` maps file name to its text; ``.sources`` files are deb822, ``.list`` files
    one-line. Returns None when no enabled ``deb`` entry carries exactly that suite.
    """
    for name in sorted(sources):
        text = sources[name]
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                if suite in fields.get("suites", "").split() and fields.get("uris"):
                    return fields["uris"].split()[0]
        elif name.endswith(".list"):
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    return None


def output_tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    """The last ``lines`` lines of a command's output, for error messages."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# I/O edges


def require_tool(name: str, package: str) -> str:
    """Absolute path of ``name`` on PATH, or ImageError telling which package provides it."""
    found = shutil.which(name)
    if found is None:
        raise ImageError(
            f"{name} not found on PATH: install the Debian package {package} "
            f"(deploy/setup-host does it)"
        )
    return found


def check_free_space(path: Path, need: int, what: str) -> None:
    """Raise ImageError if the file system holding ``path`` has less than ``need`` bytes free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    st = os.statvfs(probe)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise ImageError(
            f"not enough space for {what} in {path}: {free >> 20} MiB free, "
            f"{need >> 20} MiB needed; free some space or point AERATE_CACHE elsewhere"
        )


def run_step(step: str, argv: Sequence[str], *, cwd: Path | None = None,
             env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    """Run one build step; on failure raise ImageError naming the step with its output tail."""
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", timeout=timeout, check=False,
        )
    except FileNotFoundError as exc:
        raise ImageError(f"image build step '{step}' could not start {argv[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        out = exc.output if isinstance(exc.output, str) else ""
        raise ImageError(
            f"image build step '{step}' timed out after {timeout:.0f}s; last output:\n"
            f"{output_tail(out)}"
        ) from exc
    if proc.returncode != 0:
        raise ImageError(
            f"image build step '{step}' failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"last output:\n{output_tail(proc.stdout)}"
        )
    return proc.stdout


def host_apt_mirror(suite: str = SUITE) -> str:
    """The Debian archive URI this machine's apt uses (or $AERATE_MIRROR)."""
    override = os.environ.get("AERATE_MIRROR")
    if override:
        return override
    sources: dict[str, str] = {}
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        sources["sources.list"] = main.read_text(errors="replace")
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        for p in d.iterdir():
            if p.suffix in (".sources", ".list") and p.is_file():
                sources[p.name] = p.read_text(errors="replace")
    mirror = parse_apt_mirror(sources, suite)
    if mirror is None:
        raise ImageError(
            f"no apt source for Debian suite '{suite}' in /etc/apt/sources.list(.d): "
            f"configure one or set AERATE_MIRROR to a Debian archive URI"
        )
    return mirror


def in_chroot(root: Path, argv: Sequence[str]) -> list[str]:
    """argv running ``argv`` chrooted in ``root`` with /proc, in a private mount namespace.

    The namespace dies with the command, so no mount can leak on failure.
    """
    script = 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(root), *argv]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` so concurrent test runs do not build the same stage twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _guest_env() -> dict[str, str]:
    """Environment for commands run inside the guest tree."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }


def check_suite(suite: str) -> None:
    """Raise ImageError unless the image builder knows Debian ``suite``."""
    if suite not in SUITES:
        raise ImageError(f"no guest image recipe for Debian suite '{suite}': "
                         f"known suites are {', '.join(SUITES)}")


def base_recipe_files() -> list[Path]:
    """The files whose content defines the base rootfs (the same for every suite: the
    package names exist in each)."""
    return [GUEST_DIR / "packages", GUEST_DIR / "configure-base"]


def image_recipe_files() -> list[Path]:
    """Harness files installed into the image next to the packages (they key the image
    stage, with the packages' content).

    In order: the checker, the harness agent's unit and rule.
    """
    return [GUEST_DIR / "aerate-checker", GUEST_DIR / "aerate-harness-ga.service",
            GUEST_DIR / "99-aerate-harness.rules"]


#: The packages a guest installs (the third one, aerated, is the host's).
GUEST_PACKAGES = ("python3-aerate", "aerate-agent")
#: Where the agent's package enables its unit (deb-systemd-helper, from the unit's WantedBy).
AGENT_WANTS = ("etc/systemd/system/dev-virtio\\x2dports-org.aerate.agent.0.device.wants/"
               "aerate-agent.service")


def base_key(suite: str = SUITE) -> str:
    """Cache key of the base rootfs of ``suite`` for the current recipe."""
    return recipe_hash(base_recipe_files(), f"{suite}/{VARIANT}/amd64")[:16]


def find_kernel(rootfs: Path) -> tuple[Path, Path]:
    """The (vmlinuz, initrd) pair installed in ``rootfs``'s /boot; ImageError if absent."""
    boot = rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
    if not kernels:
        raise ImageError(
            f"no kernel image (vmlinuz-*) in {boot}: the guest needs the Debian package "
            f"linux-image-amd64 (deploy/guest/packages)"
        )
    kernel = kernels[-1]
    initrd = boot / ("initrd.img-" + kernel.name[len("vmlinuz-"):])
    if not initrd.is_file():
        raise ImageError(
            f"no initramfs {initrd} for kernel {kernel}: initramfs-tools must be installed "
            f"in the guest and update-initramfs must have run"
        )
    return kernel, initrd


def build_base(dest: Path, mirror: str, suite: str = SUITE) -> None:
    """debootstrap + configure a base rootfs of Debian ``suite`` into ``dest`` (dest/rootfs,
    vmlinuz, initrd.img)."""
    debootstrap = require_tool("debootstrap", "debootstrap")
    require_tool("unshare", "util-linux")
    packages = read_package_list((GUEST_DIR / "packages").read_text())
    rootfs = dest / "rootfs"
    run_step(
        "debootstrap",
        [debootstrap, f"--variant={VARIANT}", "--arch=amd64", "--components=main",
         "--include=" + ",".join(packages), suite, str(rootfs), mirror],
        env={**os.environ, **_guest_env()},
    )
    shutil.copy2(GUEST_DIR / "configure-base", rootfs / "tmp/configure-base")
    run_step("configure-base", in_chroot(rootfs, ["/bin/sh", "/tmp/configure-base"]),
             env={**os.environ, **_guest_env()})
    kernel, initrd = find_kernel(rootfs)
    shutil.copy2(kernel, dest / "vmlinuz")
    shutil.copy2(initrd, dest / "initrd.img")
    # Debian's kernel file is 0600; qemu may run unprivileged and must read it.
    for p in (dest / "vmlinuz", dest / "initrd.img"):
        p.chmod(0o644)


def ensure_base(cache: Path | None = None, suite: str = SUITE) -> tuple[Path, str]:
    """The cached base directory of ``suite`` for the current recipe, built if missing; and
    its key."""
    check_suite(suite)
    cache = cache or cache_dir()
    key = base_key(suite)
    final = cache / f"base-{key}"
    with _locked(cache / f".base-{key}.lock"):
        if (final / "done").is_file():
            return final, key
        check_free_space(cache, BASE_SPACE_BYTES, f"the guest base rootfs ({suite})")
        mirror = suite_mirror(suite)
        tmp = cache / f"base-{key}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        started = time.monotonic()
        try:
            build_base(tmp, mirror, suite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "done").write_text(json.dumps(
            {"key": key, "suite": suite, "seconds": round(time.monotonic() - started, 1)}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return final, key


def suite_mirror(suite: str) -> str:
    """The archive URI for ``suite``: this machine's apt source for it, else the one serving
    this machine's own suite (a Debian archive carries every release), else $AERATE_MIRROR."""
    try:
        return host_apt_mirror(suite)
    except ImageError:
        return host_apt_mirror(SUITE)


def ensure_chroot(suite: str, include: Sequence[str], cache: Path | None = None) -> Path:
    """A cached ``debootstrap --variant=minbase`` tree of Debian ``suite`` with ``include``
    installed (tests copy it before changing it); built once per suite and package list."""
    cache = cache or cache_dir()
    key = recipe_hash([], f"chroot/{suite}/{VARIANT}/amd64/{','.join(sorted(include))}")[:16]
    final = cache / f"chroot-{suite}-{key}"
    with _locked(cache / f".chroot-{suite}-{key}.lock"):
        if (final / "done").is_file():
            return final / "rootfs"
        check_free_space(cache, BASE_SPACE_BYTES, f"a Debian {suite} tree")
        tmp = cache / f"chroot-{suite}-{key}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            run_step(f"debootstrap {suite}",
                     [require_tool("debootstrap", "debootstrap"), f"--variant={VARIANT}",
                      "--arch=amd64", "--components=main", "--include=" + ",".join(include),
                      suite, str(tmp / "rootfs"), suite_mirror(suite)],
                     env={**os.environ, **_guest_env()})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "done").write_text(json.dumps({"suite": suite, "include": list(include)}))
        tmp.rename(final)
    return final / "rootfs"


def install_agent(rootfs: Path, debs: dict[str, Path]) -> None:
    """Install the guest packages as an operator would (``dpkg -i``: their maintainer
    scripts run and enable the unit), then the checker and the harness agent."""
    files = image_recipe_files()
    for path in files:
        if not path.is_file():
            raise ImageError(f"missing recipe file {path}")
    checker, harness_unit, harness_rules = files
    incoming = rootfs / "tmp/aerate-debs"
    incoming.mkdir(parents=True)
    names = []
    for pkg in GUEST_PACKAGES:
        shutil.copy2(debs[pkg], incoming / debs[pkg].name)
        names.append(f"/tmp/aerate-debs/{debs[pkg].name}")
    # dpkg's postinst byte-compiles with the guest's own python (py3compile): that proves
    # the agent's syntax fits it and saves the first start from compiling under TCG.
    run_step("dpkg -i aerate-agent", in_chroot(rootfs, ["dpkg", "-i", *names]),
             env={**os.environ, **_guest_env()})
    shutil.rmtree(incoming)
    if not (rootfs / AGENT_WANTS).is_symlink():
        raise ImageError(f"the aerate-agent package did not enable its unit: no {AGENT_WANTS}")
    units = rootfs / "etc/systemd/system"
    shutil.copy2(harness_unit, units / harness_unit.name)
    shutil.copy2(harness_rules, rootfs / "etc/udev/rules.d" / harness_rules.name)
    (rootfs / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(checker, rootfs / "usr/local/bin/aerate-checker")
    (rootfs / "usr/local/bin/aerate-checker").chmod(0o755)
    run_step("enable the harness agent",
             in_chroot(rootfs, ["systemctl", "enable", harness_unit.name]),
             env={**os.environ, **_guest_env()})


def tree_bytes(root: Path) -> int:
    """Bytes taken by regular files under ``root`` (rounded up to 4 KiB each)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += (st.st_size + 4095) // 4096 * 4096
        total += 4096
    return total


def make_ext4(rootfs: Path, image: Path, key: str) -> None:
    """Pack ``rootfs`` into a sparse ext4 image file (mkfs.ext4 -d: no loop mount needed)."""
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    size = tree_bytes(rootfs) * 5 // 4 + IMAGE_HEADROOM_BYTES
    size = (size + (1 << 20) - 1) >> 20 << 20
    with open(image, "wb") as fh:
        fh.truncate(size)
    # Fixed UUID and hash seed derived from the key: the same inputs give the same file system.
    seed = hashlib.sha256(key.encode()).hexdigest()
    uuid = f"{seed[:8]}-{seed[8:12]}-{seed[12:16]}-{seed[16:20]}-{seed[20:32]}"
    hseed = f"{seed[32:40]}-{seed[40:44]}-{seed[44:48]}-{seed[48:52]}-{seed[52:64]}"
    run_step("mkfs.ext4",
             [mkfs, "-q", "-F", "-L", "aerate-root", "-U", uuid, "-E", f"hash_seed={hseed}",
              "-O", "^has_journal", "-m", "0", "-d", str(rootfs), str(image)],
             env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"})
    image.chmod(0o644)


def ensure_image(src: Path = REPO, cache: Path | None = None,
                 suite: str = SUITE) -> GuestImage:
    """The guest image of Debian ``suite`` for the working tree ``src``: built or reused from
    the cache. Every suite installs the same packages, built once on this machine."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base, bkey = ensure_base(cache, suite)
    with tempfile.TemporaryDirectory(prefix="aerate-image-", dir=cache) as tmpdir:
        tmp = Path(tmpdir)
        try:
            debs = packaging.build_packages(src, tmp / "debs")
        except packaging.PackagingError as exc:
            raise ImageError(f"building the Debian packages: {exc}") from exc
        # The checker and the harness agent are installed beside the packages: they key it too.
        extras = recipe_hash(image_recipe_files(),
                             "".join(deb_content_hash(debs[p]) for p in GUEST_PACKAGES))
        key = f"{bkey}-{extras[:16]}"
        final = cache / f"image-{key}"
        with _locked(cache / f".image-{key}.lock"):
            if not (final / "done").is_file():
                check_free_space(cache, IMAGE_SPACE_BYTES, "the guest image")
                stage = tmp / "stage"
                stage.mkdir()
                rootfs = stage / "rootfs"
                run_step("copy base rootfs",
                         ["cp", "-a", "--reflink=auto", str(base / "rootfs"), str(rootfs)])
                install_agent(rootfs, debs)
                make_ext4(rootfs, stage / "root.img", key)
                shutil.rmtree(rootfs)
                shutil.copy2(base / "vmlinuz", stage / "vmlinuz")
                shutil.copy2(base / "initrd.img", stage / "initrd.img")
                for pkg in GUEST_PACKAGES:
                    shutil.copy2(debs[pkg], stage / debs[pkg].name)
                (stage / "done").write_text(json.dumps({"key": key, "base": bkey,
                                                        "suite": suite}))
                if final.exists():
                    shutil.rmtree(final)
                stage.rename(final)
    # Mark both stages used now; stale ones of other keys go (see prune_cache).
    os.utime(final / "done")
    os.utime(base / "done")
    prune_cache([key, bkey], cache)
    image = GuestImage(
        root=final / "root.img", kernel=final / "vmlinuz", initrd=final / "initrd.img",
        key=key, build_seconds=round(time.monotonic() - started, 1), suite=suite,
    )
    image.check()
    return image


def prune_cache(current: Sequence[str], cache: Path | None = None, keep_recent: int = 4,
                max_age_s: float = 3600.0) -> list[Path]:
    """Remove stale cached images and bases; return what was removed.

    A directory goes when its key is not in ``current``, it is not among the ``keep_recent``
    most recently used of its kind, and it was last used more than ``max_age_s`` ago (another
    test session may still boot from a slightly older image).
    """
    cache = cache or cache_dir()
    removed = []
    now = time.time()
    for kind in ("image", "base"):
        dirs = [p for p in cache.glob(f"{kind}-*") if p.is_dir() and not p.name.endswith(".tmp")]
        dirs.sort(key=lambda p: _last_used(p), reverse=True)
        for p in dirs[keep_recent:]:
            key = p.name.split("-", 1)[1]
            if key in current or now - _last_used(p) < max_age_s:
                continue
            shutil.rmtree(p, ignore_errors=True)
            (cache / f".{p.name}.lock").unlink(missing_ok=True)
            removed.append(p)
    return removed


def _last_used(path: Path) -> float:
    try:
        return (path / "done").stat().st_mtime
    except OSError:
        return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aerate.deploy.image [--suite SUITE]``: build or reuse the image and print
    its paths."""
    parser = argparse.ArgumentParser(prog="python -m aerate.deploy.image",
                                     description="Build or reuse the aerate test guest image.")
    parser.add_argument("--suite", choices=SUITES, default=SUITE,
                        help=f"Debian suite of the guest (default {SUITE})")
    args = parser.parse_args(argv)
    try:
        image = ensure_image(suite=args.suite)
    except ImageError as exc:
        print(f"aerate image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({
        "root": str(image.root), "kernel": str(image.kernel), "initrd": str(image.initrd),
        "key": image.key, "suite": image.suite, "build_seconds": image.build_seconds,
        "root_allocated_mib": image.root.stat().st_blocks * 512 >> 20,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
