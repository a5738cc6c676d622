"""Hostile text never drives an operator's terminal (issue 23, item 4).

A stored sessionId or a Concur errorMessage may hold rich markup or terminal escape sequences
(written before intake refused them, or sent by Concur). ``notify status``, ``notify failed
show`` and ``notify failed list`` show them as the characters they are; intake (the gateway
and ``notify send``) refuses control characters in sessionId and templateId. Real Redis, the
real CLI (click's runner, colour passed through) and a real ``notify api`` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from sandbox.processes import stop_processes
from sandbox.redisserver import free_port
from tests.harness import wait_for
from worker.front.cli import main as notify_cli
from worker.shapes.models import Message
from worker.store.codec import Failure

MARKUP = "[link=https://evil.example/]click here[/link][bold red]urgent[/]"
# Clear the screen, an OSC 8 hyperlink, a window title, a bell, and C1 CSI (U+009B).
ESCAPES = "\x1b[2J\x1b]8;;https://evil.example/\x1b\\open\x1b]8;;\x1b\\\x1b]0;pwned\x07\x9b2J"
HOSTILE = MARKUP + ESCAPES
CONTROL_BYTES = ("\x1b", "\x07", "\x9b", "\x9d")

NOTIFY = str(Path(sys.executable).parent / "notify")
GATEWAY_KEY = "hostile-gateway-" + uuid.uuid4().hex
OPERATOR_KEY = "hostile-operator-" + uuid.uuid4().hex


def _show(*args: str) -> Result:
    # color=True: click passes escape sequences through, as on a terminal; a wide COLUMNS
    # keeps each value on one line so it can be read back whole.
    result = CliRunner().invoke(notify_cli, list(args), color=True, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result


def _assert_shown_as_text(output: str) -> None:
    for byte in CONTROL_BYTES:
        assert byte not in output, (byte, output)
    assert "\\x1b[2J" in output and "\\x9b2J" in output and "\\x07" in output


@pytest.fixture
def hostile_letter(runtime: Any, user_id: str) -> str:
    message = Message.create(user_id, "s-" + HOSTILE, "welcome" + ESCAPES)
    errors = [{"errorId": "e-1", "errorCode": "BAD" + ESCAPES, "errorMessage": HOSTILE}]
    failure = Failure(
        reason="api_rejected",
        detail="refused: " + HOSTILE,
        status=400,
        errors=errors,
        correlation_id="cid-" + ESCAPES,
    )
    runtime.store.create(message.id, message.to_wire())
    assert runtime.store.dead_letter(message.id, failure, request=message.to_wire())
    return message.id


def test_status_shows_markup_and_escapes_in_a_stored_record_as_plain_text(runtime, user_id):
    message = Message.create(user_id, HOSTILE, "welcome")
    runtime.store.create(message.id, message.to_wire())
    try:
        output = _show("status", message.id).output
    finally:
        # Never published: left queued, the session worker's mover would hand it out after the
        # publish grace (30 s), and the worker would dead-letter it (invalid_request) in the
        # shared database in some later test's seconds.
        runtime.store.cancel(message.id, partner=None)
    _assert_shown_as_text(output)
    assert "session" in output and MARKUP in output  # literally, not interpreted


def test_failed_show_and_status_show_concurs_error_text_as_plain_text(hostile_letter):
    shown = _show("failed", "show", hostile_letter).output
    _assert_shown_as_text(shown)
    assert shown.count(MARKUP) >= 3  # the detail, the API error and the session
    status = _show("status", hostile_letter).output
    _assert_shown_as_text(status)
    assert MARKUP in status


def test_failed_list_shows_hostile_templates_as_plain_text(hostile_letter, user_id):
    listed = _show("failed", "list", "--user", user_id).output
    assert hostile_letter in listed
    for byte in CONTROL_BYTES:
        assert byte not in listed
    assert "welcome\\x1b[2J" in listed


@pytest.mark.parametrize(("field", "value"), [("session", HOSTILE), ("template", "wel\x9bcome")])
def test_notify_send_refuses_control_characters_in_session_and_template(field, value, user_id):
    args = {"session": "s-1", "template": "welcome", field: value}
    result = CliRunner().invoke(
        notify_cli, ["send", user_id, "--session", args["session"], "--template", args["template"]]
    )
    assert result.exit_code == 1
    assert "must not contain control characters" in result.output
    assert "\x1b" not in result.output and "\x9b" not in result.output


# -- the gateway, as `notify api` serves it ---------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "NOTIFY_GATEWAY_KEYS": GATEWAY_KEY,
        "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
    }
    log = (tmp_path_factory.mktemp("api") / "api.log").open("w")
    process = subprocess.Popen(
        [NOTIFY, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=30, what="notify api to answer")
        yield url
    finally:
        stop_processes([process], grace_seconds=10)
        log.close()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sessionId": "s\x1b[2J", "templateId": "welcome"}, "sessionId"),
        ({"sessionId": "s-1", "templateId": "welcome\x9b"}, "templateId"),
        ({"sessionId": "s\x00", "templateId": "welcome"}, "sessionId"),
        ({"sessionId": "line\nbreak", "templateId": "welcome"}, "sessionId"),
    ],
)
def test_the_gateway_answers_400_to_control_characters_in_session_or_template(
    gateway, user_id, body, field
):
    answer = httpx.post(
        f"{gateway}/messages/{user_id}/session",
        json={**body, "context": {}},
        headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 400
    [error] = answer.json()["errors"]
    assert error["errorCode"] == "INVALID_FIELD"
    assert error["errorMessage"] == (
        f"{field} must not contain control characters (U+0000-U+001F, U+007F-U+009F)"
    )


def test_the_gateway_still_takes_markup_like_text_which_is_only_shown_as_text(gateway, user_id):
    # Brackets are ordinary characters in an id; only their display had to be made safe.
    answer = httpx.post(
        f"{gateway}/messages/{user_id}/session",
        json={"sessionId": MARKUP, "templateId": "welcome", "context": {}},
        headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
        timeout=10,
    )
    assert answer.status_code == 202
    assert MARKUP in _show("status", answer.json()["id"]).output
