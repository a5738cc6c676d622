"""Outcome webhooks per partner (docs/webhooks.md), following the Standard Webhooks specification.

``signing``: the ``whsec_`` secrets and the ``webhook-signature`` header (the ``standardwebhooks``
package); ``guard``: the endpoint's address, resolved at send time and checked
(``worker.rules.endpoints``); ``sender``: one pinned libcurl post; ``delivery``: an event's
attempt (claim, breaker, sign, post, outcome) and the mover that publishes due events. The
events and each partner's webhook live in Redis (``worker.store.webhooks``).
"""
