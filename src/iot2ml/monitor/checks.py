"""The contract every notifier passes (river's ``checks``): call ``check_notifier`` from a test.

A kind registered in ``notifiers.KINDS`` gets it for free: ``tests/monitor/test_notifiers.py`` runs
``check_notifier`` over every kind against a real local receiver, and fails for a kind it has no
receiver for. One run checks that:

1. the notifier names its kind and its name, and its ``repr`` shows no secret of its target;
2. ``send`` of a firing notification answers an ok ``Delivery`` of that notifier and group, and the
   receiver got a message naming the alert and its summary;
3. ``send`` of the same group resolved is delivered too, and the receiver can tell it is resolved;
4. the same kind pointed at a receiver that is down raises ``Transient`` (worth retrying), not
   another error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..core.errors import Transient
from .notifiers import KINDS, Notification, Notifier, masked_target, test_notification

__all__ = ["Receive", "check_notifier"]

Receive = Callable[[], str]
"""``receive()``: the text of the next message the receiver got (waiting a few seconds), else raise."""


def check_notifier(notifier: Notifier, receive: Receive, *, down: Notifier | None = None,
                   secret: str | None = None) -> None:
    """Run the contract on ``notifier``, whose messages ``receive`` reads; ``down`` is the same kind
    aimed at a closed port; ``secret`` a part of the target that must never be shown."""
    assert notifier.kind in KINDS and isinstance(notifier, KINDS[notifier.kind]), f"{notifier!r}: kind not in KINDS"
    assert notifier.name, f"{notifier!r} has no name"
    if secret:
        assert secret not in repr(notifier), f"repr {notifier!r} shows the secret"
        assert secret not in masked_target(notifier.kind, notifier.target), "masked target shows the secret"

    firing = test_notification("contract")
    delivery = notifier.send(firing)
    assert delivery.ok and delivery.notifier == notifier.name and delivery.group_key == firing.group_key, delivery
    got = receive()
    assert "Iot2mlTest" in got, f"{notifier.kind}: the receiver got no alert name: {got[:300]!r}"
    assert "this notifier works" in got, f"{notifier.kind}: the receiver got no summary: {got[:300]!r}"

    resolved = Notification(alerts=tuple(replace(a, status="resolved", ends_at=a.starts_at) for a in firing.alerts),
                            receiver=firing.receiver, group_labels=firing.group_labels)
    assert resolved.group_key == firing.group_key
    assert notifier.send(resolved).ok
    got = receive()
    assert "resolved" in got.lower(), f"{notifier.kind}: a resolved group does not say so: {got[:300]!r}"

    if down is not None:
        try:
            down.send(firing)
        except Transient:
            pass
        else:
            raise AssertionError(f"{down!r}: a receiver that is down did not raise Transient")
