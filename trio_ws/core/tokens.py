"""Signed tokens (JWT): who a client is, when ``TRIO_WS_JWT_*`` turns them on.

Theory of operation:

* The algorithm is fixed by configuration (:class:`TokenPolicy`), never taken from the token:
  a token signed with another algorithm, or with none (``alg: none``), is refused. HMAC
  (``HS256``/``HS384``/``HS512``) verifies with a shared secret; ``RS*``/``ES*``/``PS*``/
  ``EdDSA`` with a public key, so the servers hold nothing that can mint tokens.
* A token must carry ``sub`` (the client id, so a valid client id) and ``exp``; ``aud`` and
  ``iss`` are checked when configured. ``exp`` and ``nbf`` are checked here against the ``now``
  the caller gives, so that the rules are table-tested without a clock.
* A browser cannot set headers on a WebSocket, so a token may come three ways
  (:func:`token_from_request`): ``Authorization: Bearer``, the ``token`` query parameter, or a
  pair of subprotocols, ``trio-ws.bearer`` followed by the token, which the server answers by
  accepting ``trio-ws.bearer`` (one the client offered: never the token itself).
* A reason given to the client or to the log never contains the token.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jwt

from trio_ws.core.protocol import CLIENT_ID_PATTERN
from trio_ws.settings import JWT_HMAC_ALGORITHMS as HMAC_ALGORITHMS, JWT_MIN_SECRET_BYTES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from trio_ws.settings import Settings

#: The subprotocol a client offers, followed by its token, to send the token without a header
#: or a query parameter (docs/protocol.md, "Tokens").
BEARER_SUBPROTOCOL = "trio-ws.bearer"

#: Longer tokens are refused before any decoding (a token travels in a URL or a header).
MAX_TOKEN_LENGTH = 8192

#: The close reason for a token that expired on a live connection (4502).
EXPIRED_REASON = "token expired; connect with a new token"


class TokenError(ValueError):
    """The token is missing or not valid; the message is short enough for a close frame and
    never contains the token."""


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """How tokens are verified: the algorithm, the key (the HMAC secret, or a PEM public key)
    and the optional audience and issuer."""

    algorithm: str
    key: str | bytes = field(repr=False)
    audience: str | None = None
    issuer: str | None = None
    #: Clock skew tolerated on ``exp`` and ``nbf``, in seconds.
    leeway_s: float = 0.0


def policy_from_settings(settings: Settings, read_text: Callable[[str], str]) -> TokenPolicy | None:
    """The settings' token policy, None when tokens are off; ``read_text`` reads the secret or
    key file (the host's ``Path.read_text``).

    Errors: :class:`ValueError` for a secret file shorter than 32 bytes; whatever
    ``read_text`` raises.
    """
    if not settings.tokens_enabled:
        return None
    if settings.jwt_public_key_file is not None:
        key: str = read_text(settings.jwt_public_key_file)
    elif settings.jwt_secret_file is not None:
        key = read_text(settings.jwt_secret_file).strip()
        if len(key.encode()) < JWT_MIN_SECRET_BYTES:
            raise ValueError(
                f"TRIO_WS_JWT_SECRET_FILE must hold at least {JWT_MIN_SECRET_BYTES} bytes"
            )
    else:
        assert settings.jwt_secret is not None
        key = settings.jwt_secret
    return TokenPolicy(
        settings.jwt_algorithm, key, audience=settings.jwt_audience, issuer=settings.jwt_issuer
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token names, and until when."""

    subject: str
    expires_at: float


def verify_token(token: str | None, policy: TokenPolicy, now: float) -> Identity:
    """The identity ``token`` proves at wall-clock time ``now``.

    Errors: :class:`TokenError` when it is missing, malformed, signed with another key or
    algorithm, for another audience or issuer, not yet valid, expired, or without a ``sub``
    that is a valid client id.
    """
    if not token:
        raise TokenError("a token is required")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token too long")
    try:
        claims = jwt.decode(
            token,
            policy.key,
            algorithms=[policy.algorithm],
            audience=policy.audience,
            issuer=policy.issuer,
            options={
                "require": ["exp", "sub"],
                # Checked below against ``now``, not against the system clock.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": policy.audience is not None,
                "verify_iss": policy.issuer is not None,
            },
        )
    except jwt.InvalidAlgorithmError:
        raise TokenError("token not signed with the configured algorithm") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature not valid") from None
    except jwt.InvalidAudienceError:
        raise TokenError("token is for another audience") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token from another issuer") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenError(f"token has no {error.claim} claim") from None
    except jwt.PyJWTError:
        raise TokenError("token malformed") from None
    expires_at = _number(claims.get("exp"), "exp")
    if now >= expires_at + policy.leeway_s:
        raise TokenError("token expired")
    if "nbf" in claims and now + policy.leeway_s < _number(claims["nbf"], "nbf"):
        raise TokenError("token not valid yet")
    subject = claims.get("sub")
    if not isinstance(subject, str) or CLIENT_ID_PATTERN.fullmatch(subject) is None:
        raise TokenError("token sub must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return Identity(subject, expires_at)


def _number(value: object, claim: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"token {claim} is not a number")
    return float(value)


def mint_token(
    policy: TokenPolicy, subject: str, ttl_s: float, now: float, *, private_key: str | None = None
) -> str:
    """A token for ``subject`` valid ``ttl_s`` seconds from ``now`` (``trio-ws token``): signed
    with the policy's secret, or with ``private_key`` for a public-key algorithm."""
    key = policy.key if policy.algorithm in HMAC_ALGORITHMS else private_key
    if key is None:
        raise TokenError(f"{policy.algorithm} tokens are signed with a private key; give one")
    claims: dict[str, object] = {"sub": subject, "iat": int(now), "exp": int(now + ttl_s)}
    if policy.audience is not None:
        claims["aud"] = policy.audience
    if policy.issuer is not None:
        claims["iss"] = policy.issuer
    return jwt.encode(claims, key, algorithm=policy.algorithm)


@dataclass(frozen=True, slots=True)
class Presented:
    """The token a handshake carries, and the subprotocol to accept (only one it offered)."""

    token: str | None
    subprotocol: str | None = None


def token_from_request(
    headers: Iterable[tuple[bytes, bytes]], query_string: bytes, subprotocols: Sequence[str]
) -> Presented:
    """The token of a handshake: ``Authorization: Bearer``, else the subprotocol pair
    (``trio-ws.bearer``, then the token), else ``?token=``. When the client offered
    ``trio-ws.bearer``, it is the subprotocol to accept, token or not (a browser fails a
    handshake that offered subprotocols and got none)."""
    subprotocol = BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in subprotocols else None
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return Presented(credentials.strip(), subprotocol)
    if subprotocol is not None:
        index = list(subprotocols).index(BEARER_SUBPROTOCOL)
        if index + 1 < len(subprotocols):
            return Presented(subprotocols[index + 1], subprotocol)
    values = urllib.parse.parse_qs(query_string.decode("latin-1")).get("token")
    return Presented(values[0] if values else None, subprotocol)
