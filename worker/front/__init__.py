"""What people and partner apps talk to: the HTTP service (``api``) with its console
(``console``), OpenAPI document (``openapi``) and Concur-shaped dead letters
(``notifications``); the ``notify`` command (``cli``) and its terminal views (``views``); the
operators' counts and ``/metrics`` (``stats``).
"""
