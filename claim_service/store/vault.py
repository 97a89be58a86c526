"""Encryption at rest for redemption codes and partner secrets (AES-256-GCM).

The key comes from ``CLAIM_CODES_KEY`` (32 bytes, base64 or hex). Each value is stored as
``nonce || ciphertext+tag`` with a context string as associated data, so a ciphertext copied
to another row or column does not decrypt. Lookups for duplicates use an HMAC of the
plaintext under a key derived from the same secret, never the plaintext itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from claim_service.config import parse_key

NONCE_BYTES = 12


class VaultError(ValueError):
    """A stored value could not be decrypted (wrong key, or tampered data)."""


class Vault:
    def __init__(self, key_text: str) -> None:
        key = parse_key(key_text)
        self._aead = AESGCM(key)
        self._lookup_key = hmac.new(key, b"lookup", hashlib.sha256).digest()

    def seal(self, plaintext: str, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext.encode(), context.encode())

    def open(self, sealed: bytes, context: str) -> str:
        try:
            nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
            return self._aead.decrypt(nonce, body, context.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise VaultError("stored value cannot be decrypted with this key") from exc

    def fingerprint(self, plaintext: str, context: str) -> bytes:
        return hmac.new(
            self._lookup_key, f"{context}\0{plaintext}".encode(), hashlib.sha256
        ).digest()


def code_context(benefit_id: str, option_id: str) -> str:
    return f"code:{benefit_id}/{option_id}"


def partner_context(partner_id: str) -> str:
    return f"partner:{partner_id}"
