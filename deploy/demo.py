"""The demo: a guest frees memory and you watch the host get it back.

    ./deploy/demo [--mib 1024] [--backing memfd|hugetlbfs] [--keep]

Builds (or reuses) the guest image (which installs the aerate-agent Debian package built
from this checkout, as an operator would), starts aerated from this checkout with its own run
directory, boots a VM under libvirt, lets a process in the guest touch and free memory,
and prints the host memory backing the guest's RAM, read from the kernel, as it goes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from aerate.deploy.image import ImageError, ensure_image
from aerate.deploy.scenario import Aerated, Hog, ScenarioError, aerated, wait_for
from aerate.deploy.vm import HarnessError, booted
from aerate.host.ctl import format_status

MiB = 1 << 20


def _backing(d: Aerated, name: str) -> int:
    v = d.vm(name).get("backing_allocated_bytes")
    return int(v) if isinstance(v, int) else 0


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deploy/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="memory the guest touches and frees")
    ap.add_argument("--memory-mib", type=int, default=2048, help="guest RAM")
    ap.add_argument("--backing", default="memfd", choices=("memfd", "hugetlbfs"))
    ap.add_argument("--watch", type=float, default=60.0, help="seconds to watch after the free")
    args = ap.parse_args(argv)
    try:
        say("guest image: building or reusing (first build takes a few minutes)")
        image = ensure_image()
        say(f"guest image {image.key} ready")
        say(f"booting a {args.memory_mib} MiB guest with {args.backing} shared RAM")
        with tempfile.TemporaryDirectory(prefix="aerate-demo-") as tmp, \
                booted(image, backing=args.backing, memory_mib=args.memory_mib) as g:
            with aerated(Path(tmp), "[defaults]\nreserve_mib = 128\nstats_interval_s = 1\n",
                         ("--vm", g.name)) as d:
                say(f"aerated running (control socket {tmp}/aerated.sock)")
                say(f"{g.name} ({g.spec.domain_type}) ready in "
                    f"{g.timings['boot_to_ready']:.0f} s; aerate-agent active")
                wait_for(lambda: d.vm(g.name).get("state") == "running", 120,
                         "the aerate session")
                say("first pass: the agent reports the guest's free memory once")
                wait_for(lambda: ((d.vm(g.name).get("guest") or {}).get("engine") or {})
                         .get("phase") == "idle" and d.vm(g.name).get("batches", 0) > 0,
                         600, "the first pass", 2)
                before = _backing(d, g.name)
                say(f"host memory backing the guest: {before / MiB:.0f} MiB")
                hog = Hog(g, args.mib, hold_s=3)
                hog.start()
                peak = _backing(d, g.name)
                say(f"guest touched {args.mib} MiB: backing {peak / MiB:.0f} MiB")
                freed = hog.join()
                say(f"guest freed {args.mib} MiB; watching the host get it back")
                while (t := time.monotonic() - freed) < args.watch:
                    now = _backing(d, g.name)
                    back = peak - now
                    bar = "#" * int(40 * max(0, back) / (args.mib * MiB))
                    print(f"  +{t:4.0f} s  backing {now / MiB:6.0f} MiB  returned "
                          f"{back / MiB:5.0f} MiB  {bar}", flush=True)
                    if back >= 0.95 * args.mib * MiB:
                        break
                    time.sleep(2)
                print()
                print(format_status(d.status()))
                back = peak - _backing(d, g.name)
                say(f"{back / MiB:.0f} MiB of the {args.mib} MiB freed in the guest came "
                    "back to the host")
    except (ImageError, HarnessError, ScenarioError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
