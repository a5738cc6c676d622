"""What the service shows, and where it listens (issue 23, items 6 and 10): partner names only
to operators on ``/metrics``, Flower on this machine's loopback unless opened, the console's
cookie ``Secure`` when a trusted proxy says the client spoke https."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandbox.processes import stop_processes
from tests.harness import ROOT, NotifyApi, free_port, wait_for

PARTNER_KEY = "exposure-partner-" + uuid.uuid4().hex
OPERATOR_KEY = "exposure-operator-" + uuid.uuid4().hex
PARTNER = "exposed" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifyApi]:
    service = NotifyApi(
        tmp_path_factory.mktemp("exposure") / "api.log",
        {"NOTIFY_GATEWAY_KEYS": f"{PARTNER}:{PARTNER_KEY}", "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY},
    )
    yield service
    service.stop()


def _partners_in(text: str) -> set[str]:
    return {
        sample.labels["partner"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "partner" in sample.labels
    }


def test_metrics_show_partner_names_and_volumes_only_to_an_operator_key(api: NotifyApi):
    sent = httpx.post(
        f"{api.url}/messages/u-{uuid.uuid4().hex[:8]}/session",
        json={
            "sessionId": "s1",
            "templateId": "welcome",
            "context": {"url": "https://app.example.com/reports/1"},
        },
        headers={"Authorization": f"Bearer {PARTNER_KEY}"},
        timeout=30,
    )
    assert sent.status_code == 202, sent.text

    anonymous = httpx.get(f"{api.url}/metrics", timeout=30)
    assert anonymous.status_code == 200
    assert "notify_delivered_total" in anonymous.text  # the fleet-wide counts are there
    assert PARTNER not in anonymous.text
    assert _partners_in(anonymous.text) == set()

    operator = httpx.get(
        f"{api.url}/metrics", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=30
    )
    assert operator.status_code == 200
    assert PARTNER in _partners_in(operator.text)

    as_partner = httpx.get(
        f"{api.url}/metrics", headers={"Authorization": f"Bearer {PARTNER_KEY}"}, timeout=30
    )
    assert as_partner.status_code == 403
    wrong = httpx.get(f"{api.url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401


def _set_cookie(api: NotifyApi, headers: dict[str, str]) -> str:
    answer = httpx.get(f"{api.url}/console/login", headers=headers, timeout=30)
    assert answer.status_code == 200
    return answer.headers["set-cookie"].lower()


def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(api: NotifyApi):
    # This test connects from 127.0.0.1, the default trusted proxy.
    assert "; secure" in _set_cookie(api, {"X-Forwarded-Proto": "https"})
    assert "; secure" not in _set_cookie(api, {})


def test_x_forwarded_proto_from_an_untrusted_address_is_ignored(tmp_path: Path):
    service = NotifyApi(
        tmp_path / "api.log",
        {"NOTIFY_OPERATOR_KEYS": OPERATOR_KEY, "NOTIFY_SERVICE_TRUSTED_PROXIES": "192.0.2.1"},
    )
    try:
        assert "; secure" not in _set_cookie(service, {"X-Forwarded-Proto": "https"})
    finally:
        service.stop()


def _listening_on(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp shows them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                address, _, hex_port = fields[1].rpartition(":")
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


LOOPBACK = "0100007F"  # 127.0.0.1, little-endian hex
ANY = "00000000"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, LOOPBACK), ({"NOTIFY_FLOWER_ADDRESS": "0.0.0.0"}, ANY)],
    ids=["default-loopback", "opened-by-setting"],
)
def test_notify_flower_listens_on_loopback_unless_opened(tmp_path: Path, env, expected):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux's /proc/net/tcp")
    port = free_port()
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("notify")),
                "flower",
                "--port",
                str(port),
                "--wait-for-worker",
                "0",
            ],
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "NOTIFY_FLOWER_BASIC_AUTH": "admin:secret-" + uuid.uuid4().hex,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            found = wait_for(
                lambda: _listening_on(port) or None, timeout=30, what="flower to listen"
            )
            assert found == {expected}, (found, log_path.read_text(errors="replace"))
        finally:
            stop_processes([process], grace_seconds=10)
