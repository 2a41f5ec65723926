"""A lean ordered reader of a JetStream stream (ack none, flow control, heartbeats).

nats-py's ordered consumer answers flow-control requests from a task that polls every 0.25 s and
parses every message's metadata on the event loop; under load the server waits on those answers.
This reader answers flow control at once (or holds the answer while its owner's buffer is full:
that is the backpressure), checks the delivery sequence for gaps, and recreates the consumer from
the last stream sequence it saw after a gap or a silent connection. Each message is handed on as
``(reply, subject, data)``; the reply subject carries the stream sequence and broker timestamp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("iot2ml.ingest")


def _seqs(reply: str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) from a JetStream ack subject."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    return int(tokens[7]), int(tokens[8])


class OrderedReader:
    """Delivers every message of ``stream`` from ``start_seq`` on, in order, to ``on_message``."""

    def __init__(
        self,
        nc,  # noqa: ANN001 - nats.aio.client.Client
        *,
        stream: str,
        subject: str,
        start_seq: int,
        on_message: Callable[[str, str, bytes], None],
        heartbeat: float = 2.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.subject = subject
        self.on_message = on_message
        self.heartbeat = heartbeat
        self.next_sseq = max(1, start_seq)  # first stream sequence still wanted
        self._cseq = 0
        self._sub = None
        self._consumer: str | None = None
        self._paused = False
        self._held_fc: str | None = None
        self._last_activity = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._resetting = False

    async def start(self) -> None:
        await self._create()
        self._watchdog = asyncio.create_task(self._watch())

    async def _create(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        old_sub, old_consumer = self._sub, self._consumer
        inbox = self.nc.new_inbox()
        self._cseq = 0
        self._sub = await self.nc.subscribe(inbox, cb=self._handle, pending_msgs_limit=-1, pending_bytes_limit=-1)
        config = ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_sseq,
            ack_policy=AckPolicy.NONE,
            filter_subject=self.subject,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
            max_deliver=1,
        )
        info = await self.nc.jetstream()._jsm.add_consumer(self.stream, config=config)
        self._consumer = info.name
        self._last_activity = time.monotonic()
        if old_sub is not None:
            await old_sub.unsubscribe()
        if old_consumer is not None:
            try:
                await self.nc.jetstream()._jsm.delete_consumer(self.stream, old_consumer)
            except Exception:  # noqa: BLE001 - it expires by itself (inactive_threshold)
                pass

    async def _reset(self, why: str) -> None:
        if self._resetting:
            return
        self._resetting = True
        try:
            log.info("recreating the stream consumer at sequence %d: %s", self.next_sseq, why)
            await self._create()
        except Exception as err:  # noqa: BLE001 - the watchdog tries again
            log.warning("could not recreate the stream consumer: %s", err)
        finally:
            self._resetting = False

    async def _handle(self, msg) -> None:  # noqa: ANN001
        if msg.sid != self._sub._id:
            return  # a late message of a replaced consumer
        self._last_activity = time.monotonic()
        if not msg.data and msg.headers and msg.headers.get("Status") == "100":
            reply = msg.reply or msg.headers.get("Nats-Consumer-Stalled")
            if reply:  # flow control request (or a heartbeat saying the consumer is stalled)
                if self._paused:
                    self._held_fc = reply
                else:
                    await self.nc.publish(reply)
            return
        sseq, cseq = _seqs(msg.reply)
        if cseq != self._cseq + 1:
            await self._reset(f"delivery {cseq} after {self._cseq}")
            return
        self._cseq = cseq
        self.next_sseq = sseq + 1
        self.on_message(msg.reply, msg.subject, msg.data)

    def pause(self) -> None:
        """Hold flow-control answers: the server stops sending after its window."""
        self._paused = True

    async def resume(self) -> None:
        self._paused = False
        held, self._held_fc = self._held_fc, None
        if held:
            await self.nc.publish(held)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not self._paused and time.monotonic() - self._last_activity > 3 * self.heartbeat:
                await self._reset("no heartbeat")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        if self._consumer is not None:
            try:
                await self.nc.jetstream()._jsm.delete_consumer(self.stream, self._consumer)
            except Exception:  # noqa: BLE001
                pass
