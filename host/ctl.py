"""``aeratectl``: see every VM aerated serves, and tune it live.

    aeratectl status [--json]          one line per VM (or the full picture as JSON)
    aeratectl watch [--interval S]     status, refreshed
    aeratectl set VM key=value ...     persist in the VM's metadata and apply now
    aeratectl settings                 every tunable with its default and meaning
    aeratectl reload                   re-read the host config file
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from aerate import __version__
from aerate.agent import settings as table
from aerate.host.config import RUN_DIR


class CtlError(RuntimeError):
    """Talking to aerated failed; the message says how to fix it."""


def request(req: dict[str, Any], run_dir: str = RUN_DIR, timeout: float = 10.0) -> Any:
    """Send one request to aerated's control socket and return its answer."""
    path = os.path.join(run_dir, "aerated.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise CtlError(f"{path} does not exist: is aerated running? "
                       "(systemctl status aerated)") from None
    except PermissionError:
        raise CtlError(f"{path}: permission denied; run aeratectl as root") from None
    except OSError as e:
        raise CtlError(f"{path}: {e}") from e
    if not buf:
        raise CtlError(f"{path}: aerated closed the connection without answering")
    return json.loads(buf)


def _mib(n: Any) -> str:
    return "-" if not isinstance(n, int) else f"{n / (1 << 20):.0f}"


def format_status(answer: dict[str, Any]) -> str:
    """The human table of ``aeratectl status``."""
    head = (f"{'VM':<20} {'STATE':<10} {'RECLAIM':<8} {'REPORTED':>9} {'DISCARD':>9} "
            f"{'REFUSED':>9} {'BACKING':>9}  REASON")
    lines = [head]
    for vm in answer.get("vms", []):
        lines.append(
            f"{vm['vm']:<20.20} {vm.get('state', '?'):<10.10} {vm.get('reclaimer', '-'):<8} "
            f"{_mib(vm.get('reported_bytes')):>9} {_mib(vm.get('discarded_bytes')):>9} "
            f"{_mib(vm.get('refused_bytes')):>9} {_mib(vm.get('backing_allocated_bytes')):>9}"
            f"  {vm.get('last_error') or vm.get('reason', '')}")
    for vm in answer.get("vms", []):
        lacking = sorted(name for name, c in (vm.get("capabilities") or {}).items()
                         if not c.get("available"))
        if lacking:
            lines.append(f"  {vm['vm']}: guest kernel lacks {', '.join(lacking)} "
                         f"(aeratectl status --json says why)")
        if vm.get("idle_note"):
            lines.append(f"  {vm['vm']}: {vm['idle_note']}")
    for vm in answer.get("vms", []):
        budget = vm.get("budget") or {}
        if isinstance(budget, dict) and budget.get("bites"):
            lines.append(f"  {vm['vm']}: {budget.get('reason')} ({budget.get('bites')} "
                         f"batches cut, {_mib(budget.get('refused_bytes'))} MiB refused)")
        calls = vm.get("libvirt_calls") or {}
        if isinstance(calls, dict) and calls.get("hung"):
            lines.append(f"  {vm['vm']}: libvirt call {calls['hung']} hung; refused until "
                         "libvirt answers")
    if len(lines) == 1:
        lines.append("(no running VMs)")
    if not answer.get("libvirt", True):
        lines.append("libvirtd is not reachable: discards are refused until it is back")
    lines.append("(MiB; BACKING = host memory allocated to guest RAM now)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aeratectl``."""
    ap = argparse.ArgumentParser(prog="aeratectl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version="%(prog)s " + __version__)
    ap.add_argument("--run-dir", default=RUN_DIR)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="every VM's state")
    st.add_argument("--json", action="store_true")
    w = sub.add_parser("watch", help="status, refreshed")
    w.add_argument("--interval", type=float, default=2.0)
    w.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")
    s = sub.add_parser("set", help="set tunables on a live VM (persisted in its metadata)",
                       epilog="keys: " + ", ".join(r.name for r in table.TABLE))
    s.add_argument("vm")
    s.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    sub.add_parser("settings", help="list tunables")
    sub.add_parser("reload", help="re-read the host config file")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "settings":
            for name, typ, default, text in table.describe():
                print(f"{name:<26} {typ:<6} {default:<8} {text}")
            return 0
        if args.cmd == "status":
            answer = request({"cmd": "status"}, args.run_dir)
            print(json.dumps(answer, indent=2) if args.json else format_status(answer))
            return 0 if answer.get("ok") else 1
        if args.cmd == "watch":
            n = 0
            while True:
                answer = request({"cmd": "status"}, args.run_dir)
                print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + format_status(answer),
                      flush=True)
                n += 1
                if args.count and n >= args.count:
                    return 0
                time.sleep(args.interval)
        if args.cmd == "set":
            values = table.parse_assignments(args.assignments, origin="aeratectl set")
            answer = request({"cmd": "set", "vm": args.vm, "settings": values}, args.run_dir)
        else:
            answer = request({"cmd": "reload"}, args.run_dir)
        if not answer.get("ok"):
            print(f"aeratectl: {answer.get('error')}", file=sys.stderr)
            return 1
        print(json.dumps(answer.get("settings", answer), indent=2))
        return 0
    except (CtlError, table.SettingError) as e:
        print(f"aeratectl: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
