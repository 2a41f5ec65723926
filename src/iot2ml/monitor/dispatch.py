"""Deliver notifications in the background, retrying with exponential backoff, logging every attempt.

``Dispatcher.submit`` never blocks: it puts the notification on a bounded queue and returns; a full
queue (or a stopped dispatcher) counts what it dropped and logs each drop as a ``dropped`` delivery.
Worker threads send; a ``Transient`` failure is retried after ``backoff``, doubled each time up to
``max_backoff``, for ``attempts`` attempts; a ``Terminal`` one is not retried. Every attempt, ok or
failed, is a row of ``notification_deliveries`` (``Notifiers.record``).

``stop(timeout)`` refuses new work, lets the workers finish what is queued (retries included) for up
to ``timeout`` seconds, then logs whatever is left as dropped: nothing queued is lost silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Self

from ..core.errors import Iot2mlError, Transient
from .notifiers import Delivery, Notification, Notifier

__all__ = ["Dispatcher", "deliver"]

log = logging.getLogger("iot2ml.monitor")


def deliver(notifier: Notifier, notification: Notification, *, attempts: int = 1, backoff: float = 0.5,
            max_backoff: float = 30.0, record: Callable[[Delivery], None] | None = None,
            wait: Callable[[float], bool] | None = None) -> Delivery:
    """Send with retries; ``record`` each attempt; answer the last attempt's ``Delivery``.

    ``wait(seconds)`` sleeps between attempts and answers True to give up (a stopping dispatcher)."""
    delay = backoff
    delivery = Delivery(notifier.name, notification.group_key, "failed", 0, "not attempted")
    for attempt in range(1, max(1, attempts) + 1):
        retry = False
        try:
            delivery = replace(notifier.send(notification), attempt=attempt)
        except Iot2mlError as err:
            retry = isinstance(err, Transient)
            delivery = Delivery(notifier.name, notification.group_key, "failed", attempt, str(err))
        except Exception as err:  # a bug in a notifier: log it, never kill the worker
            log.exception("notifier %s raised", notifier.name)
            delivery = Delivery(notifier.name, notification.group_key, "failed", attempt,
                                f"{type(err).__name__}: {err}")
        if record is not None:
            _record(record, delivery)
        if delivery.ok or not retry or attempt >= attempts:
            break
        if (wait or _sleep)(delay):
            break
        delay = min(delay * 2, max_backoff)
    return delivery


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _record(record: Callable[[Delivery], None], delivery: Delivery) -> None:
    try:
        record(delivery)
    except Exception:  # the catalog is down: the attempt still happened; say so in the log
        log.warning("could not log delivery %s", delivery.to_dict(), exc_info=True)


_STOP = object()


class Dispatcher:
    """Background delivery to ``store``'s notifiers (or the ones given to ``submit``).

    ``store`` is a ``Notifiers`` (anything with ``record(delivery)`` and ``notifiers()``)."""

    def __init__(self, store: Any, *, workers: int = 2, max_queue: int = 1000, attempts: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self.store = store
        self.attempts, self.backoff, self.max_backoff = attempts, backoff, max_backoff
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._abort = threading.Event()
        self._drops: list[Delivery] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        if self._threads:
            return self
        self._closed.clear()
        self._abort.clear()
        self._threads = [threading.Thread(target=self._run, name=f"iot2ml-notify-{i}", daemon=True)
                         for i in range(self._workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> int:
        """Finish the queued work for up to ``timeout`` seconds, then stop; answer how many
        notifications were left undelivered (each logged as dropped). Safe to call twice."""
        self._closed.set()
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline and self._threads:
            time.sleep(0.01)
        self._abort.set()  # retries waiting for their backoff give up now
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            left += 1
            self._drop(item, "the dispatcher stopped before delivering it")
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        self._threads = []
        self._flush_drops()
        return left

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ work

    def submit(self, notification: Notification, to: Sequence[Notifier] | None = None) -> bool:
        """Queue ``notification`` for ``to`` (default: every stored notifier, looked up when sent).
        Answers at once: False if it was dropped (queue full or dispatcher stopped)."""
        items = [(notification, n) for n in to] if to is not None else [(notification, None)]
        accepted = True
        for item in items:
            if self._closed.is_set():
                self._drop(item, "the dispatcher is stopped")
                accepted = False
                continue
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._drop(item, f"the notification queue is full ({self._queue.maxsize})")
                accepted = False
        return accepted

    @property
    def pending(self) -> int:
        """Notifications queued or being delivered."""
        return self._queue.unfinished_tasks

    def _drop(self, item: tuple[Notification, Notifier | None], why: str) -> None:
        notification, notifier = item
        name = notifier.name if notifier is not None else "*"
        log.warning("dropped notification %s for %s: %s", notification.group_key, name, why)
        with self._lock:
            self.dropped += 1
            self._drops.append(Delivery(name, notification.group_key, "dropped", 0, why))

    def _flush_drops(self) -> None:
        with self._lock:
            drops, self._drops = self._drops, []
        for d in drops:
            _record(self.store.record, d)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._flush_drops()
                notification, notifier = item
                targets = [notifier] if notifier is not None else self._all()
                for n in targets:
                    deliver(n, notification, attempts=self.attempts, backoff=self.backoff,
                            max_backoff=self.max_backoff, record=self.store.record, wait=self._abort.wait)
            except Exception:
                log.exception("notification worker failed on one item")
            finally:
                self._queue.task_done()

    def _all(self) -> list[Notifier]:
        try:
            return list(self.store.notifiers())
        except Iot2mlError as err:
            log.warning("cannot read the notifiers: %s", err)
            return []
