"""Which company a message may name, decided at intake (pure; issue 21).

Two questions, asked in this order:

* **Granted?** A gateway partner may name the companies ``NOTIFY_PARTNER_COMPANIES`` lists for
  it (``*``: any company of the registry); a partner not listed, the default company only.
  Another company's name is refused before anything is read or queued (the gateway's 403).
  Unkeyed producers (``notify send``, ``tasks.enqueue``: partner ``default``) run with the
  deployment's own Redis credentials and may name any company.
* **Sendable?** The company must be in the registry and not ``disconnected``
  (``UNKNOWN_COMPANY``, ``COMPANY_DISCONNECTED``: the gateway's 422, the CLI's exit 1, Python's
  ``InvalidRequest``). ``needs_reconnect`` is accepted: its messages wait until an operator
  reconnects the company (docs/companies.md). The default company is always sendable.

The registry's states are read by the caller (``worker.intake.producer.admit``: one round trip
per batch, for its distinct companies) and handed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.rules.validation import Problem
from worker.settings import ANY_COMPANY, Settings
from worker.shapes.models import DEFAULT_COMPANY, DEFAULT_PARTNER

UNKNOWN_COMPANY = "UNKNOWN_COMPANY"
COMPANY_DISCONNECTED = "COMPANY_DISCONNECTED"
COMPANY_NOT_GRANTED = "COMPANY_NOT_GRANTED"


@dataclass(frozen=True, slots=True)
class CompanyGrants:
    """The companies each gateway partner may name (``NOTIFY_PARTNER_COMPANIES``)."""

    by_partner: Mapping[str, frozenset[str]]
    any_company: frozenset[str]  # partners granted ``*``

    @classmethod
    def from_settings(cls, settings: Settings) -> CompanyGrants:
        """The grants of ``settings.partner_companies`` (parsed and checked at start-up)."""
        return cls.of(settings.partner_companies)

    @classmethod
    def of(cls, grants: Mapping[str, tuple[str, ...]]) -> CompanyGrants:
        """The grants of a parsed ``NOTIFY_PARTNER_COMPANIES`` (partner -> ids, or ``("*",)``)."""
        return cls(
            by_partner={
                partner: frozenset(ids) for partner, ids in grants.items() if ANY_COMPANY not in ids
            },
            any_company=frozenset(partner for partner, ids in grants.items() if ANY_COMPANY in ids),
        )

    def allows(self, partner: str | None, company: str | None) -> bool:
        """Whether ``partner`` (None: ``default``) may name ``company`` (None: ``default``)."""
        if company is None or company == DEFAULT_COMPANY:
            return True
        if partner is None or partner == DEFAULT_PARTNER or partner in self.any_company:
            return True
        return company in self.by_partner.get(partner, frozenset())


# No partner granted any company: every gateway partner sends to the default company only.
NO_GRANTS = CompanyGrants({}, frozenset())


def not_granted(partner: str, company: str) -> Problem:
    """The refusal of a company not granted to ``partner`` (never says whether it exists)."""
    return Problem(
        "company",
        COMPANY_NOT_GRANTED,
        f"partner {partner!r} may not send to company {company} "
        "(NOTIFY_PARTNER_COMPANIES grants it the companies it may name)",
    )


def admission_problem(company: str, state: str | None) -> Problem | None:
    """Why a message for ``company`` cannot be accepted now, given the registry's ``state`` of
    it (None: not in the registry); None when it can (the default company always can)."""
    if company == DEFAULT_COMPANY:
        return None
    if state is None:
        return Problem(
            "company",
            UNKNOWN_COMPANY,
            f"company {company} is not in the registry: connect it first "
            "(notify companies connect, or PUT /companies/{companyId})",
        )
    if state == "disconnected":
        return Problem(
            "company",
            COMPANY_DISCONNECTED,
            f"company {company} is disconnected: connect it again before sending to it",
        )
    return None
