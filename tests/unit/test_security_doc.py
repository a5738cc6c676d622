"""SECURITY.md (issue 11, "Also"): the threat model names only real settings and covers what the
issue asks: keys, the allow-list, Concur's answers, secrets and redaction, Flower, reporting."""

from __future__ import annotations

import re

from tests.harness import ROOT
from worker.settings import ENV_PREFIX, Settings


def test_security_page_covers_the_threat_model_and_names_only_real_settings():
    text = (ROOT / "SECURITY.md").read_text()
    for heading in (
        "## Reporting a problem",
        "## Who holds which key",
        "## What the allow-list guarantees",
        "## What Concur's answers may change",
        "## Where secrets live, and how they are redacted",
        "## Flower",
    ):
        assert heading in text
    named = {n for n in re.findall(r"\bNOTIFY_[A-Z0-9_]+", text) if not n.endswith("_")}
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert named and named <= fields, named - fields
    for path in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / path).exists(), path
    assert (ROOT / "docker" / "compose.flower-port.yaml").exists()
