"""The demo: a guest frees memory and you watch the host get it back.

    ./deploy/demo [--mib 1024] [--backing memfd|hugetlbfs] [--no-references] [--png PATH]

Builds (or reuses) the guest image (which installs the aerate-agent Debian package built
from this checkout, as an operator would), starts aerated from this checkout with its own run
directory, boots a VM under libvirt, lets a process in the guest touch and free memory,
and prints the host memory backing the guest's RAM, read from the kernel, as it goes.

Then, unless ``--no-references``, the same on two fresh guests of the same shape: one with
the kernel's own free page reporting (virtio-balloon ``freePageReporting='on'``, no aerate)
and one with no reclaim at all. It ends with the three side by side, in a table and in a
PNG chart (``--png``, default ``aerate-demo.png`` in the current directory; it needs the
demo's optional extra, matplotlib, which deploy/setup-host installs). The figure of every
guest is its RAM memfd's allocation (``st_blocks``), read from the host kernel, the same
for all three; with ``--backing hugetlbfs`` the references are skipped (the kernel's
reporting does not discard hugetlbfs-backed RAM) and the figure is aerated's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from aerate.deploy.chart import ChartUnavailable, write_png
from aerate.deploy.image import GuestImage, ImageError, ensure_image
from aerate.deploy.scenario import (
    Aerated,
    Hog,
    ScenarioError,
    aerated,
    ram_allocated,
    steady_of,
    wait_for,
)
from aerate.deploy.vm import Guest, HarnessError, booted
from aerate.host.ctl import format_status

MiB = 1 << 20
AERATE, KERNEL, NOTHING = "aerate", "kernel free page reporting", "no reclaim"
#: Seconds after the free at which the table reads each curve.
MARKS = (5, 10, 20)
#: Seconds between two samples of the host figure while a trial runs.
SAMPLE_S = 0.5
#: A watch ends early only after this long: once 95 % is back, or once the curve has
#: moved less than SETTLED_MIB over the last SETTLED_S (no reclaim: nothing will come).
MIN_WATCH_S = 20.0
SETTLED_S, SETTLED_MIB = 10.0, 8


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


@dataclass
class Trial:
    """One guest's curve: (monotonic time, bytes behind its RAM), and when it freed."""

    mode: str
    mib: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    freed_at: float = 0.0
    baseline: int = 0
    peak: int = 0

    def curve(self) -> list[tuple[float, float]]:
        """(seconds since the free, MiB behind the RAM), from the hog's start."""
        return [(t - self.freed_at, b / MiB) for t, b in self.samples]

    def returned_at(self, second: float) -> float | None:
        """MiB given back (peak minus now) ``second`` s after the free, if watched so long."""
        after = [(t - self.freed_at, b) for t, b in self.samples if t >= self.freed_at]
        if not after or after[-1][0] < second - 1:
            return None
        upto = [b for t, b in after if t <= second]
        return (self.peak - (upto[-1] if upto else after[0][1])) / MiB

    def time_to(self, share: float) -> float | None:
        """Seconds after the free until ``share`` of the freed memory was back, or None."""
        target = self.peak - share * self.mib * MiB
        return next((t - self.freed_at for t, b in self.samples
                     if t >= self.freed_at and b <= target), None)


@contextmanager
def sampling(trial: Trial, read: Callable[[], int]) -> Iterator[None]:
    """Read ``read()`` every SAMPLE_S seconds into ``trial.samples`` while the body runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            # A failed read: the guest is going away; the curve ends here.
            with suppress(OSError, ScenarioError):
                trial.samples.append((time.monotonic(), read()))
            stop.wait(SAMPLE_S)

    t = threading.Thread(target=run, name="demo-sampler", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


def free_and_watch(g: Guest, trial: Trial, read: Callable[[], int], watch: float,
                   live: bool) -> None:
    """Touch and free ``trial.mib`` MiB in the guest, then watch ``read()`` for ``watch``
    seconds, or until 95 % of it is back or the curve has settled (after MIN_WATCH_S, so
    that the chart shows where each curve ends up)."""
    with sampling(trial, read):
        hog = Hog(g, trial.mib, hold_s=3)
        hog.start()
        trial.peak = read()
        say(f"{trial.mode}: guest touched {trial.mib} MiB: host backs "
            f"{trial.peak / MiB:.0f} MiB")
        trial.freed_at = hog.join()
        say(f"{trial.mode}: guest freed {trial.mib} MiB; watching the host get it back")
        shown = -10.0
        seen: list[tuple[float, int]] = []
        while (t := time.monotonic() - trial.freed_at) < watch:
            back = trial.peak - read()
            seen.append((t, back))
            if live or t - shown >= 10:
                bar = "#" * int(40 * max(0, back) / (trial.mib * MiB))
                print(f"  +{t:4.0f} s  backing {(trial.peak - back) / MiB:6.0f} MiB  "
                      f"returned {back / MiB:5.0f} MiB  {bar}", flush=True)
                shown = t
            if t >= MIN_WATCH_S:
                earlier = [b for u, b in seen if u <= t - SETTLED_S]
                settled = bool(earlier) and abs(back - earlier[-1]) < SETTLED_MIB * MiB
                if back >= 0.95 * trial.mib * MiB or settled:
                    break
            time.sleep(2 if live else SAMPLE_S)
        time.sleep(2 * SAMPLE_S)   # the sampler's last point is the end of the watch


def aerate_trial(image: GuestImage, args: argparse.Namespace) -> Trial:
    trial = Trial(AERATE, args.mib)
    say(f"booting a {args.memory_mib} MiB guest with {args.backing} shared RAM")
    with tempfile.TemporaryDirectory(prefix="aerate-demo-") as tmp, \
            booted(image, backing=args.backing, memory_mib=args.memory_mib,
                   name_prefix="aerate-demo") as g:
        with aerated(Path(tmp), "[defaults]\nreserve_mib = 128\nstats_interval_s = 1\n",
                     ("--vm", g.name)) as d:
            say(f"aerated running (control socket {tmp}/aerated.sock)")
            say(f"{g.name} ({g.spec.domain_type}) ready in "
                f"{g.timings['boot_to_ready']:.0f} s; aerate-agent active")
            wait_for(lambda: d.vm(g.name).get("state") == "running", 120,
                     "the aerate session")
            say("first pass: the agent reports the guest's free memory once")
            wait_for(lambda: d.pass_over(g.name), 600, "the first pass", 2)
            read = host_figure(g, d, args.backing)
            trial.baseline = read()
            say(f"host memory backing the guest: {trial.baseline / MiB:.0f} MiB")
            free_and_watch(g, trial, read, args.watch, live=True)
            print()
            print(format_status(d.status()))
    return trial


def host_figure(g: Guest, d: Aerated, backing: str) -> Callable[[], int]:
    """Bytes behind the guest's RAM: the memfd's st_blocks from the host kernel; for
    hugetlbfs (no memfd) aerated's reading of the backing file."""
    if backing == "memfd":
        return lambda: ram_allocated(g)

    def from_daemon() -> int:
        v = d.vm(g.name).get("backing_allocated_bytes")
        return int(v) if isinstance(v, int) else 0
    return from_daemon


def reference_trial(image: GuestImage, mode: str, args: argparse.Namespace) -> Trial:
    """The same guest shape and free without aerated: the kernel's reporting, or nothing."""
    trial = Trial(mode, args.mib)
    say(f"reference, {mode}: booting a fresh {args.memory_mib} MiB guest")
    with booted(image, backing="memfd", memory_mib=args.memory_mib, name_prefix="aerate-demo",
                free_page_reporting=mode == KERNEL) as g:
        # No aerated serves this guest: its agent waits for a session that never comes and
        # reports nothing, so the kernel's reporting (or nothing) is all there is.
        trial.baseline = steady_of(lambda: ram_allocated(g), 4.0, 120.0)
        say(f"reference, {mode}: host memory backing the guest: "
            f"{trial.baseline / MiB:.0f} MiB")
        free_and_watch(g, trial, lambda: ram_allocated(g), args.watch, live=False)
    return trial


def table(trials: list[Trial]) -> str:
    """The trials side by side: MiB back at each mark, time to half and 90 %."""
    def fmt(v: float | None, unit: str) -> str:
        return "-" if v is None else f"{v:.0f}{unit}" if unit == " MiB" else f"{v:.1f}{unit}"

    rows = [("", *[t.mode for t in trials])]
    rows.append(("host memory before (MiB)", *[f"{t.baseline / MiB:.0f}" for t in trials]))
    rows.append(("after the touch (MiB)", *[f"{t.peak / MiB:.0f}" for t in trials]))
    for m in MARKS:
        rows.append((f"returned {m} s after the free", *[fmt(t.returned_at(m), " MiB")
                                                        for t in trials]))
    for share in (0.5, 0.9):
        rows.append((f"time to {share:.0%} back", *[fmt(t.time_to(share), " s")
                                                   for t in trials]))
    width = max(len(r[0]) for r in rows) + 2
    col = max(len(c) for r in rows for c in r[1:]) + 3
    return "\n".join(r[0].ljust(width) + "".join(c.rjust(col) for c in r[1:]) for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deploy/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="memory the guest touches and frees")
    ap.add_argument("--memory-mib", type=int, default=2048, help="guest RAM")
    ap.add_argument("--backing", default="memfd", choices=("memfd", "hugetlbfs"))
    ap.add_argument("--watch", type=float, default=60.0, help="seconds to watch after the free")
    ap.add_argument("--no-references", action="store_true",
                    help="aerate only: skip the kernel-reporting and no-reclaim guests")
    ap.add_argument("--png", type=Path, default=Path("aerate-demo.png"),
                    help="where the chart goes (default: aerate-demo.png here)")
    args = ap.parse_args(argv)
    try:
        say("guest image: building or reusing (first build takes a few minutes)")
        image = ensure_image()
        say(f"guest image {image.key} ready")
        trials = [aerate_trial(image, args)]
        first = trials[0]
        back = (first.peak - min((b for t, b in first.samples if t >= first.freed_at),
                                 default=first.peak)) / MiB
        say(f"{back:.0f} MiB of the {args.mib} MiB freed in the guest came back to the host")
        if args.no_references or args.backing != "memfd":
            if args.backing != "memfd":
                say("references skipped: the kernel's free page reporting does not discard "
                    "hugetlbfs-backed RAM")
            return 0
        trials += [reference_trial(image, mode, args) for mode in (KERNEL, NOTHING)]
    except (ImageError, HarnessError, ScenarioError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    print()
    print(table(trials))
    try:
        path = write_png(args.png, {t.mode: t.curve() for t in trials},
                         f"A {args.memory_mib} MiB guest frees {args.mib} MiB: host memory "
                         "behind it", args.mib)
        say(f"chart: {path.resolve()}")
    except ChartUnavailable as e:
        say(f"demo: {e}")
    except OSError as e:
        say(f"demo: the chart could not be written to {args.png}: {e.strerror}; give "
            "--png a writable path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
