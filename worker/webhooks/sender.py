"""One webhook post on a libcurl easy handle, pinned to the address the guard checked.

libcurl, as for the posts to Concur (``worker.concur.transport``), with what a partner's
endpoint on the internet needs on top:

* ``CURLOPT_RESOLVE`` pins ``host:port`` to the checked address: libcurl connects there and never
  resolves the name (DNS rebinding), while TLS still checks the certificate against the name;
* no proxy (a proxy would resolve the name itself), https only (http only when the guard let a
  loopback URL through), no redirects (a 3xx is an answer, and a failure);
* one deadline (``CURLOPT_TIMEOUT_MS``) over connecting, sending and reading, and an answer bound
  (64 KiB: ``CURLOPT_MAXFILESIZE`` and a write callback that stops past it).

A post is never resent here: ``delivery`` decides (the retry policy).
"""

from __future__ import annotations

import os
import time

import certifi
import pycurl

from worker.concur.transport import (
    MAX_RESPONSE_BYTES,
    Answer,
    AnswerReader,
    ExchangeFailed,
    failure_kind,
)
from worker.webhooks.guard import Target


def post(target: Target, headers: dict[str, str], body: bytes, *, timeout_seconds: float) -> Answer:
    """POST ``body`` to ``target``; the answer, or ``ExchangeFailed`` (timeout, connect,
    protocol: as ``worker.concur.transport``)."""
    endpoint = target.endpoint
    read = AnswerReader()
    curl = pycurl.Curl()
    started = time.perf_counter()
    try:
        address = f"[{target.address}]" if ":" in target.address else target.address
        host = endpoint.host.strip("[]")
        curl.setopt(pycurl.URL, endpoint.url)
        curl.setopt(pycurl.RESOLVE, [f"{host}:{endpoint.port}:{address}"])
        curl.setopt(pycurl.PROXY, "")
        curl.setopt(pycurl.NOPROXY, "*")
        allowed = pycurl.PROTO_HTTPS | (pycurl.PROTO_HTTP if endpoint.scheme == "http" else 0)
        curl.setopt(pycurl.PROTOCOLS, allowed)
        curl.setopt(pycurl.FOLLOWLOCATION, 0)
        curl.setopt(pycurl.POST, 1)
        curl.setopt(pycurl.POSTFIELDS, body)
        curl.setopt(pycurl.POSTFIELDSIZE, len(body))
        curl.setopt(
            pycurl.HTTPHEADER,
            [f"{name}: {value}" for name, value in headers.items()] + ["Expect:"],
        )
        curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout_seconds * 1000)))
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(timeout_seconds * 1000)))
        curl.setopt(pycurl.MAXFILESIZE, MAX_RESPONSE_BYTES)
        curl.setopt(pycurl.WRITEFUNCTION, read.write)
        curl.setopt(pycurl.HEADERFUNCTION, read.header)
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.CAINFO, os.environ.get("SSL_CERT_FILE") or certifi.where())
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)
        curl.setopt(pycurl.USERAGENT, "partner-notify-webhooks")
        try:
            curl.perform()
        except pycurl.error as error:
            code = int(error.args[0]) if error.args else 0
            detail = str(error.args[1]) if len(error.args) > 1 else str(error)
            if code in (pycurl.E_WRITE_ERROR, pycurl.E_FILESIZE_EXCEEDED):
                detail = f"the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            raise ExchangeFailed(
                failure_kind(code), detail, time.perf_counter() - started
            ) from None
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        return Answer(status, read.headers, read.body(), time.perf_counter() - started)
    finally:
        curl.close()
