"""Fair share's pure parts: which company a request is for, the dispatch policy from the
settings, which companies' lanes are swept (issue 21 item 5)."""

from __future__ import annotations

import pytest

from worker.delivery.dispatcher import DispatchPolicy, default_geolocation, lanes_to_sweep
from worker.settings import SettingsError, load_settings
from worker.shapes.models import DEFAULT_COMPANY, company_of
from worker.store import keys
from worker.store.companies import Company

COMPANY = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
HOUR_MS = 3_600_000


def test_a_request_without_a_company_is_the_default_companys():
    assert company_of({"userId": "u", "partner": "acme"}) == DEFAULT_COMPANY
    assert company_of(None) == DEFAULT_COMPANY


def test_a_request_names_its_company_by_uuid_only():
    assert company_of({"company": COMPANY}) == COMPANY
    # Anything else becomes no part of a key name: the default company's lane.
    assert company_of({"company": COMPANY.upper()}) == DEFAULT_COMPANY
    assert company_of({"company": "x:y"}) == DEFAULT_COMPANY
    assert company_of({"company": 7}) == DEFAULT_COMPANY


def test_a_lane_is_named_by_company_then_partner():
    assert keys.lane(COMPANY, "acme") == f"notify:lane:{COMPANY}:acme"
    assert keys.lane(COMPANY, "acme").startswith(keys.LANE_PREFIX)
    assert keys.company_lanes(COMPANY) == f"notify:lanes:{COMPANY}"


def test_fifo_is_the_default_until_fair_dispatch_meets_its_targets_and_fair_is_opt_in():
    assert load_settings().dispatch == "fifo"
    assert load_settings(dispatch="fair").dispatch == "fair"
    with pytest.raises(SettingsError, match="DISPATCH"):
        load_settings(dispatch="lifo")


def test_the_depth_is_half_a_batch_per_thread_capped_at_half_the_posts_in_flight_unless_set():
    # The defaults: 64 threads x 20 would be 640, but only 512 posts may be in flight, so
    # dispatched tasks beyond half of that would only wait in the process.
    assert (
        load_settings(
            batch_size=20, worker_concurrency=64, max_in_flight=512
        ).dispatch_depth_per_worker
        == 256
    )
    assert (
        load_settings(
            batch_size=20, worker_concurrency=64, max_in_flight=0
        ).dispatch_depth_per_worker
        == 640
    )
    assert (
        load_settings(
            batch_size=20, worker_concurrency=8, max_in_flight=512
        ).dispatch_depth_per_worker
        == 80
    )
    # Never below one batch, so a process with one thread still gets a whole task.
    assert load_settings(batch_size=20, worker_concurrency=1).dispatch_depth_per_worker == 20
    assert load_settings(dispatch_depth=100).dispatch_depth_per_worker == 100


def test_the_policy_comes_from_the_settings():
    settings = load_settings(
        batch_size=10,
        worker_concurrency=8,
        api_base_url="https://us2.api.concursolutions.com/notifications/v4",
        company_reconnect_grace_seconds=60,
    )
    policy = DispatchPolicy.from_settings(settings)
    assert policy.batch == 40
    assert policy.task_size == 10
    assert policy.depth_per_worker == 40
    assert policy.default_geolocation == "https://us2.api.concursolutions.com"
    assert policy.reconnect_grace_ms == 60_000


def test_the_default_geolocation_is_the_base_urls_origin():
    assert default_geolocation("http://127.0.0.1:8080/notifications/v4") == "http://127.0.0.1:8080"


def _company(state: str, state_ms: int = 0) -> Company:
    return Company(id=COMPANY, state=state, state_ms=state_ms)  # type: ignore[arg-type]


def test_a_connected_companys_lanes_stay():
    assert not lanes_to_sweep(_company("connected"), now=10 * HOUR_MS, reconnect_grace_ms=HOUR_MS)


def test_a_company_waiting_for_reconnection_keeps_its_lanes_for_the_grace():
    waiting = _company("needs_reconnect", state_ms=HOUR_MS)
    grace = HOUR_MS
    assert not lanes_to_sweep(waiting, now=2 * HOUR_MS - 1, reconnect_grace_ms=grace)
    assert lanes_to_sweep(waiting, now=2 * HOUR_MS, reconnect_grace_ms=grace)


def test_a_disconnected_or_gone_companys_lanes_are_swept_at_once():
    assert lanes_to_sweep(
        _company("disconnected", state_ms=HOUR_MS), now=HOUR_MS, reconnect_grace_ms=HOUR_MS
    )
    assert lanes_to_sweep(None, now=0, reconnect_grace_ms=HOUR_MS)
