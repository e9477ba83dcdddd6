"""Notifications to people away from the microscope: an e-mail (SMTP) and/or
a webhook (JSON POST) when the run pauses, is suspended, meets an error or
ends.

A ``Notifier`` follows the documents (a DocumentRouter: error incidents, the
run's stop) and the engine's pauses (``Engine.on_pause``). Both only queue a
message; one background thread sends it, with a timeout and retries, so a
mail server that hangs or refuses never stops or slows the acquisition: a
message that cannot be sent is logged and dropped.

Rate limit: at most one message per event kind per ``min_interval_s``. The
ones held back meanwhile are counted and summarised in the next message of
their kind, in a digest once the interval has passed, or in the run's final
message, whichever comes first.

Configured in the setup file's ``notifications:`` (devices/setup_config.py
``Notifications``); passwords and tokens come from environment variables.
Webhook body: ``{"event", "run": {name, out_dir, uid, setup}, "time" (ISO
8601), "message" (what happened, what to do), "details"}``.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import smtplib
import ssl
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol

from acq.documents import DocumentRouter, FinishReason, Incident, IncidentCause, RunStart, RunStop, Severity
from acq.runner import Pause, PauseReason
from devices.setup_config import ConfigError, EmailNotify, Notifications, WebhookNotify

log = logging.getLogger(__name__)

QUEUE_MAX = 200          # messages waiting to be sent; beyond that they are dropped (and counted)
SAMPLES = 5              # held-back messages named in a summary; the rest only counted
_STOP = object()

# What a remote operator can do, by the engine's structured pause reason
# (never chosen from the text). Neutral about GUI buttons: a run may come
# from the GUI or the command line.
PAUSE_ADVICE: dict[PauseReason, str] = {
    PauseReason.OPERATOR: "Someone paused the run at the microscope (beams blanked); it continues when they "
                          "resume it.",
    PauseReason.SUSPENDED: "The run waits with the beams blanked and resumes by itself once the condition clears; "
                           "if it lasts longer than suspenders.max_suspend_s the operator is needed. Fix the cause "
                           "(see the details) if you can.",
    PauseReason.SAFETY_WINDOW: "A setpoint was outside the setup's safety windows. Check the device settings and "
                               "the plan at the microscope, then resume; or stop and correct the plan.",
    PauseReason.DEVICE_FAILURES: "A device kept failing. Check it (power, cables, controller; reconnect it), then "
                                 "resume to retry the step, or stop and continue later with --resume.",
    PauseReason.DOSE_BUDGET: "A tile was scanned as often as the dose budget allows this cycle. Find out why (QC, "
                             "grab errors, refocusing) before allowing it one more scan.",
    PauseReason.MILL_INTERRUPTED: "A mill was interrupted with the ion beam on. Inspect the sections before "
                                  "accepting the mill as done.",
    PauseReason.WRITE_FAILED: "The output keeps refusing data held in memory. Free space or repair the output "
                              "folder, then resume; stopping loses what is held (imaged again on resume).",
    PauseReason.STAGE_CHECK: "A stage step to or from the mill position did not verify; the stage may be tilted at the "
                             "mill position. Someone at the microscope has to bring it back by hand, then resume.",
    PauseReason.EHT_OFF: "The SEM's EHT (gun) is off, so nothing can be imaged. Someone at the microscope has to "
                         "switch it on (run-up about a minute); the run then resumes by itself.",
    PauseReason.OUTPUT: "The output cannot take data. Free space or restore the output folder, then continue the "
                        "run with --resume.",
}
PAUSE_DEFAULT = "The run is paused with the beams blanked and waits for the operator."

FINISH_ADVICE: dict[FinishReason, str] = {
    FinishReason.SUCCESS: "Nothing to do; check the data with: verify OUTDIR.",
    FinishReason.ABORTED: "Stopped at a safe point, beams blanked. Continue when ready with: run PLAN --resume "
                          "OUTDIR.",
    FinishReason.FAILED: "The run stopped and needs the operator: read the reason, fix the cause, then continue "
                         "with: run PLAN --resume OUTDIR.",
}
ERROR_ADVICE = ("The run handles this where it can (retries, suspension); a pause or the end of the run gets its "
                "own message. The journal (OUTDIR/journal.jsonl) and the log have the history.")
ENGINE_ERROR_ADVICE = ("The engine failed and the run stops with the beams blanked. Keep the log for the "
                       "maintainers; continue with --resume once the cause is fixed.")


@dataclass
class Notice:
    """One message, before it is rendered for a channel."""
    event: str                      # pause, error, suspension, finish (Notifications.events)
    headline: str                   # one line: the subject
    what: str                       # what happened
    advice: str                     # what the operator should do
    details: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- rate limit
@dataclass
class _Held:
    count: int
    since: float                    # wall time of the first one held back
    samples: list[str]


class RateLimiter:
    """At most one message per kind per ``min_interval_s`` on ``clock``
    (monotonic seconds; injectable for tests); counts what it holds back."""

    def __init__(self, min_interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s, self.clock = min_interval_s, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    def admit(self, kind: str, headline: str, at: float) -> Optional[list[str]]:
        """None: hold this one back (counted); else the summaries of those
        held back before it (to go into this message)."""
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.min_interval_s:
                h = self._held.setdefault(kind, _Held(0, at, []))
                h.count += 1
                if len(h.samples) < SAMPLES:
                    h.samples.append(headline)
                return None
            self._last[kind] = now
            h = self._held.pop(kind, None)
            return [] if h is None else [_summary(kind, h)]

    def due(self) -> list[tuple[str, str]]:
        """(kind, summary) for each kind holding messages whose interval has
        passed: the digest counts as that kind's message."""
        now = self.clock()
        out = []
        with self._lock:
            for kind in [k for k in self._held if now - self._last.get(k, now) >= self.min_interval_s]:
                out.append((kind, _summary(kind, self._held.pop(kind))))
                self._last[kind] = now
        return out

    def take_all(self) -> list[tuple[str, str]]:
        """(kind, summary) of everything held (the run has ended)."""
        with self._lock:
            held, self._held = self._held, {}
        return [(k, _summary(k, h)) for k, h in held.items()]


def _summary(kind: str, h: _Held) -> str:
    named = "; ".join(h.samples)
    more = f" (and {h.count - len(h.samples)} more)" if h.count > len(h.samples) else ""
    return (f"{h.count} further '{kind}' message(s) held back by the rate limit since {_when(h.since)}: "
            f"{named}{more}")


# ---------------------------------------------------------------- channels
class Channel(Protocol):
    name: str
    timeout_s: float

    def send(self, subject: str, body: str, payload: dict) -> None:
        """Deliver one message or raise."""


class EmailChannel:
    name = "email"

    def __init__(self, cfg: EmailNotify, password: Optional[str]):
        self.cfg, self._password, self.timeout_s = cfg, password, cfg.timeout_s

    def send(self, subject: str, body: str, payload: dict) -> None:
        cfg = self.cfg
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = cfg.sender
        msg["To"] = ", ".join(cfg.recipients)
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=cfg.sender.rpartition("@")[2])
        msg.set_content(body)
        if cfg.ssl:
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout_s, context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
        with smtp:
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if cfg.username is not None:
                smtp.login(cfg.username, self._password or "")
            smtp.send_message(msg)


class WebhookChannel:
    name = "webhook"

    def __init__(self, cfg: WebhookNotify, secret_headers: Mapping[str, str]):
        self.cfg, self.timeout_s = cfg, cfg.timeout_s
        self._headers = {"Content-Type": "application/json", "User-Agent": "gcib-sem-notify",
                         **cfg.headers, **secret_headers}

    def send(self, subject: str, body: str, payload: dict) -> None:
        data = json.dumps(payload, default=str).encode()
        req = urllib.request.Request(self.cfg.url, data=data, headers=self._headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:   # a 4xx/5xx raises HTTPError
            r.read(4096)


def _from_env(env: Mapping[str, str], name: str, field_name: str, what: str) -> str:
    value = env.get(name)
    if not value:
        raise ConfigError(f"notifications.{field_name} = {name!r}: environment variable {name} is not set "
                          f"(it holds {what}; the setup file never does)")
    return value


def make_channels(cfg: Notifications, env: Mapping[str, str] = os.environ) -> list[Channel]:
    """The configured channels; ConfigError when a named environment variable is missing."""
    out: list[Channel] = []
    if cfg.email is not None:
        pw = None
        if cfg.email.password_env is not None:
            pw = _from_env(env, cfg.email.password_env, "email.password_env", "the SMTP password")
        out.append(EmailChannel(cfg.email, pw))
    if cfg.webhook is not None:
        secret = {h: _from_env(env, var, f"webhook.headers_env.{h}", f"the {h} header")
                  for h, var in cfg.webhook.headers_env.items()}
        out.append(WebhookChannel(cfg.webhook, secret))
    return out


# ---------------------------------------------------------------- notifier
class Notifier(DocumentRouter):
    """Turns pauses, suspensions, error incidents and the run's end into
    messages and sends them from its own thread (see the module text).
    ``attach(engine)`` before the run starts; ``close()`` at the end of a
    process waits a bounded time for the last messages."""

    def __init__(self, cfg: Notifications, setup_name: str = "", *, env: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 poll_s: float = 1.0, channels: Optional[list[Channel]] = None):
        self.cfg = cfg
        self.channels = make_channels(cfg, env) if channels is None else channels
        self.events = set(cfg.events)
        self.limiter = RateLimiter(cfg.min_interval_s, clock)
        self.wall, self.poll_s = wall, poll_s
        self.run: dict = {"name": "", "out_dir": "", "uid": "", "setup": setup_name}
        self.sent: list[tuple[str, str]] = []               # (event, channel) delivered
        self.failed: list[tuple[str, str, str]] = []        # (event, channel, last error) given up
        self.dropped = 0                                    # not queued: the queue was full or closed
        self._q: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._ended = False                                 # the run's stop is queued: nothing after it
        self._abandon = threading.Event()                   # close() gave up waiting: no more retries

    # ------------------------------------------------------------ wiring
    def attach(self, engine) -> None:
        """Follow ``engine``'s documents and pauses (before it starts)."""
        out = Path(engine.out_dir)
        self.run.update(name=out.name, out_dir=str(out.absolute()), uid=engine.run_uid)
        engine.subscribe(self)
        engine.on_pause(self.on_pause)

    # ------------------------------------------------------------ sources (never block)
    def on_start(self, doc: RunStart) -> None:
        self.run.update(uid=doc.run_uid, out_dir=str(Path(doc.out_dir).absolute()), name=Path(doc.out_dir).name)

    def on_incident(self, doc: Incident) -> None:
        if doc.severity is not Severity.ERROR:
            return
        advice = ENGINE_ERROR_ADVICE if doc.cause is IncidentCause.ENGINE_ERROR else ERROR_ADVICE
        self._post(Notice("error", f"error ({doc.cause}): {doc.message}", doc.message, advice,
                          {"cause": str(doc.cause), "severity": str(doc.severity), **doc.context}, doc.time))

    def on_pause(self, pause: Pause) -> None:
        """Engine.on_pause callback (in the engine's thread: only queues)."""
        suspended = pause.reason is PauseReason.SUSPENDED
        headline = pause.message if suspended else f"paused: {pause.message}"
        self._post(Notice("suspension" if suspended else "pause", headline, pause.message,
                          PAUSE_ADVICE.get(pause.reason, PAUSE_DEFAULT),
                          {"reason": str(pause.reason), **pause.data}, self.wall()))

    def on_stop(self, doc: RunStop) -> None:
        held = self.limiter.take_all()
        if "finish" in self.events:
            what = (f"the run ended: {doc.exit_status}; {doc.tiles} tiles acquired in this run, "
                    f"{doc.incidents} incidents" + (f"; {doc.reason}" if doc.reason else ""))
            n = Notice("finish", f"run finished: {doc.exit_status} ({doc.tiles} tiles)", what,
                       FINISH_ADVICE[doc.exit_status], {"exit_status": str(doc.exit_status), "reason": doc.reason,
                                                        "tiles": doc.tiles, "incidents": doc.incidents}, doc.time)
            self._enqueue(n, [s for _, s in held])
        else:
            for kind, summary in held:          # what was held back still reaches someone
                self._enqueue(self._digest(kind, summary), [])
        with self._lock:
            self._ended = True
            self._q.put(_STOP)

    # ------------------------------------------------------------ queueing
    def _post(self, notice: Notice) -> None:
        if notice.event not in self.events:
            return
        held = self.limiter.admit(notice.event, notice.headline, notice.time)
        if held is not None:
            self._enqueue(notice, held)

    def _enqueue(self, notice: Notice, held: list[str]) -> None:
        with self._lock:
            if self._ended or self._q.qsize() >= QUEUE_MAX:
                self.dropped += 1
                log.warning("notification dropped (%s): %s", "run ended" if self._ended else "queue full",
                            notice.headline)
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
                self._thread.start()
            self._q.put((notice, held))

    def close(self, timeout: Optional[float] = None) -> bool:
        """Wait at most ``timeout`` s (default: one try of each channel) for
        the queued messages; True when all were handled. Those still
        waiting are given up and logged."""
        with self._lock:
            self._ended = True
            self._q.put(_STOP)
            thread = self._thread
        if thread is None:
            return True
        if timeout is None:
            timeout = sum(ch.timeout_s for ch in self.channels) + 5.0
        thread.join(timeout)
        if thread.is_alive():
            self._abandon.set()
            log.error("notifications: %d message(s) not sent within %.0f s; given up", self._q.qsize(), timeout)
            return False
        return True

    # ------------------------------------------------------------ sending (own thread)
    def _loop(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=self.poll_s)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                self._deliver(*item)
            for kind, summary in self.limiter.due():
                self._deliver(self._digest(kind, summary), [])

    def _digest(self, kind: str, summary: str) -> Notice:
        return Notice(kind, summary.split(" since ")[0], summary,
                      "See the journal (OUTDIR/journal.jsonl) or the log for each of them.", {}, self.wall())

    def render(self, notice: Notice, held: list[str]) -> tuple[str, str, dict]:
        """(subject, plain-text body, webhook JSON) of one message."""
        run = dict(self.run)
        headline = notice.headline if len(notice.headline) <= 160 else notice.headline[:157] + "..."
        subject = f"{self.cfg.subject_prefix} {run['name'] or 'run'}: {headline}".strip()
        advice = notice.advice.replace("OUTDIR", run["out_dir"] or "OUTDIR")
        message = f"{notice.what}\nWhat to do: {advice}"
        if held:
            message += "\n" + "\n".join(held)
        where = f"{run['name']} ({run['out_dir']})" if run["out_dir"] else "not started yet"
        lines = [f"Event: {notice.event}", f"Run: {where}" + (f" on {run['setup']}" if run["setup"] else ""),
                 f"Time: {_when(notice.time)}", "", f"What happened: {notice.what}", f"What to do: {advice}"]
        if held:
            lines += ["", "Held back by the rate limit:", *(f"  {h}" for h in held)]
        if notice.details:
            lines += ["", "Details:", *(f"  {k}: {v}" for k, v in notice.details.items())]
        details = dict(notice.details, **({"held_back": held} if held else {}))
        payload = {"event": notice.event, "run": run, "time": _when(notice.time), "message": message,
                   "details": details}
        return subject, "\n".join(lines) + "\n", payload

    def _deliver(self, notice: Notice, held: list[str]) -> None:
        try:
            subject, body, payload = self.render(notice, held)
        except Exception:                        # a bug here must not end the thread: later messages still go
            log.exception("notification could not be composed: %s", notice.headline)
            return
        for ch in self.channels:
            delay, error = self.cfg.retry_delay_s, ""
            for attempt in range(self.cfg.retries + 1):
                try:
                    ch.send(subject, body, payload)
                    self.sent.append((notice.event, ch.name))
                    break
                except Exception as e:           # any failure of the far end: log it, retry, never raise
                    error = f"{type(e).__name__}: {e}"
                    log.warning("notification by %s failed (try %d of %d): %s (%s)", ch.name, attempt + 1,
                                self.cfg.retries + 1, notice.headline, error)
                    if attempt == self.cfg.retries or self._abandon.wait(delay):
                        self.failed.append((notice.event, ch.name, error))
                        log.error("notification not sent by %s: %s (%s)", ch.name, notice.headline, error)
                        break
                    delay *= 2


def make_notifier(config, **kw) -> Optional[Notifier]:
    """The Notifier a setup config (devices/setup_config.py SetupConfig) asks
    for, or None; ConfigError when a password or token variable is not set."""
    cfg = getattr(config, "notifications", None)
    if cfg is None or not cfg.enabled:
        return None
    return Notifier(cfg, config.name, **kw)
