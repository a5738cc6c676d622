"""Dev tooling, apart from the production package ``worker``: the local stand-in for Concur's
Notifications v4 API (``sandbox.concur``, ``notify sandbox``), the whole stack on one machine
(``sandbox.devstack``, ``notify dev``), finding or starting a Redis (``sandbox.redisserver``) and
stopping child processes (``sandbox.processes``). The tests and the benchmark use them too; the
Docker image does not carry them.
"""
