"""Per-VM ordered, timed libvirt calls off the daemon's loop thread (S8).

Every blocking call the daemon makes for a VM (libvirt RPCs, the QMP/HMP round trips of a
map build, /proc reads of QEMU's smaps) goes through that VM's :class:`VmWorker`:

- **Off the loop**: the call runs on a thread of one shared, bounded
  ``ThreadPoolExecutor``; the loop thread only awaits its future, so the acks of every other
  VM keep flowing while one VM's libvirt call is stuck.
- **Per-VM order**: a VM has at most one call on the pool at a time; its calls run in the
  order they were made (an ``asyncio.Lock`` is FIFO), each waiting for the one in progress
  within its own timeout (a 1 s status read behind a hanging 5 s query gives up after its
  second, with CallTimeout, not after the query's five). A call that timed out still occupies
  its thread until libvirt answers (a libvirt call cannot be cancelled), so the VM's next
  call first waits, within its own timeout, for that one to finish; if it is still hung,
  the next call fails at once with the same kind of error instead of taking a second
  thread. Hence a hung VM holds at most **one** pool thread, whatever it is asked.
- **One call in libvirtd per VM**, together with the runner's background refresh (which
  runs outside this worker, host/daemon.py): a worker call first waits, within its timeout,
  for a refresh of the same VM still running (``outside``), and the refresh does not start
  while a worker call is running (``busy``): a hung VM pins one pool thread and one of
  libvirtd's workers, not two (host/daemon.py, "libvirt's request limit").
- **Timeouts**: every call has one; on expiry the caller gets :class:`CallTimeout`
  ("libvirt call <name> timed out after N s") and treats that VM as refused; the late
  answer, when it comes, is dropped (its future's result is consumed and discarded).

Why a bounded pool with per-VM queues and not a thread per VM: at 1,000 VMs a thread per
VM is 1,000 stacks and 1,000 threads contending for the GIL for calls that each take a
millisecond; the pool keeps a few threads busy (``POOL_THREADS``) and its size only has to
exceed the number of VMs hung *at the same time*, because each hung VM pins one thread. If
libvirtd itself hangs, every VM's calls hang and every VM is refused anyway; when more VMs
than ``POOL_THREADS`` hang at once, the calls of the others queue behind them and time
out too, which refuses them (safe, and visible in status with the reason), never blocks the
loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aerate.host import journal

log = logging.getLogger("aerated.worker")

T = TypeVar("T")

#: Threads shared by all VMs' blocking calls. libvirt's Python binding releases the GIL
#: while it waits for libvirtd, so a few threads serve hundreds of calls a second.
POOL_THREADS = 16
#: Default timeout of one call, seconds. libvirt itself holds a call up to 30 s while a
#: domain job runs; long before that we would rather refuse than keep a stale PUNCH.
CALL_TIMEOUT = 5.0


class CallTimeout(RuntimeError):
    """A blocking call for one VM did not answer in time; that VM is refused meanwhile."""


def new_pool(threads: int = POOL_THREADS) -> concurrent.futures.ThreadPoolExecutor:
    """The one pool every VM worker of a daemon shares."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                 thread_name_prefix="aerated-call")


def _drop_late(fut: asyncio.Future[Any]) -> None:
    # The caller gave up on this answer; read the outcome so asyncio does not log
    # "exception was never retrieved" for a call nobody waits for any more.
    if not fut.cancelled():
        fut.exception()


class VmWorker:
    """Ordered, timed, off-loop calls for one VM (see the module docstring)."""

    def __init__(self, vm: str, pool: concurrent.futures.Executor,
                 timeout: float = CALL_TIMEOUT) -> None:
        self.vm = vm
        self.pool = pool
        self.timeout = timeout
        self._order = asyncio.Lock()
        #: The call that timed out and still holds a pool thread: (name, future, started).
        self._hung: tuple[str, asyncio.Future[Any], float] | None = None
        self._running = ""  # the call that holds (or last held) the order
        #: The call on the pool now (None between calls).
        self._on_pool: asyncio.Future[Any] | None = None
        #: A call for this VM made outside this worker that is still running, if any (the
        #: runner's background refresh): the next worker call waits for it.
        self.outside: Callable[[], concurrent.futures.Future[Any] | None] = lambda: None
        self.calls = 0
        self.timeouts = 0
        self.last_timeout = ""

    @property
    def hung(self) -> str:
        """Name of a call that timed out and has not returned yet ('' when none)."""
        if self._hung is not None and self._hung[1].done():
            self._hung = None
        return self._hung[0] if self._hung is not None else ""

    @property
    def busy(self) -> bool:
        """Whether a libvirt call of this VM is on the pool now (running, or timed out and
        not returned yet)."""
        return bool(self.hung) or (self._on_pool is not None and not self._on_pool.done())

    async def call(self, name: str, fn: Callable[..., T], *args: Any,
                   timeout: float | None = None, libvirt: bool = True) -> T:
        """Run ``fn(*args)`` on the pool after this VM's earlier calls; its result.

        Raises :class:`CallTimeout` when it (or a hung earlier call it must wait for) takes
        longer than ``timeout`` (default: the worker's), else whatever ``fn`` raised.
        ``libvirt=False``: ``fn`` asks libvirt nothing (QEMU's /proc, a record file), so it
        neither waits for the VM's running refresh nor makes the refresh wait.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        # The wait for the VM's call in progress counts against this call's timeout too: a
        # status read (1 s) behind a balloon query that hangs for the default 5 s fails
        # after its own second, not after the other call's five.
        try:
            await asyncio.wait_for(self._order.acquire(), limit)
        except asyncio.TimeoutError:  # noqa: UP041 (3.9, 3.10: not the builtin)
            self.timeouts += 1
            raise CallTimeout(
                f"libvirt call {name} not started: the earlier call {self._running} for VM "
                f"{self.vm} still runs after {limit:g} s") from None
        try:
            self._running = name
            return await self._call(name, fn, args, limit, deadline, libvirt)
        finally:
            self._order.release()

    async def _wait_before(self, name: str, fut: asyncio.Future[Any], deadline: float,
                           why: Callable[[], str]) -> None:
        """Wait until ``fut`` (another call of this VM) ends, at most until ``deadline``;
        CallTimeout saying ``why()`` (this call is not started) when it does not."""
        done, _ = await asyncio.wait({fut}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            self.timeouts += 1
            raise CallTimeout(f"libvirt call {name} not started: {why()}")

    async def _call(self, name: str, fn: Callable[..., T], args: tuple[Any, ...],
                    limit: float, deadline: float, libvirt: bool) -> T:
        if self._hung is not None:
            hung_name, hung_fut, started = self._hung
            # The late answer itself is dropped (_drop_late); only its end matters.
            await self._wait_before(name, hung_fut, deadline, lambda: (
                f"the earlier call {hung_name} for VM {self.vm} is still hung after "
                f"{time.monotonic() - started:.0f} s"))
            self._hung = None
        other = self.outside() if libvirt else None
        if other is not None and not other.done():
            # The refresh is asking libvirt for this VM right now (about a millisecond,
            # unless this VM's QEMU does not answer): wait, do not ask beside it.
            await self._wait_before(name, asyncio.wrap_future(other), deadline, lambda: (
                f"this VM's permit refresh (job_info) is still hung after {limit:g} s"))
        self.calls += 1
        fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        if libvirt:
            self._on_pool = fut
        left = max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), left)
        except asyncio.TimeoutError:  # noqa: UP041 (3.9, 3.10: not the builtin)
            fut.add_done_callback(_drop_late)
            self._hung = (name, fut, deadline - limit)
            self.timeouts += 1
            self.last_timeout = f"libvirt call {name} timed out after {limit:g} s"
            # A refusal of the VM (journal fields); the host-wide worker ("(host)")
            # concerns no VM.
            fields = {} if self.vm.startswith("(") else journal.event("refusal", VM=self.vm)
            log.warning("VM %s: %s; refusing it until libvirt answers", self.vm,
                        self.last_timeout, extra=fields)
            raise CallTimeout(self.last_timeout) from None
        except asyncio.CancelledError:
            # The caller went away (its runner stopped); the thread may still run, so
            # the VM's next call must wait for it like for a timed-out one.
            if not fut.done():
                fut.add_done_callback(_drop_late)
                self._hung = (name, fut, deadline - limit)
            raise
