"""S5 with a real hostile guest: root in the guest stops the agent and speaks to the port.

The hostile program (below, run in the guest by its python3) answers the daemon's sync
correctly, so it gets a real session, and lies in its hello as root can (it claims pages are
not poisoned, so the reclaimer is decided punch: only the range checks stand between its
reports and a discard). Then it sends one attack per session: malformed JSON, a giant line,
a range outside the guest's RAM, a misaligned range, a replayed batch, a flood, a report
under a stale lease token, a well-formed report of a page holding data. Each attack names
memory the program holds (2 MiB hugetlb pages, one per forbidden range, zeroes like the
agent's pages but for the data page), so a discard there would show: the host reads the
hostile VM's memfd (lseek SEEK_DATA/SEEK_HOLE at each page's offset, not through aerated's
map) and the program re-reads the data page. One page (``own[0]``), named by the well-formed
reports the daemon may serve, is the control: it must be discarded, which shows the
measurement sees a punch. The daemon must carry on and keep serving a second, honest VM,
which runs aerate-checker all along.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aerate import __version__
from aerate.deploy.image import GuestImage
from aerate.deploy.scenario import (
    Aerated,
    MiB,
    aerated,
    allocated_in,
    checker_result,
    start_checker,
    wait_for,
)
from aerate.deploy.vm import Guest, booted

pytestmark = [pytest.mark.vm, pytest.mark.fault]
T = TypeVar("T")

HOSTILE = r'''
import json, os, select, sys, time
port = os.open("/dev/virtio-ports/org.aerate.agent.0", os.O_RDWR)
buf = b""

def next_sync(wait):
    """The next sync within ``wait`` seconds, or None."""
    global buf
    end = time.time() + wait
    while True:
        while b"\xff" in buf:
            buf = buf[buf.index(b"\xff") + 1:]
            line, sep, rest = buf.partition(b"\n")
            if not sep:
                buf = b"\xff" + buf
                break
            buf = rest
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "sync":
                return msg
        left = end - time.time()
        if left <= 0:
            return None
        r, _, _ = select.select([port], [], [], min(left, 1))
        if r:
            buf += os.read(port, 65536)

def establish(timeout=90):
    """Get a session the way the real agent does: ask (need-sync) while none exists, answer
    every sync with its hello, and settle on the last one (a late ask can cause a re-sync)."""
    end = time.time() + timeout
    sync = None
    while time.time() < end:
        if sync is None:
            os.write(port, b"\xff" + json.dumps({"proto": 2, "type": "need-sync"}).encode()
                     + b"\n")
        got = next_sync(3 if sync is not None else 8)
        if got is None:
            if sync is not None:
                return sync
            continue
        sync = got
        # The lie: "my pages are not poisoned", so the host decides punch.
        send({"proto": 2, "type": "hello", "nonce": sync["nonce"], "session": sync["session"],
              "agent": "hostile", "capabilities": {"poison_safe": {
                  "available": True, "detail": "a hostile root says so"}}}, sync=True)
    raise SystemExit("no session from the host")

def write_all(data):
    # Read what the host sends meanwhile (acks, keepalives), as an agent does: a port
    # nobody reads stops the host's writes, and then its reads.
    global buf
    while data:
        r, w, _ = select.select([port], [port], [], 1)
        if r:
            buf += os.read(port, 65536)
        if w:
            data = data[os.write(port, data):]

def next_msg(want, wait):
    """The next message from the host that ``want(msg)`` accepts, or None after ``wait`` s."""
    global buf
    end = time.time() + wait
    while time.time() < end:
        while b"\n" in buf:
            line_, _, buf = buf.partition(b"\n")
            try:
                msg = json.loads(line_.rpartition(b"\xff")[2])
            except ValueError:
                continue
            if isinstance(msg, dict) and want(msg):
                return msg
        r, _, _ = select.select([port], [], [], 1)
        if r:
            buf += os.read(port, 65536)
    return None

def fresh_token(session, wait=20):
    """Ask for a fresh lease token (need-token) and return it, as the agent does."""
    send({"proto": 2, "type": "need-token", "session": session})
    msg = next_msg(lambda m: m.get("session") == session and isinstance(m.get("token"), int),
                   wait)
    if msg is None:
        raise SystemExit("no lease token from the host")
    return msg["token"]

def await_ack(session, batch, wait=60):
    """The host's ack of ``batch`` (its JSON), or None after ``wait`` seconds."""
    return next_msg(lambda m: m.get("type") == "ack" and m.get("session") == session
                    and m.get("batch") == batch, wait)

def send(obj, sync=False):
    write_all((b"\xff" if sync else b"") + json.dumps(obj).encode() + b"\n")

def line(s, batch, ranges):
    # The lease token of the session's sync: fresh for the attacks, stale for "stale_token".
    return json.dumps({"proto": 2, "type": "report", "session": s, "batch": batch,
                       "token": token[0], "ranges": ranges}).encode() + b"\n"

def report(s, batch, ranges):
    write_all(line(s, batch, ranges))

G = 2 << 20
# Every report names memory this program owns (2 MiB hugetlb pages, isolated the way the
# agent does it), so what the daemon rightly discards is nobody else's, and each forbidden
# range has a page of its own that must stay whole. They hold zeroes, as the agent's pages
# do (the kernel clears a hugetlb page when it is allocated): the daemon only discards
# what reads as zeroes, and a page with data in it would be refused for that alone, so the
# checks of each attack would not be what stopped it. A discard of a zero page shows in the
# memfd (a hole where the page was backed). The one page with data is the "nonzero"
# attack's: a well-formed report of it must be refused by the content check.
import ctypes
from aerate.agent.arena import HugetlbArena
from aerate.agent.hugetlb import SurplusBudget
PAGES = 10
DATA = 9
arena = HugetlbArena(PAGES, SurplusBudget("/run/aerate-hostile"))
blocks = arena.fill(PAGES)
assert len(blocks) == PAGES, "could not isolate %d hugetlb pages" % PAGES
own = [b.phys_addr for b in blocks]
ctypes.memset(arena._base + blocks[DATA].offset, 0x5A, G)
#: own[0] is what the well-formed reports the daemon may serve name (the control);
#: FORBIDDEN[attack] are the pages a report of that attack names that must stay whole.
FORBIDDEN = {"control": [], "tseg": [], "malformed": [1], "giant_line": [2],
             "outside_ram": [3], "misaligned": [4, 5], "replay": [6], "flood": [7],
             "stale_token": [8], "nonzero": [DATA]}
#: A range the caller names (AERATE_TSEG=start:length): q35's TSEG SMRAM, say.
TSEG = [int(x, 0) for x in os.environ.get("AERATE_TSEG", "0:0").split(":")]
acks = {}
attacks = {
    # Not an attack: one well-formed report of the control page, to see it served.
    "control": lambda s: (report(s, 1, [[own[0], G]]), acks.update(control=await_ack(s, 1))),
    "tseg": lambda s: (report(s, 1, [TSEG]), acks.update(tseg=await_ack(s, 1))),
    # A well-formed report right behind the broken line: the session is over, not served.
    "malformed": lambda s: write_all(b"{this is not json\n" + line(s, 1, [[own[1], G]])),
    "giant_line": lambda s: write_all(b"[" + b"1," * 40000 + b"1]\n"
                                      + line(s, 1, [[own[2], G]])),
    # The page in RAM goes with the one outside it: the report is refused whole.
    "outside_ram": lambda s: report(s, 1, sorted([[own[3], G], [1 << 40, G]])),
    "misaligned": lambda s: report(s, 1, sorted([[own[4], G], [own[5] + 4096, G]])),
    "replay": lambda s: (report(s, 5, [[own[0], G]]), time.sleep(1), report(s, 5, [[own[6], G]])),
    # The last report comes after the flood ended the session.
    "flood": lambda s: ([report(s, b, [[own[0], G]]) for b in range(1, 399)],
                        report(s, 399, [[own[7], G]])),
    "stale_token": lambda s: (time.sleep(3), report(s, 1, [[own[8], G]])),
    # Well-formed and fresh, but the page holds data: not what an agent reports.
    "nonzero": lambda s: (report(s, 1, [[own[DATA], G]]), acks.update(nonzero=await_ack(s, 1))),
}
token = [0]
done = {}
for name in sys.argv[1:]:
    sync = establish()
    s = sync["session"]
    # A fresh token for the attacks; the sync's own is stale by now (the settle above).
    token[0] = sync["token"] if name == "stale_token" else fresh_token(s)
    attacks[name](s)
    done[name] = s
    time.sleep(1)
# Let the host read the memfd first, while the pages are held and untouched since (reading
# a discarded page here would fault a fresh one into the memfd); then see what they hold (a
# discarded page reads back as zeroes).
with open("/run/aerate-hostile.json.tmp", "w") as f:
    json.dump({"own": own, "forbidden": {k: v for k, v in FORBIDDEN.items() if k in done},
               "sessions": done, "acks": acks}, f)
os.rename("/run/aerate-hostile.json.tmp", "/run/aerate-hostile.json")
end = time.time() + 300
while not os.path.exists("/run/aerate-hostile.go") and time.time() < end:
    time.sleep(0.2)
intact = {i: ctypes.string_at(arena._base + b.offset, G) == bytes([0x5A if i == DATA else 0]) * G
          for i, b in enumerate(blocks)}
arena.release(arena.held())
arena.close()
print(json.dumps({"sessions": done, "intact": intact}))
'''

#: Run first: a report the daemon serves, so the checks below can fail.
CONTROL = ["control"]
ATTACKS = ["malformed", "giant_line", "outside_ram", "misaligned", "replay", "flood"]
#: Not attacks that end a session: a report under a stale lease token is refused (the
#: honest guest whose report waited behind a slow daemon keeps its session), not punched;
#: so is one of a page that does not read as zeroes (host/punch.py's content check).
REFUSED = ["stale_token", "nonzero"]


@pytest.fixture(scope="module")
def two_guests(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Aerated, Guest, Guest]]:
    run = tmp_path_factory.mktemp("aerated-hostile")
    shape: dict[str, Any] = {"backing": "memfd", "memory_mib": 1024}
    with booted(guest_image, name_prefix="aerate-bad", **shape) as bad, \
            booted(guest_image, name_prefix="aerate-good", **shape) as good, \
            aerated(run, "[defaults]\nhwm = 8\nstats_interval_s = 1\n",
                    ("--vm", bad.name, "--vm", good.name)) as d:
        for g in (bad, good):
            wait_for(lambda g=g: d.vm(g.name).get("state") == "running", 300,
                     f"a session with {g.name}")
        yield d, bad, good


def run_hostile(guest: Guest, attacks: Sequence[str], measure: Callable[[dict[str, Any]], T],
                env: Sequence[str] = ()) -> tuple[dict[str, Any], T, dict[str, Any]]:
    """Stop the agent, run HOSTILE with ``attacks`` in ``guest`` and, once they are done
    and while the program still holds its pages, call ``measure`` with what it wrote (its
    pages ``own``, ``acks``...). Returns that, what ``measure`` returned, and the program's
    last line (``sessions``, ``intact``: each page's pattern as read back afterwards)."""
    guest.check("systemctl stop aerate-agent; "
                "rm -f /run/aerate-hostile.json /run/aerate-hostile.go")
    result: dict[str, Any] = {}

    def hostile() -> None:
        result["run"] = guest.run(["env", *env, "python3", "-c", HOSTILE, *attacks],
                                  timeout=600)

    thread = threading.Thread(target=hostile, name="hostile", daemon=True)
    thread.start()
    try:
        wait_for(lambda: guest.run("test -e /run/aerate-hostile.json", 30)[0] == 0
                 or not thread.is_alive(), 600, "the hostile program's attacks")
        assert thread.is_alive(), f"the hostile program ended early: {result.get('run')}"
        seen: dict[str, Any] = json.loads(guest.check("cat /run/aerate-hostile.json"))
        measured = measure(seen)
    finally:
        guest.run("touch /run/aerate-hostile.go", 30)
        thread.join(120)
    rc, out, err = result["run"]
    assert rc == 0, err
    return seen, measured, json.loads(out.strip().splitlines()[-1])


def test_hostile_guest_is_cut_off_and_nothing_is_discarded(
        two_guests: tuple[Aerated, Guest, Guest], tmp_path: Path) -> None:
    d, bad, good = two_guests
    before = d.vm(bad.name)
    good_before = d.vm(good.name)
    # The honest VM verifies its memory all along, freeing and reusing chunks it reports.
    start_checker(good, mib=192, duration=90, churn=2)
    # Read from the host while the program still holds its pages: bytes of each page that
    # the memfd still holds (a punch leaves a hole).
    seen, held, end = run_hostile(
        bad, [*CONTROL, *ATTACKS, *REFUSED],
        lambda seen: [allocated_in(bad, gpa, 2 * MiB) for gpa in seen["own"]])
    assert sorted(end["sessions"]) == sorted(CONTROL + ATTACKS + REFUSED)
    intact = end["intact"]
    print(f"hostile pages held by the host (MiB): {[h / MiB for h in held]}; "
          f"intact in the guest: {intact}; acks: {seen['acks']}")
    # Every forbidden range, one by one: not a byte discarded, as the host sees the memfd
    # (and, for the page with data, as the guest reads it back; a zero page reads the same
    # discarded or not).
    for attack, pages in seen["forbidden"].items():
        for i in pages:
            assert held[i] == 2 * MiB, (
                f"{attack}: page {i} at gpa {seen['own'][i]:#x}: only "
                f"{held[i]} of {2 * MiB} bytes left in the memfd")
            assert intact[str(i)], f"{attack}: page {i} does not read back what it held"
    nonzero = seen["acks"]["nonzero"]
    assert nonzero and nonzero["discarded"] == 0 and nonzero["refused"] == 2 * MiB, nonzero
    assert sorted(seen["forbidden"]) == sorted(CONTROL + ATTACKS + REFUSED)
    # The control: a well-formed report was served, and the measurement saw it.
    control = seen["acks"]["control"]
    assert control and control["discarded"] == 2 * MiB, control
    assert held[0] == 0, (
        f"the control page own[0] was discarded ({control}) but the memfd still holds "
        f"{held[0]} bytes of it: the checks above cannot see a discard")
    wait_for(
        lambda: (v := d.vm(bad.name)).get("errors", 0) >= before.get("errors", 0) + len(ATTACKS)
        and v, 120, "the daemon to close every hostile session")
    log = d.log_text()
    for needles in (("malformed line",), ("longer than",), ("not inside this VM's RAM",),
                    ("aligned",), ("replayed",), ("flood", "batches in flight"),
                    ("refused: lease token",), ("does not read as zeroes",)):
        assert any(n in log for n in needles), f"daemon log lacks {needles!r}"
    assert d.proc.poll() is None, "aerated died"
    good_after = d.vm(good.name)
    assert good_after["state"] == "running"
    assert good_after["sessions"] == good_before["sessions"], "the honest VM lost its session"
    assert good_after["errors"] == 0
    checked = checker_result(good)
    print(f"honest VM: checker {checked}; discarded "
          f"{good_before['discarded_bytes'] >> 20} -> {good_after['discarded_bytes'] >> 20} MiB")
    assert checked["corrupted"] == 0, checked
    assert good_after["discarded_bytes"] > good_before["discarded_bytes"], (
        "the honest VM's checker memory was never discarded: its checker proved nothing")


def test_the_real_agent_gets_its_session_back(two_guests: tuple[Aerated, Guest, Guest]) -> None:
    d, bad, _ = two_guests
    bad.check("systemctl start aerate-agent")
    # The reclaimer is decided again with the real agent's hello (a moment after it).
    vm = wait_for(lambda: (v := d.vm(bad.name)).get("state") == "running"
                  and v.get("agent") == __version__ and v.get("reclaimer") == "punch" and v, 120,
                  "the real agent's session, decided punch with its hello")
    assert vm["reclaimer"] == "punch"
