"""Secrets at rest: ``Cipher`` seals what this product stores in Redis (refresh tokens).

Fernet (``cryptography``) under ``NOTIFY_TOKEN_ENCRYPTION_KEY``. Used by the OAuth token state of
the default company (``worker.concur.oauth``) and by the company registry
(``worker.store.companies``); it lives in store/ so the registry seals without importing concur.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class Cipher:
    """Encrypts stored secrets with Fernet (``MultiFernet`` over the configured keys).

    ``key`` is ``NOTIFY_TOKEN_ENCRYPTION_KEY``: one key, or several comma-separated for a
    rotation, the first encrypting and every one decrypting. Stored values carry a prefix
    (``f1:`` encrypted, ``p:`` plain, as versions without a key stored them) so a plain token of
    before is still read, and ``stale`` says it must be sealed again; a changed key is noticed,
    not misread. Settings refuse OAuth without a key, so only a bare ``Cipher(None)`` (tests of
    this class) seals plainly.
    """

    def __init__(self, key: str | None) -> None:
        self._keys = [Fernet(part.strip().encode()) for part in (key or "").split(",") if part]
        self._fernet = MultiFernet(self._keys) if self._keys else None

    def seal(self, text: str) -> str:
        """The stored form of ``text`` (encrypted with the first key)."""
        if self._fernet is None:
            return "p:" + text
        return "f1:" + self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, stored: str) -> str:
        """``text`` back; ``ValueError`` when it cannot be read with these keys."""
        if stored.startswith("p:"):
            return stored[2:]
        if stored.startswith("f1:"):
            if self._fernet is None:
                raise ValueError("the stored refresh token is encrypted and no key is set")
            try:
                return self._fernet.decrypt(stored[3:].encode("ascii")).decode("utf-8")
            except InvalidToken:
                raise ValueError(
                    "the stored refresh token does not decrypt with any configured key"
                ) from None
        raise ValueError("the stored refresh token has an unknown form")

    def stale(self, stored: str) -> bool:
        """Whether ``stored`` should be sealed again: plain, or not under the first key."""
        if self._fernet is None:
            return False
        if not stored.startswith("f1:"):
            return True
        try:
            self._keys[0].decrypt(stored[3:].encode("ascii"))
        except InvalidToken:
            return True
        return False


# Seal a stored value again (plain, or under a retired key) unless another process stored a
# newer one meanwhile: compare and set of the hash field ``refresh``.
RESEAL_SCRIPT = """
-- KEYS: the hash holding the sealed refresh token ; ARGV: the stored form read, the same token
-- sealed again
if redis.call('HGET', KEYS[1], 'refresh') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'refresh', ARGV[2])
  return 1
end
return 0
"""
