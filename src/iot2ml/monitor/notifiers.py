"""Notifiers: where an alert goes. Every kind shares one verb, ``send(notification) -> Delivery``.

A ``Notification`` is one Alertmanager-style group of alerts (status, labels, annotations), so a
receiver written for Prometheus Alertmanager reads ours unchanged:

=============  ==================================================================================
``webhook``    POST of the Alertmanager webhook v4 body (``version: "4"``, ``groupKey``, ``alerts``)
``slack``      a Slack incoming webhook: ``text`` plus one coloured attachment
``email``      plain text over SMTP (``smtp://``, ``smtps://``, ``?starttls=1``, ``user:pass@``), with
               Alertmanager's default subject ``[FIRING:2] alertname ...``
``apprise``    any Apprise URL (the long tail of services); needs ``pip install 'iot2ml[apprise]'``
=============  ==================================================================================

``make_notifier(kind, target, **options)`` builds one. A failed send raises ``Transient`` (connection
refused, timeout, 429, 5xx: worth retrying) or ``Terminal`` (any other refusal); the dispatcher's
retry loop decides by type. httpx is imported when a notifier is made, smtplib and apprise when one
sends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from ..core.errors import ConfigError, InvalidInput, Terminal, Transient
from .rules import fingerprint, rfc3339

__all__ = [
    "KINDS", "Alert", "AppriseNotifier", "Delivery", "EmailNotifier", "Notification", "Notifier", "SlackNotifier",
    "WebhookNotifier", "make_notifier", "masked_options", "masked_target", "test_notification",
]

_PLAIN = ("starttls", "from")  # query keys of an SMTP URL that are no secret
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_COLOURS = {"resolved": "#2eb886", "critical": "#d00000", "error": "#d00000", "warning": "#daa038",
            "info": "#439fe0"}


def check_name(name: str) -> str:
    """A notifier name: letters, digits, '-', '_', up to 64."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"notifier name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' "
                           "(starting with a letter or digit)")
    return name


@dataclass(frozen=True)
class Alert:
    """One alert of a group: ``labels`` name it (``alertname`` at least), ``annotations`` explain it."""

    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    status: str = "firing"
    starts_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    ends_at: datetime | None = None  # None while firing
    generator_url: str = ""
    fingerprint: str = ""  # default: Alertmanager's FNV-1a fingerprint of the labels (rules.fingerprint)

    def __post_init__(self) -> None:
        if self.status not in ("firing", "resolved"):
            raise InvalidInput(f"alert status {self.status!r} is not 'firing' or 'resolved'")
        if not self.labels.get("alertname"):
            raise InvalidInput(f"alert labels {self.labels!r} have no 'alertname': every alert needs one")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.labels))

    def to_webhook(self) -> dict[str, Any]:
        return {"status": self.status, "labels": dict(self.labels), "annotations": dict(self.annotations),
                "startsAt": rfc3339(self.starts_at),
                "endsAt": rfc3339(self.ends_at if self.status == "resolved" else None),
                "generatorURL": self.generator_url, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Notification:
    """One group of alerts sent together, as Alertmanager groups them. ``status`` is ``firing`` if
    any alert fires. ``common_*`` default to what every alert shares; ``group_key`` to the group labels.
    ``at`` (when the grouper made it) and ``repeat`` (only the repeat interval made it: nothing changed
    in the group) are the grouper's bookkeeping, not part of the webhook body."""

    alerts: tuple[Alert, ...]
    receiver: str = "iot2ml"
    group_labels: dict[str, str] = field(default_factory=dict)
    common_labels: dict[str, str] | None = None
    common_annotations: dict[str, str] | None = None
    status: str = ""
    external_url: str = ""
    group_key: str = ""
    truncated_alerts: int = 0
    at: float | None = None
    repeat: bool = False

    def __post_init__(self) -> None:
        alerts = tuple(self.alerts)
        if not alerts:
            raise InvalidInput("a notification needs at least one alert")
        object.__setattr__(self, "alerts", alerts)
        if not self.status:
            status = "firing" if any(a.status == "firing" for a in alerts) else "resolved"
            object.__setattr__(self, "status", status)
        if self.common_labels is None:
            object.__setattr__(self, "common_labels", _common([a.labels for a in alerts]))
        if self.common_annotations is None:
            object.__setattr__(self, "common_annotations", _common([a.annotations for a in alerts]))
        if not self.group_key:
            pairs = ", ".join(f'{k}="{v}"' for k, v in sorted(self.group_labels.items()))
            object.__setattr__(self, "group_key", "{}:{" + pairs + "}")

    @property
    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.status == "firing"]

    @property
    def resolved(self) -> list[Alert]:
        return [a for a in self.alerts if a.status == "resolved"]

    def to_webhook(self) -> dict[str, Any]:
        """The Alertmanager webhook body, version 4."""
        return {"version": "4", "groupKey": self.group_key, "truncatedAlerts": self.truncated_alerts,
                "status": self.status, "receiver": self.receiver, "groupLabels": dict(self.group_labels),
                "commonLabels": dict(self.common_labels or {}),
                "commonAnnotations": dict(self.common_annotations or {}),
                "externalURL": self.external_url, "alerts": [a.to_webhook() for a in self.alerts]}

    @property
    def subject(self) -> str:
        """Alertmanager's default subject: ``[FIRING:2] <group label values> (<other common label values>)``."""
        head = f"[{self.status.upper()}" + (f":{len(self.firing)}]" if self.status == "firing" else "]")
        group = self.group_labels or {"alertname": self.alerts[0].labels["alertname"]}
        words = [head, *(v for _, v in sorted(group.items()))]
        rest = {k: v for k, v in (self.common_labels or {}).items() if k not in group}
        if rest:
            words.append("(" + " ".join(v for _, v in sorted(rest.items())) + ")")
        return " ".join(words)

    def text(self) -> str:
        """A plain-text body: each alert with its labels and annotations."""
        lines: list[str] = []
        for title, alerts in (("Firing", self.firing), ("Resolved", self.resolved)):
            if not alerts:
                continue
            lines.append(f"{title} alerts: {len(alerts)}")
            for a in alerts:
                lines.append("")
                lines.append(f"- {a.labels['alertname']} since {rfc3339(a.starts_at)}")
                summary = a.annotations.get("summary") or a.annotations.get("description")
                if summary:
                    lines.append(f"  {summary}")
                lines.append("  labels: " + ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items())))
                for k, v in sorted(a.annotations.items()):
                    lines.append(f"  {k}: {v}")
                if a.generator_url:
                    lines.append(f"  source: {a.generator_url}")
            lines.append("")
        if self.external_url:
            lines.append(f"See {self.external_url}")
        return "\n".join(lines).rstrip() + "\n"


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    first, *others = maps
    return {k: v for k, v in first.items() if all(m.get(k) == v for m in others)}


def test_notification(receiver: str = "iot2ml") -> Notification:
    """What ``iot2ml notifiers test`` sends: one firing alert named ``Iot2mlTest``."""
    alert = Alert(labels={"alertname": "Iot2mlTest", "severity": "info"},
                  annotations={"summary": "A test notification from iot2ml: this notifier works."})
    return Notification(alerts=(alert,), receiver=receiver, group_labels={"alertname": "Iot2mlTest"})


test_notification.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver a notification: ``status`` is ``ok``, ``failed`` or ``dropped``."""

    notifier: str
    group_key: str
    status: str
    attempt: int = 1
    error: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    detail: str = ""  # what the receiver answered

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"notifier": self.notifier, "group_key": self.group_key, "status": self.status,
                "attempt": self.attempt, "error": self.error, "at": rfc3339(self.at), "detail": self.detail}


# --------------------------------------------------------------------------- the kinds


class Notifier:
    """A place to send notifications. Subclasses set ``kind`` and implement ``send``."""

    kind: ClassVar[str] = ""

    def __init__(self, target: str, *, name: str | None = None, timeout: float = 10.0) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
            raise InvalidInput(f"timeout {timeout!r} is not a number of seconds between 0 and 300")
        if name is not None:
            check_name(name)
        self.target = target
        self.name = name or self.kind
        self.timeout = float(timeout)

    def send(self, notification: Notification) -> Delivery:
        """Deliver ``notification``; raise ``Transient`` or ``Terminal`` if the receiver did not take it."""
        raise NotImplementedError

    def _ok(self, notification: Notification, detail: str = "") -> Delivery:
        return Delivery(self.name, notification.group_key, "ok", detail=detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {masked_target(self.kind, self.target)!r})"


def _check_http_url(kind: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{kind} URL {masked_target(kind, url)!r} is not an http(s):// URL with a host")
    return url


class _HTTPNotifier(Notifier):
    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(_check_http_url(self.kind, target), **kwargs)

    def _post(self, notification: Notification, body: dict[str, Any]) -> Delivery:
        import httpx

        shown = masked_target(self.kind, self.target)
        try:
            r = httpx.post(self.target, content=json.dumps(body).encode(), timeout=self.timeout,
                           headers={"Content-Type": "application/json", "User-Agent": "iot2ml"})
        except httpx.TimeoutException as err:
            raise Transient(f"{self.kind} {self.name} ({shown}) did not answer within {self.timeout:g}s") from err
        except httpx.HTTPError as err:
            raise Transient(f"{self.kind} {self.name} ({shown}) cannot be reached: {err}") from err
        answer = r.text[:200].strip()
        if r.status_code == 429 or r.status_code >= 500:
            raise Transient(f"{self.kind} {self.name} ({shown}) answered {r.status_code}: {answer}")
        if r.status_code >= 400:
            raise Terminal(f"{self.kind} {self.name} ({shown}) refused the notification with {r.status_code}: "
                           f"{answer} (check the URL)")
        return self._ok(notification, f"{r.status_code} {answer}".strip())


class WebhookNotifier(_HTTPNotifier):
    """POSTs the Alertmanager webhook v4 JSON body to ``target``."""

    kind = "webhook"

    def send(self, notification: Notification) -> Delivery:
        return self._post(notification, notification.to_webhook())


class SlackNotifier(_HTTPNotifier):
    """A Slack incoming webhook: ``text`` (the subject) and one attachment coloured by status/severity."""

    kind = "slack"

    def body(self, notification: Notification) -> dict[str, Any]:
        severity = (notification.common_labels or {}).get("severity", "")
        colour = _COLOURS["resolved"] if notification.status == "resolved" else _COLOURS.get(severity, "#d00000")
        fields = [{"title": k, "value": v, "short": True}
                  for k, v in sorted((notification.common_labels or {}).items()) if k != "alertname"]
        return {"text": notification.subject,
                "attachments": [{"color": colour, "title": notification.subject, "text": notification.text(),
                                 "fields": fields, "fallback": notification.subject}]}

    def send(self, notification: Notification) -> Delivery:
        return self._post(notification, self.body(notification))


class EmailNotifier(Notifier):
    """Plain-text e-mail to ``target`` (an address, or several separated by commas) through ``smtp``:
    ``smtp://host:25``, ``smtps://user:password@host:465``, ``smtp://host:587?starttls=1``;
    ``sender`` (or ``?from=``) defaults to ``iot2ml@<host>``."""

    kind = "email"

    def __init__(self, target: str, *, smtp: str | None = None, sender: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.to = [a.strip() for a in target.split(",") if a.strip()]
        if not self.to or not all(re.fullmatch(r"[^@\s]+@[^@\s]+", a) for a in self.to):
            raise InvalidInput(f"e-mail address {target!r} is not an address like ops@example.com")
        if not isinstance(smtp, str | None) or not isinstance(sender, str | None):
            raise InvalidInput(f"smtp {smtp!r} and sender {sender!r} must be text: smtp://host:25, ops@example.com")
        if not smtp:
            raise InvalidInput(f"e-mail notifier {self.name} needs an SMTP server: --smtp smtp://host:25")
        self.smtp = smtp
        parts = urlsplit(smtp)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise InvalidInput(f"SMTP URL {masked_target('webhook', smtp)!r} is not smtp://host:port or "
                               "smtps://host:port")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.host = parts.hostname
        self.tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.tls else 25)
        self.starttls = query.get("starttls", "0").lower() in ("1", "true", "yes")
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.sender = sender or query.get("from") or f"iot2ml@{self.host}"

    def message(self, notification: Notification) -> Any:
        from email.message import EmailMessage
        from email.utils import formatdate, make_msgid

        msg = EmailMessage()
        msg["Subject"] = notification.subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="iot2ml")
        msg.set_content(notification.text())
        return msg

    def send(self, notification: Notification) -> Delivery:
        import smtplib

        where = f"SMTP server {self.host}:{self.port}"
        try:
            cls = smtplib.SMTP_SSL if self.tls else smtplib.SMTP
            with cls(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.user:
                    smtp.login(self.user, self.password or "")
                refused = smtp.send_message(self.message(notification), from_addr=self.sender, to_addrs=self.to)
        except smtplib.SMTPAuthenticationError as err:
            raise Terminal(f"{where} refused the login of {self.user!r}: {err.smtp_error!r} (check the user and "
                           "password in --smtp)") from err
        except smtplib.SMTPNotSupportedError as err:
            raise Terminal(f"{where} does not support {err} (drop the user:password or ?starttls=1 "
                           "from --smtp)") from err
        except smtplib.SMTPRecipientsRefused as err:
            raise Terminal(f"{where} refused every recipient {', '.join(err.recipients)}") from err
        except smtplib.SMTPResponseException as err:
            text = f"{where} answered {err.smtp_code} {err.smtp_error!r}"
            raise (Transient(text) if 400 <= err.smtp_code < 500 else Terminal(text)) from err
        except TimeoutError as err:
            raise Transient(f"{where} did not answer within {self.timeout:g}s") from err
        except (OSError, smtplib.SMTPException) as err:
            raise Transient(f"{where} cannot be reached: {err}") from err
        detail = f"refused {', '.join(refused)}" if refused else f"accepted for {', '.join(self.to)}"
        return self._ok(notification, detail)


class AppriseNotifier(Notifier):
    """Any service Apprise knows (``tgram://``, ``mailto://``, ``json://host/path``, ...): title is the
    subject, body the text. ``apprise`` is imported here: ``pip install 'iot2ml[apprise]'``."""

    kind = "apprise"

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        apprise = _apprise()
        self._apprise = apprise.Apprise()
        if not self._apprise.add(target):
            raise InvalidInput(f"Apprise URL {masked_target(self.kind, target)!r} is not one Apprise knows: see "
                               "https://github.com/caronc/apprise/wiki for the URL of each service")

    def send(self, notification: Notification) -> Delivery:
        apprise = _apprise()
        kind = apprise.NotifyType.SUCCESS if notification.status == "resolved" else apprise.NotifyType.FAILURE
        with apprise.LogCapture(level=apprise.logging.WARNING) as logs:
            sent = self._apprise.notify(title=notification.subject, body=notification.text(), notify_type=kind)
            said = logs.getvalue().strip().replace("\n", "; ")
        if not sent:  # Apprise does not say whether a retry would help: count it as worth one
            raise Transient(f"apprise {self.name} ({masked_target(self.kind, self.target)}) did not deliver: "
                            f"{said or 'no reason given'}")
        return self._ok(notification, "delivered")


def _apprise() -> Any:
    try:
        import apprise
    except ImportError as err:
        raise ConfigError("Apprise notifiers need the apprise package: pip install 'iot2ml[apprise]'") from err
    return apprise


KINDS: dict[str, type[Notifier]] = {
    cls.kind: cls for cls in (WebhookNotifier, SlackNotifier, EmailNotifier, AppriseNotifier)
}
"""Every kind of notifier, by the name ``make_notifier`` takes."""


def make_notifier(kind: str, target: str, **options: Any) -> Notifier:
    """The notifier of ``kind`` for ``target`` (a URL, or an address for ``email``); ``options`` are the
    kind's keyword options (``name``, ``timeout``; ``smtp`` and ``sender`` for e-mail)."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise InvalidInput(f"notifier kind {kind!r} is not known: use one of {', '.join(KINDS)}") from None
    if not isinstance(target, str) or not target:
        raise InvalidInput(f"{kind} notifier needs a target (a URL{', or an address' if kind == 'email' else ''})")
    try:
        return cls(target, **options)
    except TypeError as err:
        raise InvalidInput(f"{kind} notifier: {err} (options: {', '.join(sorted(options)) or 'none'})") from None


def masked_target(kind: str, target: str) -> str:
    """``target`` with its secrets hidden, for lists and messages: passwords and query values of URLs,
    the path of a Slack webhook, everything after the scheme of an Apprise URL."""
    if kind == "email":
        return target
    parts = urlsplit(target)
    if not parts.scheme:
        return "***"
    if kind == "apprise":
        return f"{parts.scheme}://***"
    if kind == "slack":
        return urlunsplit((parts.scheme, parts.netloc, "/***" if parts.path.strip("/") else "", "", ""))
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username:
        netloc = quote(unquote(parts.username)) + (":***" if parts.password is not None else "") + "@" + netloc
    query = "&".join(f"{k}={v[-1] if k in _PLAIN else '***'}"
                     for k, v in parse_qs(parts.query, keep_blank_values=True).items())
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def masked_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the secrets of URL-valued ones (the SMTP password) hidden."""
    return {k: masked_target("webhook", v) if isinstance(v, str) and "://" in v else v for k, v in options.items()}
