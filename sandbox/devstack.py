"""``notify dev``: the whole stack on one machine, from nothing but this package.

Starts Redis when none answers at ``NOTIFY_REDIS_URL`` (on that port if it is free), the local
sandbox when no Concur token is configured (so nothing reaches the real host by accident), demo
allow-lists when none are set, the workers, the HTTP service and Flower (with fresh keys and a
Flower password when none are set, printed once); stops them all on Ctrl-C or SIGTERM.

A second shell must reach the same stack with a bare ``.venv/bin/notify send ...``, as the README
shows. The settings are read from the environment and from ``.env`` in the working directory, so
``notify dev`` makes ``.env`` from ``.env.example`` when there is none, and writes into it the
few settings the CLI needs to reach this stack (``SHARED``) whenever this stack runs with other
values than the file has: a Redis it started elsewhere, the demo allow-lists, or a variable
exported in this shell only. The keys and passwords it generates are never written there.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from dotenv import dotenv_values

from sandbox.concur import Sandbox
from sandbox.processes import stop_processes
from sandbox.redisserver import EmbeddedRedis, redis_answers
from worker.settings import load_settings

DEMO_TEMPLATES = "demo-template"
DEMO_DOMAINS = "example.com,*.example.com"
DOTENV = ".env"  # where Settings looks, relative to the working directory
DOTENV_EXAMPLE = ".env.example"
# What `notify send` / `status` / `failed` in another shell need to reach this stack.
SHARED = (
    "NOTIFY_REDIS_URL",
    "NOTIFY_QUEUE_NAME",
    "NOTIFY_ALLOWED_TEMPLATES",
    "NOTIFY_ALLOWED_URL_DOMAINS",
)
MARK = "# Written by `notify dev` so that `notify` in another shell reaches the same stack:"
# The README's first steps; printed as they are, the id filled in by the user.
TRY = (
    "send user-1 --session s-1 --template demo-template --url https://app.example.com/x",
    "status <id>",
    "failed list",
)


def _say(line: str) -> None:
    print(f"[notify dev] {line}", flush=True)


def ensure_dotenv(directory: Path) -> bool:
    """Make ``.env`` from ``.env.example`` when there is none; True when it did."""
    dotenv, example = directory / DOTENV, directory / DOTENV_EXAMPLE
    if dotenv.exists() or not example.is_file():
        return False
    dotenv.write_text(example.read_text())
    return True


def _dotenv_line(name: str, value: str) -> str:
    if any(ch in value for ch in " \t#\"'\\") and "'" not in value:
        return f"{name}='{value}'"  # single quotes: taken literally
    return f"{name}={value}"


def update_dotenv(path: Path, values: Mapping[str, str]) -> list[str]:
    """Give each variable its value in the dotenv file ``path``; returns the names changed.

    An active ``NAME=`` line is replaced where it stands (every one, as the last would win);
    a variable the file lacks is appended under ``MARK``. Comments and other lines stay.
    """
    current = dotenv_values(path) if path.exists() else {}
    changed = {name: value for name, value in values.items() if current.get(name) != value}
    if not changed:
        return []
    lines = path.read_text().splitlines() if path.exists() else []
    missing = dict(changed)
    for number, line in enumerate(lines):
        name, equals, _ = line.removeprefix("export ").partition("=")
        if equals and name.strip() in changed and not line.lstrip().startswith("#"):
            lines[number] = _dotenv_line(name.strip(), changed[name.strip()])
            missing.pop(name.strip(), None)
    if missing:
        if MARK not in lines:
            lines += ["", MARK]
        lines += [_dotenv_line(name, value) for name, value in missing.items()]
    path.write_text("\n".join(lines) + "\n")
    return sorted(changed)


def _command(notify: str) -> str:
    """How to call ``notify`` from here: as it was called (``make run``: ``.venv/bin/notify``),
    else relative when it lies below this directory, else its full path."""
    invoked = sys.argv[0]
    if not os.path.isabs(invoked) and os.path.isfile(invoked) and os.path.samefile(invoked, notify):
        return invoked
    relative = os.path.relpath(notify)
    return notify if relative.startswith("..") else relative


TOKEN_KEY = "NOTIFY_TOKEN_ENCRYPTION_KEY"


def ensure_token_key(directory: Path) -> bool:
    """With Concur OAuth configured and no ``NOTIFY_TOKEN_ENCRYPTION_KEY``, make a key and keep
    it in ``.env``; True when it did.

    Only ``notify dev`` does this: every other command refuses to start without a key. The key
    is written (unlike the stack's other generated keys) because the refresh token stored with
    it must still be readable by the next run.
    """
    from cryptography.fernet import Fernet

    path = directory / DOTENV
    values = {**(dotenv_values(path) if path.exists() else {}), **os.environ}
    client_id = (values.get("NOTIFY_OAUTH_CLIENT_ID") or "").strip()
    if not client_id or (values.get(TOKEN_KEY) or "").strip():
        return False
    key = Fernet.generate_key().decode("ascii")
    update_dotenv(path, {TOKEN_KEY: key})
    os.environ[TOKEN_KEY] = key
    return True


def run_dev(
    *,
    workers: int = 1,
    sandbox_port: int = 8099,
    latency_ms: float = 20.0,
    api_port: int = 8000,
    flower_port: int = 5555,
) -> int:
    """Run until interrupted; returns the exit code."""
    if ensure_dotenv(Path.cwd()):
        _say(f"no {DOTENV}: wrote one from {DOTENV_EXAMPLE} (edit it to configure the stack)")
    if ensure_token_key(Path.cwd()):
        _say(f"OAuth without {TOKEN_KEY}: made one and wrote it to {DOTENV} (keep it)")
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
        # A local stack: partners' webhooks may point at a receiver on this machine
        # (docs/webhooks.md); never the default elsewhere.
        if "NOTIFY_WEBHOOK_ALLOW_PRIVATE" not in os.environ and not settings.webhook_allow_private:
            env["NOTIFY_WEBHOOK_ALLOW_PRIVATE"] = "true"
            _say("webhooks may reach loopback receivers (NOTIFY_WEBHOOK_ALLOW_PRIVATE=true)")
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
    # Flower starts once a worker answers `inspect ping` (notify flower waits for it), so its
    # first look finds the worker; its own log keeps to warnings (the URL is printed below).
    flower_argv = [notify, "flower", "--address", "127.0.0.1", "--port", str(flower_port)]
    children.append(subprocess.Popen([*flower_argv, "--log-level", "warning"], env=env))

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

    written = update_dotenv(
        Path.cwd() / DOTENV, {name: env[name] for name in SHARED if env.get(name)}
    )
    if written:
        _say(f"wrote {', '.join(written)} to {DOTENV}, where `notify` in another shell reads them")
    _say("ready. In another shell (in this directory):")
    for line in TRY:
        _say(f"  {_command(notify)} {line}")
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
