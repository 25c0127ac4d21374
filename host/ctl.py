"""``aeratectl``: see every VM aerated serves, and tune it live, in the habits of virsh.

    aeratectl status [VM] [--json]            one line per VM (or the full picture as JSON)
    aeratectl get VM [KEY] [--json]           each setting's value and where it came from
    aeratectl set VM KEY=VALUE... [--live] [--config]
                                              store in the VM's metadata and apply now
    aeratectl reset VM [KEY...] [--live] [--config]
                                              remove stored settings: the layer below counts
    aeratectl explain VM [--json]             why it is or is not reclaiming now
    aeratectl watch [--interval S] [--json]   status, refreshed
    aeratectl settings [--json]               every tunable with its default and meaning
    aeratectl reload                          re-read the host config file
    aeratectl completion                      bash completion (source <(aeratectl completion))

VM is a domain's name, UUID or id. --live changes the running domain only, --config its
saved definition only (a stopped VM: its definition, read at its next start); neither:
both for a running VM. --json answers follow host/ctl_schema.json.

Exit codes: 0 done; 1 refused or failed (the message says why); 2 usage error (unknown
command, key or value; nothing was sent); 3 aerated is not reachable; 4 no such VM.
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
from aerate.host.control import EXIT_CODES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NO_VM = 0, 1, 2, 3, 4


class CtlError(RuntimeError):
    """aerated cannot be reached (exit code 3); the message says how to fix it."""


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
    except ConnectionRefusedError:
        raise CtlError(f"{path}: nobody listens (aerated stopped?); start it with "
                       "systemctl start aerated") from None
    except PermissionError:
        raise CtlError(f"{path}: permission denied; run aeratectl as root") from None
    except OSError as e:
        raise CtlError(f"{path}: {e}; is aerated running? (systemctl status aerated)") from e
    if not buf:
        raise CtlError(f"{path}: aerated closed the connection without answering")
    try:
        return json.loads(buf)
    except ValueError as e:
        raise CtlError(f"{path}: the answer is not JSON ({e}); is that aerated?") from e


def _mib(n: Any) -> str:
    return "-" if not isinstance(n, int) else f"{n / (1 << 20):.0f}"


def format_status(answer: dict[str, Any]) -> str:
    """The human table of ``aeratectl status``: every VM, unmanaged ones with the reason
    and no figure, balloon VMs with the balloon's.

    VERIFIED: of the bytes discarded, those the backing file's own allocation count
    confirmed freed (host/verify.py); "-" where nothing measures it (balloon, kernel)."""
    head = (f"{'VM':<20} {'STATE':<10} {'RECLAIM':<9} {'REPORTED':>9} {'DISCARD':>9} "
            f"{'VERIFIED':>9} {'REFUSED':>9} {'BACKING':>9}  REASON")
    lines = [head]
    for vm in answer.get("vms", []):
        reclaim = vm.get("reclaim") if isinstance(vm.get("reclaim"), dict) else {}
        lines.append(
            f"{vm['vm']:<20.20} {vm.get('state', '?'):<10.10} "
            f"{vm.get('reclaimer', '-'):<9.9} "
            f"{_mib(vm.get('reported_bytes')):>9} {_mib(vm.get('discarded_bytes')):>9} "
            f"{_mib(reclaim.get('verified_bytes')):>9} "
            f"{_mib(vm.get('refused_bytes')):>9} {_mib(vm.get('backing_allocated_bytes')):>9}"
            f"  {vm.get('last_error') or vm.get('reason', '')}")
    for vm in answer.get("vms", []):
        bal = vm.get("balloon")
        if isinstance(bal, dict) and isinstance(bal.get("max_bytes"), int):
            lines.append(f"  {vm['vm']}: balloon target {_mib(bal.get('target_bytes'))}, "
                         f"actual {_mib(bal.get('actual_bytes'))}, floor "
                         f"{_mib(bal.get('floor_bytes'))} of {_mib(bal['max_bytes'])} MiB; "
                         f"holding back {_mib(bal.get('held_back_bytes'))} MiB")
        lacking = sorted(name for name, c in (vm.get("capabilities") or {}).items()
                         if not c.get("available"))
        if lacking:
            lines.append(f"  {vm['vm']}: guest kernel lacks {', '.join(lacking)} "
                         f"(aeratectl explain {vm['vm']} says why)")
        if vm.get("arena_weakness"):
            lines.append(f"  {vm['vm']}: guest arena weakness: {vm['arena_weakness']}")
        if vm.get("idle_note"):
            lines.append(f"  {vm['vm']}: {vm['idle_note']}")
        if vm.get("host_pressure") not in (None, "plenty"):
            eff = vm.get("effective")
            to = f" to hwm {eff.get('hwm')}, reserve_mib {eff.get('reserve_mib')}" \
                if isinstance(eff, dict) else ""
            lines.append(f"  {vm['vm']}: host memory level {vm['host_pressure']}: settings "
                         f"firmed up{to} (aeratectl explain shows the rest)")
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
    lines.append("(MiB; BACKING = host memory allocated to guest RAM now, '-' where aerate "
                 "has not proven the backing)")
    return "\n".join(lines)


def format_get(answer: dict[str, Any]) -> str:
    """The human table of ``aeratectl get``."""
    lines = [f"{'KEY':<26} {'VALUE':<10} {'SOURCE':<14} DETAIL"]
    for name, e in answer.get("settings", {}).items():
        value = str(e["value"]).lower() if isinstance(e["value"], bool) else str(e["value"])
        detail = e.get("detail", "")
        if "next_start" in e:
            detail += f"; next start: {e['next_start']}"
        lines.append(f"{name:<26} {value:<10} {e['source']:<14} {detail}")
    if answer.get("settings_error"):
        lines.append(f"stored settings unusable (VM refused): {answer['settings_error']}")
    return "\n".join(lines)


def format_explain(answer: dict[str, Any]) -> str:
    """``aeratectl explain``: the sentences, then every fact with its verdict."""
    lines = list(answer.get("sentences", []))
    facts = answer.get("facts") or []
    if facts:
        lines.append("Facts:")
        lines += [f"  {'ok ' if f['ok'] else 'NO '} {f['fact']}: {f['text']}" for f in facts]
    return "\n".join(lines)


def format_settings() -> str:
    """``aeratectl settings``: the table."""
    return "\n".join(f"{name:<26} {typ:<6} {default:<8} {text}"
                     for name, typ, default, text in table.describe())


def settings_json() -> list[dict[str, Any]]:
    """``aeratectl settings --json``: one object per row of agent/settings.py."""
    return [{"name": s.name, "type": s.type.__name__, "default": s.default, "scope": s.scope,
             "min": s.lo, "max": s.hi, "choices": list(s.choices), "help": s.help}
            for s in table.TABLE]


_BASH = """_aeratectl() {
    local cur=${COMP_WORDS[COMP_CWORD]} cmd=${COMP_WORDS[1]}
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "@CMDS@" -- "$cur")); return
    fi
    if [ "$COMP_CWORD" -eq 2 ]; then
        case "$cmd" in status|get|set|reset|explain)
            COMPREPLY=($(compgen -W "$(virsh -q list --all --name 2>/dev/null)" -- "$cur"));;
        esac
        return
    fi
    case "$cmd" in
        set) COMPREPLY=($(compgen -W "@ASSIGN@ --live --config" -- "$cur"))
             compopt -o nospace 2>/dev/null;;
        reset) COMPREPLY=($(compgen -W "@KEYS@ --live --config" -- "$cur"));;
        get) COMPREPLY=($(compgen -W "@ALL@ --json" -- "$cur"));;
    esac
}
complete -F _aeratectl aeratectl
"""


def bash_completion() -> str:
    """``aeratectl completion``: a bash completion script from the parser and the table
    (``set``/``reset`` offer only keys a VM's metadata may hold)."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    keys = [r.name for r in table.TABLE if r.scope != "host"]
    return (_BASH.replace("@CMDS@", " ".join(sub.choices))
            .replace("@ASSIGN@", " ".join(f"{k}=" for k in keys))
            .replace("@KEYS@", " ".join(keys))
            .replace("@ALL@", " ".join(r.name for r in table.TABLE)))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aeratectl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version="%(prog)s " + __version__)
    ap.add_argument("--run-dir", default=RUN_DIR)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="every VM's state (or one VM's)")
    st.add_argument("vm", nargs="?", metavar="VM")
    g = sub.add_parser("get", help="settings of a VM and where each came from")
    g.add_argument("vm", metavar="VM")
    g.add_argument("key", nargs="?", metavar="KEY")
    e = sub.add_parser("explain", help="why a VM is or is not reclaiming now")
    e.add_argument("vm", metavar="VM")
    se = sub.add_parser("settings", help="list tunables")
    for p in (st, g, e, se):
        p.add_argument("--json", action="store_true", help="JSON (host/ctl_schema.json)")
    keys = ", ".join(r.name for r in table.TABLE if r.scope != "host")
    s = sub.add_parser("set", help="store settings in a VM's metadata and apply them",
                       epilog=f"keys: {keys}")
    s.add_argument("vm", metavar="VM")
    s.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    r = sub.add_parser("reset", help="remove stored settings (all without KEY)",
                       epilog=f"keys: {keys}")
    r.add_argument("vm", metavar="VM")
    r.add_argument("keys", nargs="*", metavar="KEY")
    for p in (s, r):
        p.add_argument("--live", action="store_true", help="the running domain only")
        p.add_argument("--config", action="store_true",
                       help="the saved definition only (used at the next start)")
    w = sub.add_parser("watch", help="status, refreshed")
    w.add_argument("--interval", type=float, default=2.0)
    w.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")
    w.add_argument("--json", action="store_true",
                   help="one status answer (host/ctl_schema.json) per line")
    sub.add_parser("reload", help="re-read the host config file")
    sub.add_parser("completion", help="print a bash completion script "
                   "(source <(aeratectl completion))")
    return ap


def _failed(answer: Any) -> int:
    if not isinstance(answer, dict):
        print("aeratectl: aerated answered something that is not a JSON object",
              file=sys.stderr)
        return EXIT_FAILED
    if answer.get("ok"):
        return EXIT_OK
    print(f"aeratectl: {answer.get('error')}", file=sys.stderr)
    return EXIT_CODES.get(str(answer.get("code")), EXIT_FAILED)


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "settings":
        print(json.dumps(settings_json(), indent=2) if args.json else format_settings())
        return EXIT_OK
    if args.cmd == "completion":
        print(bash_completion(), end="")
        return EXIT_OK
    if args.cmd == "watch":
        n = 0
        while True:
            answer = request({"cmd": "status"}, args.run_dir)
            if args.json:
                print(json.dumps(answer), flush=True)
            else:
                print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + format_status(answer),
                      flush=True)
            n += 1
            if args.count and n >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    # reset may name a stored entry that is no setting (the daemon checks): that is how a
    # layer refused for it is repaired.
    if getattr(args, "key", None) and args.key not in table.BY_NAME:
        raise table.SettingError(f"aeratectl get: unknown setting {args.key!r}")
    req: dict[str, Any] = {"cmd": args.cmd}
    if getattr(args, "vm", None) is not None:
        req["vm"] = args.vm
    if args.cmd == "get" and args.key:
        req["key"] = args.key
    if args.cmd == "set":
        req["settings"] = table.parse_assignments(args.assignments, origin="aeratectl set")
    if args.cmd == "reset":
        req["keys"] = args.keys
    if args.cmd in ("set", "reset"):
        req.update(live=args.live, config=args.config)
    answer = request(req, args.run_dir)
    rc = _failed(answer)
    if rc != EXIT_OK:
        return rc
    if getattr(args, "json", False):
        print(json.dumps(answer, indent=2))
    elif args.cmd == "status":
        print(format_status(answer))
    elif args.cmd == "get":
        print(format_get(answer))
    elif args.cmd == "explain":
        print(format_explain(answer))
    elif args.cmd in ("set", "reset"):
        done = "removed " + (", ".join(answer.get("removed", [])) or "nothing") \
            if args.cmd == "reset" else "stored " + ", ".join(answer.get("keys", []))
        print(f"{answer['vm']}: {done}; {answer.get('note', '')}")
        for k in answer.get("keys", []):
            v = answer.get("settings", {}).get(k)
            if v is not None:
                print(f"  {k} = {str(v).lower() if isinstance(v, bool) else v}")
    else:
        print(f"reloaded {answer.get('config')}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aeratectl``; returns the exit code (module docstring)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2), or --help (0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return _run(args)
    except table.SettingError as e:
        print(f"aeratectl: {e}; nothing was sent (aeratectl settings lists the keys and "
              "bounds)", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as e:
        print(f"aeratectl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
