"""The cap on a worker process's posts in flight (``NOTIFY_MAX_IN_FLIGHT``) and its gauge, with a
real worker, Redis and the sandbox: a slow API keeps posts in flight, the gauge (``/metrics``'s
``notify_posts_in_flight``) reaches the cap and never passes it, the API never sees more posts
at once than the cap, and the gauge falls back to 0 when the work is done."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from sandbox.concur import Sandbox
from tests.harness import Isolated, wait_for
from tests.reconcile import delivered_count, requests_for
from worker.front.stats import collect, render_prometheus
from worker.store import keys

CAP = 40


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def test_posts_in_flight_stay_under_the_cap_and_the_gauge_shows_them(
    start_worker, isolated: Isolated, api: Sandbox
):
    # Each answer takes 1.5 s: 16 threads x batches of 20 could hold 320 posts at once.
    api.script([], then={"status": 200, "delayMs": 1500})
    env = {
        **isolated.env,
        "NOTIFY_API_BASE_URL": api.url,
        "NOTIFY_HTTP_TIMEOUT_SECONDS": "10",
        "NOTIFY_VISIBILITY_TIMEOUT_SECONDS": "60",
        "NOTIFY_MAX_IN_FLIGHT": str(CAP),
    }
    start_worker("capped", **env)
    ids = isolated.enqueue_many(requests_for(200, users=20))
    seen: list[int] = []
    open_at_api: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(collect(isolated.runtime).posts_in_flight)
            open_at_api.append(int(api.stats()["openConnections"]))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_for(
            lambda: delivered_count(isolated.runtime, ids) == len(ids), timeout=120, what="all"
        )
    finally:
        done.set()
        watcher.join(10)
    assert max(seen) == CAP, f"the gauge never showed the cap: {max(seen)}"
    assert max(open_at_api) <= CAP, f"{max(open_at_api)} posts at once at the API"
    # Done: the figure goes back to 0 (written within a quarter of a second).
    wait_for(lambda: collect(isolated.runtime).posts_in_flight == 0, timeout=30, what="0")
    text = render_prometheus(collect(isolated.runtime))
    assert _metric(text, "notify_posts_in_flight") == 0
    assert _metric(text, "notify_posts_in_flight_process_max") == 0
    assert isolated.runtime.redis.hlen(keys.POSTS_IN_FLIGHT) == 1  # the one live worker's
