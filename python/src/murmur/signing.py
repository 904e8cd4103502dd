"""Request signing, ``murmur-request-v1``: the same bytes the CLI signs and the worker verifies.

A mutating request carries a credential: the developer's identity token (issued by a worker
key; it names the developer's public key) and an Ed25519 signature, made with the developer's
private key, over::

    murmur-request-v1\\n<op>\\n<target>\\n<request id>\\n<ts>\\n<hex sha256 of the body>

The body is the request message without its ``auth`` field, rendered as compact JSON with
object keys sorted and non-ASCII characters kept (what the worker renders from the message it
decoded). ARCHITECTURE.md specifies the format; ``tests/vectors/signing.json`` holds the test
vectors both implementations check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import Unauthenticated

#: First line of the signed bytes.
SIGNING_VERSION = "murmur-request-v1"
#: Separates the token from the private key in a credential (``<token>~<private key>``).
CREDENTIAL_SEPARATOR = "~"

# The PKCS#8 prefix of an Ed25519 private key: version 0 (v1 documents) or 1 (v2, which also
# carry the public key, as the worker's keys do), the Ed25519 algorithm id, then the 32-byte
# seed as an OCTET STRING inside an OCTET STRING.
_ED25519_OID = bytes.fromhex("300506032b6570")
_SEED_HEADER = bytes.fromhex("04220420")


def b64url_decode(text: str) -> bytes:
    """Decodes unpadded base64url (as tokens, keys and signatures are written)."""
    text = text.strip()
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64url: {e}") from None


def b64url_encode(data: bytes) -> str:
    """Encodes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def canonical_body(message: Mapping[str, Any]) -> str:
    """The body a signature covers: ``message`` without ``auth``, compact, keys sorted."""
    body = {k: v for k, v in message.items() if k != "auth"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def signing_bytes(op: str, target: str, request_id: str, ts: int, body: str) -> bytes:
    """The bytes a request signature covers."""
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{SIGNING_VERSION}\n{op}\n{target}\n{request_id}\n{ts}\n{digest}".encode("utf-8")


def _private_key_from_pkcs8(der: bytes) -> Ed25519PrivateKey:
    """Reads a PKCS#8 (v1 or v2) Ed25519 private key; v2's embedded public key must match."""
    # SEQUENCE (short form length) { INTEGER 0|1, AlgorithmIdentifier, OCTET STRING { seed } [, [1] pub] }
    if len(der) < 48 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("not a PKCS#8 document")
    if der[2:4] != b"\x02\x01" or der[4] not in (0, 1):
        raise ValueError("not a PKCS#8 version 1 or 2 document")
    if der[5:12] != _ED25519_OID or der[12:16] != _SEED_HEADER:
        raise ValueError("not an Ed25519 key")
    key = Ed25519PrivateKey.from_private_bytes(der[16:48])
    rest = der[48:]
    if rest:
        # [1] IMPLICIT BIT STRING: tag 0x81, length 33, no unused bits, then 32 bytes.
        if len(rest) != 35 or rest[0] != 0x81 or rest[1] != 33 or rest[2] != 0:
            raise ValueError("unexpected data after the Ed25519 seed")
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if public != rest[3:]:
            raise ValueError("the embedded public key does not belong to the private key")
    return key


def token_claims(token: str) -> dict[str, Any]:
    """A token's claims, read without verifying it (only a worker can verify a token)."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("not a token")
    claims = json.loads(b64url_decode(parts[1]))
    if not isinstance(claims, dict) or "sub" not in claims or "tenant" not in claims:
        raise ValueError("not a murmur token")
    return claims


@dataclass(frozen=True)
class Credential:
    """A developer's credential: the identity token and the private key it is bound to."""

    token: str
    key: Ed25519PrivateKey

    @classmethod
    def parse(cls, credential: str) -> "Credential":
        """Reads ``<token>~<private key>``, as ``murmur-worker token issue`` prints it."""
        token, sep, key = credential.strip().partition(CREDENTIAL_SEPARATOR)
        if not sep or not token or not key:
            raise Unauthenticated(
                "a credential is <token>~<private key>, as murmur-worker token issue prints it"
            )
        return cls.from_parts(token, key)

    @classmethod
    def from_parts(cls, token: str, private_key: str) -> "Credential":
        """A credential from a token and its base64url PKCS#8 private key."""
        try:
            key = _private_key_from_pkcs8(b64url_decode(private_key))
            token_claims(token)
        except ValueError as e:
            raise Unauthenticated(f"the credential is not usable: {e}") from None
        return cls(token=token.strip(), key=key)

    @property
    def claims(self) -> dict[str, Any]:
        """The token's claims (``sub`` is the developer, ``tenant``, ``role``, ``exp``)."""
        return token_claims(self.token)

    @property
    def developer(self) -> str:
        """Who the token says the developer is."""
        return str(self.claims["sub"])

    def __repr__(self) -> str:
        return f"Credential(developer={self.developer!r}, <redacted>)"

    def sign(
        self,
        op: str,
        target: str,
        message: Mapping[str, Any],
        *,
        request_id: str | None = None,
        ts: int | None = None,
    ) -> dict[str, Any]:
        """The ``auth`` field for ``message``: signed for ``op`` on ``target``, now, once."""
        request_id = request_id if request_id is not None else secrets.token_hex(16)
        ts = ts if ts is not None else time.time_ns() // 1_000_000
        body = canonical_body(message)
        sig = self.key.sign(signing_bytes(op, target, request_id, ts, body))
        return {
            "token": self.token,
            "service": None,
            "request_id": request_id,
            "ts": ts,
            "sig": b64url_encode(sig),
        }


def verify_signature(auth: Mapping[str, Any], op: str, target: str, message: Mapping[str, Any]) -> bool:
    """Whether ``auth``'s signature covers ``message`` for ``op`` on ``target`` with the key its
    token names. This checks the request signature only: whether the token itself was issued
    by a worker key (and is not expired, and the request id is fresh) only a worker can say."""
    try:
        claims = token_claims(str(auth["token"]))
        public = Ed25519PublicKey.from_public_bytes(b64url_decode(claims["cnf"]["pk"]))
        sig = b64url_decode(str(auth["sig"]))
        data = signing_bytes(op, target, str(auth["request_id"]), int(auth["ts"]), canonical_body(message))
        public.verify(sig, data)
        return True
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
