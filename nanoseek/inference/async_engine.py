"""The bridge between the synchronous engine and the asyncio server: one thread runs the engine's step loop,
each step's outputs go to the waiting requests' asyncio queues on the event loop, and a request that is closed
early (client gone) has its engine requests aborted, which frees their cache blocks."""

import asyncio
import logging
import threading
import time

log = logging.getLogger("nanoseek.serve")
DISCONNECT_POLL_S = 0.25   # how often a waiting non-streaming request checks that its client is still there


class AsyncEngine:
    """The engine's step loop in one thread; outputs go to per-request asyncio queues on the event loop."""

    def __init__(self, engine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}        # request id -> its consumer (event loop thread only)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None            # set when step() raised: the engine is dead

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def add(self, request_id: str, prompt_ids: list[int], params, queue: asyncio.Queue) -> None:
        """Queue a request (RequestError at once if invalid); its outputs will arrive on `queue`."""
        self.queues[request_id] = queue
        try:
            self.engine.add_request(request_id, None, params, prompt_token_ids=prompt_ids)
        except BaseException:
            self.queues.pop(request_id, None)
            raise
        self.wake.set()

    def abort(self, request_id: str) -> None:
        if self.queues.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            self.wake.set()

    @property
    def num_active(self) -> int:
        return len(self.queues)

    def _run(self) -> None:
        while not self.stopping:
            if not self.engine.has_unfinished_requests():
                self.wake.wait(timeout=1.0)      # add() sets it after queueing, so no request waits a full second
                self.wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:            # an engine bug: fail every request, report unhealthy
                log.exception("engine step failed; the server stops serving generations")
                self.error = e
                self.loop.call_soon_threadsafe(self._fail_all, e)
                return
            if outputs:
                self.loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs) -> None:
        for out in outputs:
            queue = self.queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
                if out.finished:
                    del self.queues[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for queue in self.queues.values():
            queue.put_nowait(error)
        self.queues.clear()


class Pending:
    """The engine requests behind one HTTP request, read from their shared queue; close() aborts the rest."""

    def __init__(self, bridge: AsyncEngine, request_ids: list[str], queue: asyncio.Queue):
        self.bridge, self.queue, self.pending = bridge, queue, set(request_ids)
        self.next_check = 0.0

    async def next(self, request=None):
        """The next RequestOutput; None when all finished, or (given `request`) when the client went away."""
        from nanoseek.inference.protocol import ApiError

        while self.pending:
            # Non-streaming responses poll for a disconnect (streams are cancelled by the server instead); by the
            # clock, since outputs arrive every step and would starve a poll that waits for a quiet queue.
            if request is not None and time.monotonic() >= self.next_check:
                self.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    return None
            try:
                item = await (asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S) if request is not None
                              else self.queue.get())
            except asyncio.TimeoutError:
                continue
            if isinstance(item, BaseException):
                self.pending.clear()
                raise ApiError(500, f"the engine failed: {item!r}") from item
            if item.finished:
                self.pending.discard(item.request_id)
            return item
        return None

    async def collect(self, request) -> dict | None:
        finals = {}
        while (out := await self.next(request)) is not None:
            if out.finished:
                finals[out.request_id] = out
        return finals if not self.pending else None

    def close(self) -> None:
        for rid in self.pending:
            self.bridge.abort(rid)
        self.pending.clear()
