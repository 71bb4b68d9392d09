"""Secrets: generation, hashing and constant-time comparison, in one place."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_device_token() -> str:
    """A random batmon token, safe as an MQTT topic level (URL-safe base64).

    Never starting with "-": tokens are pasted into command lines (`--token ...`),
    where a leading dash reads as an option.
    """
    while (token := secrets.token_urlsafe(16)).startswith("-"):
        pass
    return token


def new_api_key() -> str:
    """A random api key; shown once, stored only as its hash."""
    return secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """SHA-256 of the key: keys are 256-bit random, so a slow KDF buys nothing."""
    # surrogatepass: a key from JSON may hold lone surrogates; it just matches nothing.
    return hashlib.sha256(api_key.encode(errors="surrogatepass")).hexdigest()


def key_fingerprint(api_key_hash: str) -> str:
    """What a session cookie carries of the key it was made with: a new key ends the session.

    Derived, not the stored hash itself, so a cookie never holds what the database holds.
    """
    return hashlib.sha256(b"batmon-session:" + api_key_hash.encode()).hexdigest()[:32]


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in constant time."""
    return hmac.compare_digest(
        given.encode(errors="surrogatepass"), expected.encode(errors="surrogatepass")
    )
