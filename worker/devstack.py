"""``notify dev``: the whole stack on one machine, from nothing but this package.

Starts Redis when none answers at ``NOTIFY_REDIS_URL`` (on that port if it is free), the local
sandbox when no Concur token is configured (so nothing reaches the real host by accident), demo
allow-lists when none are set, the workers, the HTTP service and Flower (with fresh keys and a
Flower password when none are set, printed once); stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from worker.processes import stop_processes
from worker.redisserver import EmbeddedRedis, redis_answers
from worker.sandbox import Sandbox
from worker.settings import load_settings

DEMO_TEMPLATES = "demo-template"
DEMO_DOMAINS = "example.com,*.example.com"


def _say(line: str) -> None:
    print(f"[notify dev] {line}", flush=True)


def run_dev(
    *,
    workers: int = 1,
    sandbox_port: int = 8099,
    latency_ms: float = 20.0,
    api_port: int = 8000,
    flower_port: int = 5555,
) -> int:
    """Run until interrupted; returns the exit code."""
    settings = load_settings()
    env = dict(os.environ)
    started: list[EmbeddedRedis | Sandbox] = []
    children: list[subprocess.Popen[bytes]] = []

    if redis_answers(settings.redis_url):
        _say(f"using Redis at {settings.redis_url}")
    else:
        port = urlsplit(settings.redis_url).port or 6379
        try:
            redis = EmbeddedRedis(port=port)
            env["NOTIFY_REDIS_URL"] = redis.start()
        except RuntimeError:
            redis = EmbeddedRedis()
            env["NOTIFY_REDIS_URL"] = redis.start()
        started.append(redis)
        _say(f"no Redis answered; started one at {env['NOTIFY_REDIS_URL']}")

    if settings.api_token is None:
        sandbox = Sandbox(port=sandbox_port, latency_ms=latency_ms)
        env["NOTIFY_API_BASE_URL"] = sandbox.start()
        started.append(sandbox)
        _say(f"no NOTIFY_API_TOKEN: posting to the local sandbox at {sandbox.url}")
    else:
        _say(f"posting to {settings.api_base_url}")

    if not settings.allowed_templates:
        env["NOTIFY_ALLOWED_TEMPLATES"] = DEMO_TEMPLATES
        env.setdefault("NOTIFY_ALLOWED_URL_DOMAINS", DEMO_DOMAINS)
        _say(f"no allow-list set: allowing template {DEMO_TEMPLATES!r}, URLs on {DEMO_DOMAINS}")

    # The HTTP service and Flower need keys; a local stack gets fresh ones, printed below.
    generated: dict[str, str] = {}
    for name in ("NOTIFY_GATEWAY_KEYS", "NOTIFY_OPERATOR_KEYS"):
        if not getattr(settings, name.removeprefix("NOTIFY_").lower()):
            generated[name] = env[name] = f"dev-{secrets.token_urlsafe(18)}"
    if settings.flower_basic_auth is None:
        generated["NOTIFY_FLOWER_BASIC_AUTH"] = env["NOTIFY_FLOWER_BASIC_AUTH"] = (
            f"admin:{secrets.token_urlsafe(12)}"
        )
    notify = str(Path(sys.executable).parent / "notify")
    children.append(
        subprocess.Popen([notify, "api", "--host", "127.0.0.1", "--port", str(api_port)], env=env)
    )
    children.append(
        subprocess.Popen(
            [notify, "flower", "--address", "127.0.0.1", "--port", str(flower_port)], env=env
        )
    )

    for number in range(1, workers + 1):
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker",
                    "worker",
                    "--loglevel",
                    "INFO",
                    "--hostname",
                    f"worker{number}@%h",
                ],
                env=env,
            )
        )

    exports = " ".join(
        f"{name}={env[name]}"
        for name in (
            "NOTIFY_REDIS_URL",
            "NOTIFY_API_BASE_URL",
            "NOTIFY_ALLOWED_TEMPLATES",
            "NOTIFY_ALLOWED_URL_DOMAINS",
        )
        if name in env and env.get(name) != os.environ.get(name)
    )
    _say("ready. In another shell:")
    _say(
        f"  {exports} notify send user-1 --session s-1 --template demo-template "
        "--url https://app.example.com/x".strip()
    )
    _say(f"  {exports} notify failed list".strip())
    _say(f"HTTP service: http://127.0.0.1:{api_port} (OpenAPI at /openapi.json)")
    _say(f"Flower:       http://127.0.0.1:{flower_port}")
    for name, value in generated.items():
        # Printed once so a developer can use them; they live only as long as this stack.
        _say(f"  {name}={value}")

    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    _say(f"a worker exited with code {child.returncode}; stopping")
                    code = child.returncode or 1
                    stopping = True
            time.sleep(0.5)
    finally:
        stop_processes(children, grace_seconds=60)  # workers: a warm shutdown first
        for part in reversed(started):
            part.stop()
    return code
