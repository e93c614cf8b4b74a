"""The consumer's post-processing thread (image check, PNG, blob store: skillgen/safety/postprocess.py), in
priority order.

One thread, so the checks and PNG encoding of one batch overlap the next batch on the GPU and take at most one
core. Under a flood that thread is busy all the time (a full batch's post-processing takes about as long as the
batch), and a quiet team's batch that preempts the flood (consumer/gpu.py `_preempt`) would otherwise share the
CPU and the GIL with it while it runs, then wait behind it. So:

- urgent work (a preempting batch's flights) goes before everything queued, first in first out among itself;
- while a preempting batch runs, and until its own post-processing is queued (`pause()` .. `resume()`), no
  other work starts: what is in progress finishes, the rest waits. The flood's results are late by one small
  batch; the quiet team's batch runs on a CPU nobody else is filling, and its images are next.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future


class PostQueue:
    def __init__(self, name: str = "postprocess"):
        self._cv = threading.Condition()
        self._queue: list[tuple[int, int, Future, Callable, tuple]] = []  # (0 urgent / 1 normal, seq, ...)
        self._seq = itertools.count()
        self._held = 0
        self._closed = False
        # Seconds one piece of work takes once started (a moving average; the wait before it is not counted):
        # part of every ETA (consumer/gpu.py).
        self.run_s = 0.0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, urgent: bool = False) -> Future:
        """`fn(*args)` on the post-processing thread; its result (or exception) in the future."""
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the post-processing queue is shut down")
            self._queue.append((0 if urgent else 1, next(self._seq), fut, fn, args))
            self._queue.sort(key=lambda item: item[:2])
            self._cv.notify()
        return fut

    def pause(self) -> None:
        """From now until as many `resume()`s, only urgent work starts."""
        with self._cv:
            self._held += 1

    def resume(self) -> None:
        with self._cv:
            self._held -= 1
            self._cv.notify()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While inside, only urgent work starts."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def __len__(self) -> int:
        with self._cv:
            return len(self._queue)

    def shutdown(self) -> None:
        """Stop after the work in progress; what is queued is cancelled."""
        with self._cv:
            self._closed = True
            for _, _, fut, _, _ in self._queue:
                fut.cancel()
            self._queue.clear()
            self._cv.notify()

    def _next(self) -> tuple[Future, Callable, tuple] | None:
        with self._cv:
            while True:
                if self._closed:
                    return None
                if self._queue and (self._queue[0][0] == 0 or not self._held):
                    _, _, fut, fn, args = self._queue.pop(0)
                    return fut, fn, args
                self._cv.wait()

    def _work(self) -> None:
        while (item := self._next()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            self.run_s = 0.7 * self.run_s + 0.3 * (time.perf_counter() - t0)
