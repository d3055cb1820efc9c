"""One line to the model, first come first served, for the chat UI and the /v1 API alike.

A local model generates one answer at a time. Every request (a UI message, an API call)
takes a place in this line when it arrives. The place at the front is let through to the
engine, whose generation loop starts it the moment the current answer has ended. The
others wait and know their position ("2nd in line"). A place leaves the line
when its generation starts; it no longer counts as generating once its answer has ended
(or its request is gone).

    place = line.join("ui")                  # LineFull when too many are waiting
    async for position in place.waiting():   # 2, 1 ... until it is at the front
        show(position)
    stream = runner.stream(..., on_reading=place.reading_files)  # waits for the engine if it is busy
    place.started(stream)
    ...
    place.leave()                            # always, in a finally: idempotent

A request whose documents, audio or video are being read (the engine reads them before the
request joins its generation loop: seconds for a long PDF, and says so: `on_reading`) doesn't
hold up those behind it: while it reads, the next one is let through too, and is answered
meanwhile.

With a backend that serves many answers at once (an OpenAI-compatible server), every place
is let through at once: the line then only counts who is waiting and refuses the excess.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class LineFull(Exception):
    """Too many requests are already waiting. The message is meant for the user."""


class WaitingLine:
    def __init__(self, *, one_at_a_time, max_waiting: int, max_waiting_per_kind: dict | None = None):
        """one_at_a_time: a bool, or a function asked each time (a model that loads later
        may batch, and then nobody waits for another's answer)."""
        self._one_at_a_time = one_at_a_time
        self.max_waiting = max_waiting
        self.max_waiting_per_kind = max_waiting_per_kind or {}
        self._lock = threading.Lock()
        self._waiting: list[Place] = []    # arrival order; not generating yet
        self._generating: dict = {}        # stream -> place, until its answer ends

    def join(self, kind: str) -> "Place":
        """A place at the back of the line; raises LineFull when the line is full."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise LineFull(f"The server is busy: the line is full ({len(self._waiting)} requests "
                               f"waiting for the model). Try again shortly.")
            limit = self.max_waiting_per_kind.get(kind)
            if limit is not None and sum(p.kind == kind for p in self._waiting) >= limit:
                raise LineFull(f"The server is busy: the line for {kind.upper()} requests is full "
                               f"({limit} waiting). Try again shortly.")
            place = Place(self, kind)
            self._waiting.append(place)
            return place

    @property
    def one_at_a_time(self) -> bool:
        value = self._one_at_a_time
        return bool(value() if callable(value) else value)

    @property
    def waiting(self) -> int:
        """Requests that have not started generating (the one at the front included)."""
        return len(self._waiting)

    @property
    def engine_busy(self) -> bool:
        """An answer is generating, so the front of the line waits for it to end."""
        return self.one_at_a_time and bool(self._generating)

    def stream_finished(self, stream) -> None:
        """A runner finish listener: the answer has ended, the engine is free for the next."""
        with self._lock:
            self._generating.pop(stream, None)

    def _position(self, place: "Place") -> int:
        """1-based place among those not generating yet, not counting those ahead that are
        reading their files; 0 once started or gone."""
        with self._lock:
            try:
                ahead = self._waiting[:self._waiting.index(place)]
            except ValueError:
                return 0
            return 1 + sum(not other.reading for other in ahead)

    def _reading(self, place: "Place") -> None:
        with self._lock:
            place.reading = True
        self._moved()

    def _start(self, place: "Place", stream) -> None:
        """Its (first or next: a tool loop generates again) answer has started."""
        with self._lock:
            if place.gone:  # it left (Stop, client gone) before it could start
                return
            was_waiting = place in self._waiting
            if was_waiting:
                self._waiting.remove(place)
            if self.one_at_a_time and stream is not None and stream.finish_reason is None:  # not over yet
                self._generating[stream] = place
        if was_waiting:
            self._moved()

    def _leave(self, place: "Place") -> None:
        with self._lock:
            place.gone = True
            was_waiting = place in self._waiting
            if was_waiting:
                self._waiting.remove(place)
            for stream, holder in list(self._generating.items()):
                if holder is place:
                    del self._generating[stream]
        if was_waiting:  # the places behind it move up
            self._moved()
        place._notify()  # (its own wait ends)

    def _moved(self) -> None:
        with self._lock:
            places = list(self._waiting)
        for place in places:
            place._notify()


class Place:
    def __init__(self, line: WaitingLine, kind: str):
        self.line = line
        self.kind = kind
        self.joined_at = time.perf_counter()  # the request's arrival (GenerationSettings.arrived_at)
        self.gone = False  # left the line for good
        self.reading = False  # let through, its files being read: those behind it go ahead
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    @property
    def position(self) -> int:
        return self.line._position(self)

    @property
    def at_front(self) -> bool:
        position = self.position
        return position == 1 or (position > 0 and not self.line.one_at_a_time)

    async def waiting(self, recheck_s: float | None = None):
        """Yields the place's position whenever it changes (and every recheck_s, so the
        caller can give up, e.g. when its client is gone) until it is at the front."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        shown = None
        while not self.at_front and self.position:
            position = self.position
            if position != shown or recheck_s is not None:
                shown = position
                yield position
            with contextlib.suppress(asyncio.TimeoutError):  # (not TimeoutError before 3.11)
                await asyncio.wait_for(self._changed.wait(), recheck_s)
            self._changed.clear()

    def reading_files(self) -> None:
        """It has been let through and its files are being read before it can start (the
        engine says so: runner.stream's on_reading): the next in line may go ahead meanwhile."""
        self.line._reading(self)

    def started(self, stream=None) -> None:
        """Its generation has started: it leaves the line, the next one moves to the front."""
        self.line._start(self, stream)

    def leave(self) -> None:
        """Done or given up (Stop, an error, the client gone): out of the line for good."""
        self.line._leave(self)

    def _notify(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is None or changed is None:
            return
        with contextlib.suppress(RuntimeError):  # its event loop has closed
            loop.call_soon_threadsafe(changed.set)
