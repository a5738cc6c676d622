"""Every Redis key this product writes, named in one place (as arq's ``constants.py``).

``notify:msg:{id}``            hash: the message's status record (request, state, generation,
                               its attempts as fields ``a1``, ``a2``, ... counted by ``na``)
``notify:msg:{id}:attempts``   list: one JSON entry per delivery attempt (records written before
                               the attempts were folded into the record; read, no longer written)
``notify:history:outbox``      stream: one entry per attempt and outcome, for the PostgreSQL history
                               (``NOTIFY_HISTORY_URL``); read by the consumer group ``writers``,
                               deleted once written
``notify:history:lock``        string: the history writer that prunes old partitions this hour
``notify:schedule``            sorted set: id -> when the message must next be attempted
``notify:idem:{p}:{digest}``  string: partner ``p``'s explicit idempotency key (``digest``: its
                               hash, ``models.idempotency_digest``) -> "<fingerprint> <message id>";
                               expires after NOTIFY_IDEMPOTENCY_WINDOW_SECONDS
``notify:dead:{id}``           hash: one dead letter
``notify:dead``                sorted set: dead-letter id -> when it was dead-lettered (ms)
``notify:stats``               hash: cumulative counters (delivered, retried, deferred, replayed,
                               ``dead:<reason>``)
``notify:stats:live``          hash: gauges kept by the same scripts that change a message's state
                               (``inflight``, ``retrying``, ``dead:<reason>`` = letters held now)
``notify:stats:partner:{p}``  hash: the cumulative counters of ``notify:stats`` for partner ``p``
``notify:partners``            set: every partner name a message was recorded for
``notify:stats:company:waiting`` sorted set: company (``default`` or a UUID) -> its messages not
                               finished yet (kept by the same scripts; a company at 0 leaves it)
``notify:stats:delivered:{m}`` counter: deliveries in epoch minute ``m`` (expires after 2 h)
``notify:ratelimit``           string: the rate limit's theoretical arrival time (µs, GCRA)
``notify:ratelimit:penalty``   string: interval multiplier after a 429, expiring with the penalty
``notify:breaker``             hash: the circuit breaker's state, when it may let a post through
                               again, its current open time, the probe's lease
``notify:breaker:window``      hash: calls (``c:<second>``) and failures (``f:<second>``) per
                               second over the breaker's window
``notify:breaker:geo:{geo}``   hash: the breaker of one other geolocation (``geo``: host[:port]),
                               beside ``notify:breaker``, the default company's geolocation's
``notify:breaker:geo:{geo}:window`` hash: that breaker's window
``notify:breaker:geolocations`` set: the geolocations (host[:port]) with a breaker of their own
``notify:oauth:{client}``      hash: Concur OAuth state of one client id: the refresh token
                               (encrypted when a key is set), its expiry (ms), the geolocation,
                               the fingerprint of the configured token it descends from
``notify:oauth:{client}:lock`` string: the one-refresh-at-a-time lock (a random owner token)
``notify:oauth:{client}:cooldown`` string: set for a moment after a failed refresh, so the fleet
                               does not hammer a failing token endpoint

``notify:companies``           set: the id (company UUID) of every company in the registry
``notify:company:{id}``        hash: one registry company (``worker.store.companies``): its state,
                               its refresh token (Fernet-sealed), its expiry (ms), geolocation,
                               when it connected, last refreshed and changed state, and why
``notify:company:{id}:lock``   string: the one-refresh-at-a-time lock of that company's token
``notify:company:{id}:cooldown`` string: set for a moment after that company's refresh failed
``notify:company:{id}:access`` string: that company's current access token, its expiry and
                               geolocation, Fernet-sealed, shared by the fleet's processes; it
                               expires (PX) when they would fetch a new one anyway
``notify:company:{id}:ratelimit`` string: that company's own pace (GCRA, µs), when
                               NOTIFY_COMPANY_RATE_LIMIT_PER_SECOND is set
``notify:console:session:{id}`` hash: one logged-in console session (its CSRF token, operator
                               fingerprint, when it started and was last used); expires when idle,
                               deleted at logout
``notify:auth:failures``       counter: failed key checks (console logins, API keys) in the current
                               window, over every client address (expires with the window)
``notify:auth:failures:{addr}`` counter: the same for one client address

``notify:lane:{c}:{p}``       list: ids of company ``c``'s messages from partner ``p`` waiting for
                               the dispatcher (``NOTIFY_DISPATCH=fair``), oldest first
``notify:lanes:{c}``           list: the partners of company ``c`` whose lane is not empty (a ring
                               the dispatcher rotates)
``notify:lanes``               list: the companies with a lane that is not empty (a ring)
``notify:lanes:turn``          string: how many messages the company at the ring's head has had
                               in its current turn (the round-robin's deficit, carried between
                               calls)
``notify:dispatched``          counter: messages dispatched (their record flagged ``dq``) and not
                               yet claimed; the dispatcher keeps it under the depth

``notify:workers``             sorted set: worker (``host:pid``) -> its last heartbeat (ms)
``notify:held:{worker}``       set: ids of the messages in tasks a worker has received (prefetched
                               or running) and not finished; taken over when the worker dies
``notify:inflight:posts``      hash: worker (``host:pid``) -> the most posts it had in flight since
                               its previous heartbeat (written with the heartbeat; a dead
                               worker's field goes when it is taken over)
``notify:orphans``             hash: an open audit for tasks a dead worker popped off the queue
                               and never noted (``from``: what was published until then has been
                               looked at; ``until``: the latest takeover, when it ends)
``notify:server``              hash: the run id of the Redis the schedule is on and when a mover
                               last saw it (a new run id means a failover or a restart)

``notify:webhooks``            set: the partners with an outcome webhook
``notify:webhook:partner:{p}`` hash: partner ``p``'s webhook (``worker.store.webhooks``): its URL,
                               the event types it takes, its signing secret (Fernet-sealed), the
                               previous secret (sealed) and until when it still signs, when set
``notify:webhook:event:{e}``   hash: one outcome event for a partner's endpoint (its type, the
                               message, the outcome), pending, being sent, or dead (a webhook dead
                               letter); deleted once the endpoint took it
``notify:webhook:schedule``    sorted set: pending event id -> when it must next be sent (or, being
                               sent, when its lease ends)
``notify:webhook:dead``        sorted set: dead event id -> when its last attempt failed (ms)
``notify:webhook:breaker:{h}`` hash: the circuit breaker of one webhook endpoint (``h``:
                               host[:port]); ``...:window`` its failure window

Celery's own broker keys (the queue list, ``unacked``) are Celery's and not listed here.
"""

from __future__ import annotations

PREFIX = "notify"

SCHEDULE = f"{PREFIX}:schedule"
DEAD_INDEX = f"{PREFIX}:dead"
STATS = f"{PREFIX}:stats"
DELIVERED_PER_MINUTE = f"{PREFIX}:stats:delivered"
LIVE = f"{PREFIX}:stats:live"
PARTNERS = f"{PREFIX}:partners"
COMPANY_WAITING = f"{PREFIX}:stats:company:waiting"
RATE_LIMIT = f"{PREFIX}:ratelimit"
RATE_LIMIT_PENALTY = f"{PREFIX}:ratelimit:penalty"
WORKERS = f"{PREFIX}:workers"
POSTS_IN_FLIGHT = f"{PREFIX}:inflight:posts"
ORPHAN_AUDIT = f"{PREFIX}:orphans"
SERVER = f"{PREFIX}:server"
BREAKER = f"{PREFIX}:breaker"
BREAKER_WINDOW = f"{PREFIX}:breaker:window"
BREAKER_GEOLOCATIONS = f"{PREFIX}:breaker:geolocations"
HISTORY_OUTBOX = f"{PREFIX}:history:outbox"
HISTORY_GROUP = "writers"
HISTORY_LOCK = f"{PREFIX}:history:lock"
COMPANIES = f"{PREFIX}:companies"
AUTH_FAILURES = f"{PREFIX}:auth:failures"
LANES = f"{PREFIX}:lanes"
LANES_TURN = f"{PREFIX}:lanes:turn"
DISPATCHED = f"{PREFIX}:dispatched"
WEBHOOKS = f"{PREFIX}:webhooks"
WEBHOOK_SCHEDULE = f"{PREFIX}:webhook:schedule"
WEBHOOK_DEAD = f"{PREFIX}:webhook:dead"
# A lane's key is this, the company, ':' and the partner (the dispatch script builds it so).
LANE_PREFIX = f"{PREFIX}:lane:"


def message(message_id: str) -> str:
    """The status record of one message."""
    return f"{PREFIX}:msg:{message_id}"


def idempotency(partner: str, digest: str) -> str:
    """One partner's explicit idempotency key (``digest``: ``models.idempotency_digest``)."""
    return f"{PREFIX}:idem:{partner}:{digest}"


def partner_stats(partner: str) -> str:
    """The cumulative counters of one partner (the fields of ``STATS``)."""
    return f"{PREFIX}:stats:partner:{partner}"


def attempts(message_id: str) -> str:
    """The attempt history of one message."""
    return f"{PREFIX}:msg:{message_id}:attempts"


def dead_letter(message_id: str) -> str:
    """One dead letter."""
    return f"{PREFIX}:dead:{message_id}"


def oauth_state(client_id: str) -> str:
    """The stored OAuth state (refresh token, expiry, geolocation) of one Concur client id."""
    return f"{PREFIX}:oauth:{client_id}"


def oauth_lock(client_id: str) -> str:
    """The lock that lets one process at a time use (and rotate) the refresh token."""
    return f"{PREFIX}:oauth:{client_id}:lock"


def oauth_cooldown(client_id: str) -> str:
    """Present for a short while after a failed refresh."""
    return f"{PREFIX}:oauth:{client_id}:cooldown"


def held(worker: str) -> str:
    """The ids of the messages one worker holds (prefetched or running)."""
    return f"{PREFIX}:held:{worker}"


def company(company_id: str) -> str:
    """One registry company's hash (``company_id`` checked by the caller: a company UUID)."""
    return f"{PREFIX}:company:{company_id}"


def company_lock(company_id: str) -> str:
    """The lock under which one company's refresh token is used, rotated or replaced."""
    return f"{PREFIX}:company:{company_id}:lock"


def company_cooldown(company_id: str) -> str:
    """Present for a short while after a failed refresh of that company's token."""
    return f"{PREFIX}:company:{company_id}:cooldown"


def company_access(company_id: str) -> str:
    """One company's current access token, sealed, shared by every worker process until it is
    due for renewal (``worker.store.companies.CompanyRegistry.share_access``)."""
    return f"{PREFIX}:company:{company_id}:access"


def company_ratelimit(company_id: str) -> str:
    """One company's own pace (the GCRA theoretical arrival time)."""
    return f"{PREFIX}:company:{company_id}:ratelimit"


def breaker(geolocation: str | None = None) -> str:
    """The breaker of a geolocation (``host[:port]``); None: the default company's (today's key)."""
    return BREAKER if geolocation is None else f"{PREFIX}:breaker:geo:{geolocation}"


def breaker_window(geolocation: str | None = None) -> str:
    """The failure window of a geolocation's breaker; None: the default company's."""
    return BREAKER_WINDOW if geolocation is None else f"{PREFIX}:breaker:geo:{geolocation}:window"


def console_session(session_id: str) -> str:
    """One logged-in console session."""
    return f"{PREFIX}:console:session:{session_id}"


def auth_failures(address: str) -> str:
    """Failed key checks from one client address in the current window."""
    return f"{AUTH_FAILURES}:{address}"


def lane(company_id: str, partner: str) -> str:
    """The lane (a list of message ids, oldest first) of one company's messages from a partner."""
    return f"{LANE_PREFIX}{company_id}:{partner}"


def company_lanes(company_id: str) -> str:
    """The ring of partners whose lane of ``company_id`` is not empty."""
    return f"{PREFIX}:lanes:{company_id}"


def webhook(partner: str) -> str:
    """A partner's outcome webhook (URL, event types, sealed secrets)."""
    return f"{PREFIX}:webhook:partner:{partner}"


def webhook_event(event_id: str) -> str:
    """One outcome event for a partner's endpoint."""
    return f"{PREFIX}:webhook:event:{event_id}"


def webhook_breaker(endpoint: str) -> str:
    """The breaker of one webhook endpoint (``host[:port]``)."""
    return f"{PREFIX}:webhook:breaker:{endpoint}"


def webhook_breaker_window(endpoint: str) -> str:
    """That breaker's failure window."""
    return f"{PREFIX}:webhook:breaker:{endpoint}:window"
