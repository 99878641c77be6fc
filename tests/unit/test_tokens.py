"""Token verification (core/tokens.py): a table of tokens and what each proves, on a fixed
clock; where a handshake carries its token."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest

from trio_ws.core.tokens import (
    BEARER_SUBPROTOCOL,
    Identity,
    Presented,
    TokenError,
    TokenPolicy,
    mint_token,
    policy_from_settings,
    token_from_request,
    verify_token,
)
from trio_ws.settings import Settings

SECRET = "s" * 32
NOW = 1_800_000_000.0
POLICY = TokenPolicy("HS256", SECRET, audience="trio-ws", issuer="https://issuer.example")


def signed(claims: dict[str, Any], *, key: str = SECRET, algorithm: str = "HS256") -> str:
    base = {"sub": "alice", "exp": NOW + 60, "aud": "trio-ws", "iss": "https://issuer.example"}
    return jwt.encode({**base, **claims}, key, algorithm=algorithm)


def unsigned(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    base = {"sub": "alice", "exp": NOW + 60, "aud": "trio-ws", "iss": "https://issuer.example"}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({**base, **claims})}."


@pytest.mark.parametrize(
    ("token", "error"),
    [
        (None, "a token is required"),
        ("", "a token is required"),
        ("x" * 9000, "token too long"),
        ("not.a.token", "token malformed"),
        (signed({}, key="t" * 32), "token signature not valid"),
        (signed({}, key="s" * 64, algorithm="HS512"), "not signed with the configured algorithm"),
        (unsigned({}), "not signed with the configured algorithm"),
        (signed({"exp": NOW}), "token expired"),
        (signed({"exp": NOW - 3600}), "token expired"),
        (signed({"exp": "tomorrow"}), "token exp is not a number"),
        (signed({"nbf": NOW + 10}), "token not valid yet"),
        (signed({"aud": "another"}), "another audience"),
        (signed({"iss": "https://evil.example"}), "another issuer"),
        (jwt.encode({"sub": "alice", "aud": "trio-ws"}, SECRET), "token has no exp claim"),
        (
            jwt.encode(
                {"exp": NOW + 60, "aud": "trio-ws", "iss": "https://issuer.example"}, SECRET
            ),
            "token has no sub claim",
        ),
        (signed({"sub": "a b"}), "token sub must be"),
        (signed({"sub": "x" * 65}), "token sub must be"),
    ],
)
def test_a_token_that_proves_nothing_is_refused(token: str | None, error: str) -> None:
    with pytest.raises(TokenError, match=error) as info:
        verify_token(token, POLICY, NOW)
    if token:
        assert token not in str(info.value)


@pytest.mark.parametrize(
    ("claims", "identity"),
    [
        ({}, Identity("alice", NOW + 60)),
        ({"sub": "bob.2", "exp": NOW + 1}, Identity("bob.2", NOW + 1)),
        ({"aud": ["other", "trio-ws"]}, Identity("alice", NOW + 60)),
        ({"nbf": NOW}, Identity("alice", NOW + 60)),
    ],
)
def test_a_valid_token_names_its_subject(claims: dict[str, Any], identity: Identity) -> None:
    assert verify_token(signed(claims), POLICY, NOW) == identity


def test_audience_and_issuer_are_checked_only_when_configured() -> None:
    policy = TokenPolicy("HS256", SECRET)
    token = signed({"aud": "anyone", "iss": "anybody"})
    assert verify_token(token, policy, NOW).subject == "alice"


def test_a_minted_token_verifies_and_expires() -> None:
    token = mint_token(POLICY, "alice", 3600, NOW)
    assert verify_token(token, POLICY, NOW + 3599) == Identity("alice", NOW + 3600)
    with pytest.raises(TokenError, match="expired"):
        verify_token(token, POLICY, NOW + 3600)


def test_a_public_key_policy_verifies_what_the_private_key_signed() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem_private = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    pem_public = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    policy = TokenPolicy("ES256", pem_public)
    token = mint_token(policy, "alice", 60, NOW, private_key=pem_private)
    assert verify_token(token, policy, NOW).subject == "alice"
    # The public key as an HMAC secret (the classic algorithm confusion) proves nothing.
    with pytest.raises(TokenError):
        verify_token(jwt.encode({"sub": "x", "exp": NOW + 60}, "k" * 32), policy, NOW)
    with pytest.raises(TokenError, match="private key"):
        mint_token(policy, "alice", 60, NOW)


@pytest.mark.parametrize(
    ("headers", "query", "subprotocols", "presented"),
    [
        ([], b"", [], Presented(None)),
        ([(b"authorization", b"Bearer abc")], b"token=q", [], Presented("abc")),
        ([(b"Authorization", b"bearer  abc ")], b"", [], Presented("abc")),
        ([(b"authorization", b"Basic abc")], b"token=q", [], Presented("q")),
        ([], b"since=1-0&token=q", [], Presented("q")),
        ([], b"token=q", [BEARER_SUBPROTOCOL, "s"], Presented("s", BEARER_SUBPROTOCOL)),
        ([], b"", ["chat", BEARER_SUBPROTOCOL, "s"], Presented("s", BEARER_SUBPROTOCOL)),
        ([], b"", [BEARER_SUBPROTOCOL], Presented(None, BEARER_SUBPROTOCOL)),
        ([], b"", ["s", BEARER_SUBPROTOCOL], Presented(None, BEARER_SUBPROTOCOL)),
        ([], b"", ["chat", "s"], Presented(None)),
    ],
)
def test_where_a_handshake_carries_its_token(
    headers: list[tuple[bytes, bytes]],
    query: bytes,
    subprotocols: list[str],
    presented: Presented,
) -> None:
    assert token_from_request(headers, query, subprotocols) == presented


def test_the_policy_from_settings() -> None:
    assert policy_from_settings(Settings(), lambda path: "") is None
    secret = Settings(jwt_secret=SECRET, jwt_audience="a")
    assert policy_from_settings(secret, lambda path: "") == TokenPolicy("HS256", SECRET, "a")
    from_file = Settings(jwt_secret_file="/run/secret", jwt_algorithm="HS384")
    policy = policy_from_settings(from_file, lambda path: SECRET + "\n")
    assert policy == TokenPolicy("HS384", SECRET)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        policy_from_settings(from_file, lambda path: "short\n")
    public = Settings(jwt_public_key_file="/k.pem", jwt_algorithm="RS256")
    assert policy_from_settings(public, lambda path: "PEM") == TokenPolicy("RS256", "PEM")
