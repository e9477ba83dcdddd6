"""Remote monitoring (acq/notify.py): a real SMTP server (aiosmtpd) and a
real HTTP receiver get the messages of tiny simulated runs; the rate limit
holds repeats back and summarises them; a dead endpoint never holds up a
run; a bad ``notifications:`` block names the field."""
from __future__ import annotations

import email
import email.policy
import http.server
import io
import json
import socket
import threading
import time

import pytest
import yaml

from acq.documents import Incident, IncidentCause, RunStop, Severity
from acq.notify import Notifier
from devices.setup_config import ConfigError, Notifications, load_setup, validate_config
from tests.support import ROOT
from tests.support.engine_runs import done_counts, write_plan, write_setup

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")
from aiosmtpd.smtp import AuthResult  # noqa: E402

PASSWORD = "s3cret-from-env"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """The local receivers are reached directly, whatever proxy the machine sets."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class _Mailbox:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.messages.append(email.message_from_bytes(envelope.original_content, policy=email.policy.default))
        return "250 Message accepted for delivery"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == PASSWORD.encode())


@pytest.fixture
def smtp_server():
    box = _Mailbox()
    ctl = aiosmtpd_controller.Controller(box, hostname="127.0.0.1", port=_free_port(), authenticator=box.authenticate,
                                         auth_require_tls=False)
    ctl.start()
    yield box, ctl.port
    ctl.stop()


@pytest.fixture
def http_receiver():
    got: list[tuple[dict, dict]] = []          # (headers, JSON body)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((dict(self.headers), json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield got, f"http://127.0.0.1:{srv.server_address[1]}/hook"
    srv.shutdown()
    srv.server_close()


def _email_cfg(port: int, **over) -> dict:
    return {"host": "127.0.0.1", "port": port, "starttls": False, "username": "gcib", "password_env": "GCIB_PW",
            "sender": "gcib-sem@example.org", "recipients": ["op@example.org", "lab@example.org"],
            "timeout_s": 10, **over}


def _notifications(**d) -> Notifications:
    d.setdefault("retry_delay_s", 0)
    return validate_config(Notifications, d, "notifications")


def _operator_pause_then_resume(notifier):
    def before(engine, setup):
        notifier.attach(engine)
        engine.pause()                                  # taken at the first checkpoint
        engine.on_pause(lambda p: engine.resume())      # the operator comes back at once
    return before


# ---------------------------------------------------------------- e-mail
def test_pause_and_finish_arrive_by_mail(run_tiny, smtp_server):
    box, port = smtp_server
    notifier = Notifier(_notifications(email=_email_cfg(port)), "sim setup", env={"GCIB_PW": PASSWORD})
    engine, setup, docs, res = run_tiny(before=_operator_pause_then_resume(notifier), on_pause="wait")
    assert res.status == "success", res.reason
    assert notifier.close(30)
    assert notifier.failed == []
    subjects = [m["Subject"] for m in box.messages]
    assert len(box.messages) == 2, subjects
    pause, finish = box.messages
    assert pause["Subject"].startswith("[GCIB-SEM] out: paused: paused by the operator")
    assert "resume" in pause.get_content()
    assert finish["Subject"] == f"[GCIB-SEM] out: run finished: success ({res.tiles} tiles)"
    body = finish.get_content()
    assert str(engine.out_dir.absolute()) in body and "sim setup" in body
    assert f"verify {engine.out_dir.absolute()}" in body               # the advice names the real folder
    for m in box.messages:
        assert m["From"] == "gcib-sem@example.org"
        assert [a.addr_spec for a in m["To"].addresses] == ["op@example.org", "lab@example.org"]
    assert box.envelopes[0] == ("gcib-sem@example.org", ["op@example.org", "lab@example.org"])
    assert box.logins and all(pw == PASSWORD.encode() for _, pw in box.logins)   # the password from the env


def test_command_line_run_mails_its_end(tmp_path, smtp_server, monkeypatch):
    """acq/cli.py attaches the notifier named by the setup file."""
    from acq.cli import run_plan
    box, port = smtp_server
    setup = write_setup(tmp_path)
    d = yaml.safe_load(setup.read_text())
    d["notifications"] = {"email": _email_cfg(port), "events": ["finish"], "subject_prefix": "[cli]"}
    setup.write_text(yaml.safe_dump(d))
    monkeypatch.setenv("GCIB_PW", PASSWORD)
    out = io.StringIO()
    assert run_plan(write_plan(tmp_path, setup), out=tmp_path / "run1", stream=out) == 0, out.getvalue()
    tiles = sum(done_counts(tmp_path / "run1").values())
    assert [m["Subject"] for m in box.messages] == [f"[cli] run1: run finished: success ({tiles} tiles)"]


def test_missing_password_variable_is_refused_before_the_run(tmp_path, monkeypatch):
    from acq.cli import run_plan
    setup = write_setup(tmp_path)
    d = yaml.safe_load(setup.read_text())
    d["notifications"] = {"email": _email_cfg(25)}
    setup.write_text(yaml.safe_dump(d))
    monkeypatch.delenv("GCIB_PW", raising=False)
    out = io.StringIO()
    assert run_plan(write_plan(tmp_path, setup), out=tmp_path / "run1", stream=out) == 2
    assert "notifications.email.password_env" in out.getvalue() and "GCIB_PW" in out.getvalue()
    assert not (tmp_path / "run1").exists()


# ---------------------------------------------------------------- webhook
def test_webhook_gets_error_suspension_and_finish_as_json(run_tiny, http_receiver):
    got, url = http_receiver
    cfg = _notifications(webhook={"url": url, "headers": {"X-Lab": "gcib"},
                                  "headers_env": {"Authorization": "HOOK_AUTH"}})
    notifier = Notifier(cfg, "sim setup", env={"HOOK_AUTH": "Bearer t0ken"})
    stage_fails = [{"device": "stage", "operation": "move_to", "kind": "move_failure", "at_calls": [3, 4]}]
    engine, setup, docs, res = run_tiny(setup_kw={"faults": stage_fails},
                                        before=lambda e, s: notifier.attach(e))
    assert res.status == "success", res.reason
    assert notifier.close(30) and notifier.failed == []
    events = [b["event"] for _, b in got]
    assert events == ["error", "suspension", "finish"], events
    for headers, body in got:
        assert headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer t0ken" and headers["X-Lab"] == "gcib"
        assert set(body) == {"event", "run", "time", "message", "details"}
        assert body["run"]["out_dir"] == str(engine.out_dir.absolute()) and body["run"]["uid"] == engine.run_uid
        assert "What to do:" in body["message"]
    error, suspension, finish = (b for _, b in got)
    assert error["details"]["cause"] == "device_error" and "move" in error["message"].lower()
    assert suspension["details"]["reason"] == "suspended"
    assert finish["details"]["exit_status"] == "success" and finish["details"]["tiles"] == res.tiles


# ---------------------------------------------------------------- rate limit
class _Recorder:
    name, timeout_s = "recorder", 1.0

    def __init__(self):
        self.got: list[dict] = []

    def send(self, subject, body, payload):
        self.got.append(dict(payload, subject=subject, body=body))


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _incident(i: int) -> Incident:
    return Incident("uid", Severity.ERROR, IncidentCause.DEVICE_ERROR, f"stage move {i} failed")


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def test_rate_limit_holds_repeats_back_and_summarises_them():
    clock, rec = _Clock(), _Recorder()
    n = Notifier(_notifications(webhook={"url": "http://127.0.0.1:9/"}, min_interval_s=600), clock=clock,
                 channels=[rec], poll_s=3600)          # no digest: only the next message carries the summary
    for i in range(5):
        n.on_incident(_incident(i))
    assert _wait(lambda: len(rec.got) == 1)
    time.sleep(0.2)
    assert len(rec.got) == 1                        # four held back
    assert "held_back" not in rec.got[0]["details"]
    clock.t += 601
    n.on_incident(_incident(5))
    assert _wait(lambda: len(rec.got) == 2)
    held = rec.got[1]["details"]["held_back"]
    assert len(held) == 1 and held[0].startswith("4 further 'error' message(s) held back")
    assert all(f"stage move {i} failed" in held[0] for i in (1, 2, 3, 4))
    assert "held back by the rate limit" in rec.got[1]["body"]
    n.on_incident(_incident(6))                     # a new interval began with message 5
    n.on_stop(RunStop("uid", "success", tiles=3))
    assert n.close(10)
    assert [g["event"] for g in rec.got] == ["error", "error", "finish"]
    assert "1 further 'error' message(s)" in rec.got[2]["message"] and "stage move 6" in rec.got[2]["message"]


def test_rate_limit_is_per_event_kind_and_sends_a_digest_when_the_interval_ends():
    from acq.runner import Pause, PauseReason
    clock, rec = _Clock(), _Recorder()
    n = Notifier(_notifications(webhook={"url": "http://127.0.0.1:9/"}, min_interval_s=60), clock=clock,
                 channels=[rec], poll_s=0.05)
    n.on_incident(_incident(0))
    n.on_pause(Pause(PauseReason.DEVICE_FAILURES, "3 consecutive failures"))   # another kind: not held
    n.on_incident(_incident(1))
    assert _wait(lambda: len(rec.got) == 2)
    assert [g["event"] for g in rec.got] == ["error", "pause"]
    clock.t += 61                                   # the interval ends without a new error: a digest follows
    assert _wait(lambda: len(rec.got) == 3)
    assert rec.got[2]["event"] == "error" and "1 further 'error'" in rec.got[2]["message"]
    n.on_stop(RunStop("uid", "success"))
    assert n.close(10) and len(rec.got) == 4       # nothing summarised twice


# ---------------------------------------------------------------- dead endpoints
@pytest.fixture
def black_hole():
    """Accepts connections (the kernel's backlog) and never says a word."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def test_dead_mail_and_web_servers_neither_fail_nor_hold_up_the_run(run_tiny, black_hole):
    refused = _free_port()                          # nothing listens there
    cfg = _notifications(email=_email_cfg(black_hole, timeout_s=120),
                         webhook={"url": f"http://127.0.0.1:{refused}/hook", "timeout_s": 5}, retries=3)
    notifier = Notifier(cfg, env={"GCIB_PW": PASSWORD})
    t0 = time.monotonic()
    engine, setup, docs, res = run_tiny(before=_operator_pause_then_resume(notifier), on_pause="wait")
    took = time.monotonic() - t0
    assert res.status == "success", res.reason
    # the mail server has not answered the first message yet (it never will, for 120 s): the run did not wait
    assert notifier.sent == [] and not any(ch == "email" for _, ch, _ in notifier.failed)
    assert took < 60, took
    t1 = time.monotonic()
    assert notifier.close(timeout=1.0) is False     # gives up, bounded, instead of hanging the caller
    assert time.monotonic() - t1 < 10


def test_refused_endpoint_is_retried_then_logged(caplog):
    cfg = _notifications(webhook={"url": f"http://127.0.0.1:{_free_port()}/hook", "timeout_s": 2}, retries=2)
    n = Notifier(cfg)
    n.on_incident(Incident("uid", Severity.ERROR, IncidentCause.ENGINE_ERROR, "refused-endpoint check"))
    assert n.close(30)
    assert [(e, ch) for e, ch, _ in n.failed] == [("error", "webhook")]
    tries = [r for r in caplog.records if "(try" in r.getMessage() and "refused-endpoint check" in r.getMessage()]
    assert len(tries) == 3
    assert any(r.levelname == "ERROR" and "not sent" in r.getMessage() and "refused-endpoint check" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------- configuration
def _example_block() -> dict:
    """The commented ``notifications:`` example at the end of configs/sim.yaml."""
    lines = (ROOT / "configs" / "sim.yaml").read_text().splitlines()
    start = lines.index("# notifications:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))


def test_sim_yaml_example_is_valid_and_off():
    assert load_setup(ROOT / "configs" / "sim.yaml").notifications is None
    cfg = validate_config(Notifications, _example_block()["notifications"], "sim.yaml example")
    assert cfg.email.password_env == "GCIB_SMTP_PASSWORD" and cfg.webhook.url.startswith("https://")


@pytest.mark.parametrize("block, names", [
    ({"email": _email_cfg(587, recipients=["op@example.org, lab@example.org"])},
     ["notifications.email.recipients.0", "not an e-mail address"]),
    ({"email": _email_cfg(587, sender="gcib-sem")}, ["notifications.email.sender", "not an e-mail address"]),
    ({"email": _email_cfg(70000)}, ["notifications.email.port = 70000", "less than or equal to 65535"]),
    ({"email": _email_cfg(587, password_env="hunter2!")}, ["notifications.email.password_env",
                                                           "not an environment variable name"]),
    ({"email": _email_cfg(587, password="hunter2")}, ["notifications.email.password", "unknown key"]),
    ({"email": _email_cfg(587, ssl=True, starttls=True)}, ["notifications.email", "exclude each other"]),
    ({"webhook": {"url": "ftp://example.org/hook"}}, ["notifications.webhook.url", "http:// or https://"]),
    ({"webhook": {"url": "https://example.org:99999/hook"}}, ["notifications.webhook.url", "Port"]),
    ({"webhook": {"url": "https://example.org/", "headers": {"X Bad": "1"}}}, ["notifications.webhook.headers"]),
    ({"webhook": {"url": "https://example.org/"}, "events": ["paused"]},
     ["notifications.events.0", "'pause', 'error', 'suspension' or 'finish'"]),
    ({"webhook": {"url": "https://example.org/"}, "min_interval_s": -1}, ["notifications.min_interval_s"]),
    ({"events": ["finish"]}, ["notifications", "give email, webhook or both"]),
])
def test_bad_notifications_name_the_field(tmp_path, block, names):
    setup = write_setup(tmp_path)
    d = yaml.safe_load(setup.read_text())
    d["notifications"] = block
    setup.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_setup(setup)
    for n in names:
        assert n in str(e.value), str(e.value)


def test_disabled_notifications_attach_nothing(tmp_path):
    from acq.notify import make_notifier
    setup = write_setup(tmp_path)
    d = yaml.safe_load(setup.read_text())
    d["notifications"] = {"enabled": False, "email": _email_cfg(587)}
    setup.write_text(yaml.safe_dump(d))
    assert make_notifier(load_setup(setup), env={}) is None      # no password needed while off
    d["notifications"]["enabled"] = True
    setup.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="GCIB_PW"):
        make_notifier(load_setup(setup), env={})
    n = make_notifier(load_setup(setup), env={"GCIB_PW": "x"})
    assert isinstance(n, Notifier) and n.run["setup"] == d["name"]
