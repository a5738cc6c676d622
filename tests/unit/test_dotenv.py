"""`notify dev` keeps its settings in .env: lines it changes are replaced in place, the rest
appended, comments kept (sandbox/devstack.py ``update_dotenv``)."""

from __future__ import annotations

from pathlib import Path

from dotenv import dotenv_values

from sandbox.devstack import update_dotenv


def test_dotenv_update_replaces_lines_in_place_and_appends_the_rest(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\nNOTIFY_REDIS_URL=redis://localhost:6379/0\n"
        "# NOTIFY_QUEUE_NAME=commented\nNOTIFY_LOG_FORMAT=text\n"
    )
    changed = update_dotenv(
        dotenv,
        {
            "NOTIFY_REDIS_URL": "redis://127.0.0.1:7001/0",
            "NOTIFY_LOG_FORMAT": "text",
            "NOTIFY_ALLOWED_URL_DOMAINS": "example.com,*.example.com",
            "NOTIFY_QUEUE_NAME": "q 1#",
        },
    )
    assert changed == ["NOTIFY_ALLOWED_URL_DOMAINS", "NOTIFY_QUEUE_NAME", "NOTIFY_REDIS_URL"]
    text = dotenv.read_text()
    assert text.startswith("# a comment\nNOTIFY_REDIS_URL=redis://127.0.0.1:7001/0\n")
    assert "# NOTIFY_QUEUE_NAME=commented\n" in text
    assert dotenv_values(dotenv) == {
        "NOTIFY_REDIS_URL": "redis://127.0.0.1:7001/0",
        "NOTIFY_LOG_FORMAT": "text",
        "NOTIFY_ALLOWED_URL_DOMAINS": "example.com,*.example.com",
        "NOTIFY_QUEUE_NAME": "q 1#",
    }
    assert update_dotenv(dotenv, {"NOTIFY_LOG_FORMAT": "text"}) == []  # nothing to change
