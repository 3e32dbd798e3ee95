"""One generation at a time, a bounded queue, and nothing generated for a client that has left.

    queue = ModelQueue(max_queue=64, timeout=300)
    queue.admit()                                  # ApiError 429 (Retry-After) when the queue is full
    async with aclosing(queue.generate(model, tok, chat, left, outcome)) as pieces:
        async for piece in pieces:                 # waits its turn, then yields text
            ...

A 135 M model on 2 cores gains nothing from interleaving requests, so they take turns in arrival
order. The turn belongs to the generation thread, not to the request: it passes on when that thread
has finished, so two generations never share the model. A request's generation stops within one
token when its client leaves (`left` is set), when its time limit passes, or when the server shuts
down; a request still waiting is dropped from the queue at once in those cases.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque

from keel.model.generate import stream_answer
from keel.serve.api import ApiError

DONE = object()


class Gone(Exception):
    """The client left while its request waited for its turn."""


class ModelQueue:
    """The requests' turns on one model: who generates now, who waits, and the counts /health reports."""

    def __init__(self, max_queue: int, timeout: float):
        self.max_queue, self.timeout = max_queue, timeout
        self.busy = False
        self.waiters: deque[asyncio.Future] = deque()
        self.halts: set[threading.Event] = set()
        self.closing = False
        self.seconds_per_answer = 5.0  # running estimate, for Retry-After
        self.stats = Counter()

    def retry_after(self) -> dict:
        return {"Retry-After": str(max(1, math.ceil(self.seconds_per_answer * (len(self.waiters) + 1))))}

    def check_open(self):
        if self.closing:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")

    def admit(self):
        """Refuse a new request when the queue is full (429) or the server is stopping (503)."""
        self.check_open()
        if self.busy and len(self.waiters) >= self.max_queue:
            self.stats["rejected"] += 1
            raise ApiError(429, f"the server is busy: {len(self.waiters)} requests are waiting (keel deploy --max_queue); "
                           "retry later", kind="requests", code="rate_limit_exceeded", headers=self.retry_after())

    async def wait_turn(self, deadline: float, left: asyncio.Event):
        """Return once this request may generate; Gone if its client left, ApiError(503) on timeout or shutdown."""
        self.check_open()
        if not self.busy:
            self.busy = True
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiters.append(turn)
        gone = asyncio.ensure_future(left.wait())
        try:
            await asyncio.wait([turn, gone], timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: a streaming client left (Starlette tears the response down)
            self.leave(turn)
            self.stats["abandoned_waiting"] += 1
            raise
        finally:
            gone.cancel()
        if turn.done() and not turn.cancelled() and not left.is_set() and not self.closing:
            return
        self.leave(turn)
        if left.is_set():
            self.stats["abandoned_waiting"] += 1
            raise Gone
        self.check_open()
        self.stats["timed_out"] += 1
        raise ApiError(503, f"no free slot within this server's request time limit of {self.timeout:g} s "
                       "(keel deploy --request_timeout); retry later", kind="server_error", code="timeout",
                       headers=self.retry_after())

    def leave(self, turn: asyncio.Future):
        if turn.done() and not turn.cancelled():
            self.pass_turn()  # handed the turn just as it left: pass it on
        else:
            turn.cancel()
            if turn in self.waiters:
                self.waiters.remove(turn)

    def pass_turn(self):
        while self.waiters:
            turn = self.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.busy = False

    async def generate(self, model, tokenizer, chat, left: asyncio.Event, outcome: dict):
        """Wait for the turn, then yield the answer's text pieces; `outcome` gets tokens and finish_reason.

        Use it under `contextlib.aclosing` so that a caller that stops reading stops the generation.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout
        await self.wait_turn(deadline, left)
        halt, pieces, expired, torn_down = threading.Event(), asyncio.Queue(), [], []
        self.halts.add(halt)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), lambda: (expired.append(True), halt.set()))
        started = time.monotonic()

        def post(*call):
            try:
                loop.call_soon_threadsafe(*call)
            except RuntimeError:  # the event loop is closed: the server has stopped
                halt.set()

        def produce():  # the generation thread: holds the turn until the model is free again
            try:
                for piece in stream_answer(model, tokenizer, chat.messages, chat.gen, halt, outcome):
                    post(pieces.put_nowait, piece)
                post(pieces.put_nowait, DONE)
            except BaseException as e:  # surfaced to the request below
                post(pieces.put_nowait, e)
            finally:
                post(self.finish, halt, timer, started, outcome, left.is_set() or bool(torn_down))

        threading.Thread(target=produce, daemon=True, name="keel-generate").start()
        watcher = asyncio.ensure_future(left.wait())
        watcher.add_done_callback(lambda _: halt.set())
        try:
            while (piece := await pieces.get()) is not DONE:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        except asyncio.CancelledError:  # a streaming client left
            torn_down.append(True)
            self.stats["abandoned_generating"] += 1
            raise
        finally:
            watcher.cancel()
            halt.set()  # a no-op once the answer is complete; else the thread stops within a token
        if left.is_set():
            self.stats["abandoned_generating"] += 1
        elif expired or self.closing:
            outcome["finish_reason"] = "length"  # cut by --request_timeout or shutdown, as max_tokens cuts
            self.stats["timed_out" if expired else "cut_by_shutdown"] += 1

    def finish(self, halt: threading.Event, timer, started: float, outcome: dict, abandoned: bool):
        if abandoned:  # what was generated for a client that had left: one token's worth, ideally
            self.stats["abandoned_tokens"] += outcome.get("tokens", 0)
        timer.cancel()
        self.halts.discard(halt)
        self.seconds_per_answer = 0.8 * self.seconds_per_answer + 0.2 * (time.monotonic() - started)
        self.pass_turn()

    def close(self):
        """Shutting down: refuse new requests, drop the waiting ones (503), stop the running generation."""
        self.closing = True
        for turn in self.waiters:
            turn.cancel()
        for halt in list(self.halts):
            halt.set()
