"""Who may talk to the gateway: TLS for the connection, bearer tokens for each stream.

The gateway carries every change of the databases behind it, so it refuses to start open by
accident: ``check_security`` demands a server certificate or ``[gateway.tls] disabled = true``,
and at least one token or ``[gateway.auth] disabled = true`` (``pgcapture gateway --insecure``
sets both, for a laptop). ``server_credentials`` turns ``[gateway.tls]`` into gRPC credentials
after checking each file, because gRPC itself reports a bad file only as a failed handshake.

``Authorizer`` checks the ``authorization: Bearer <token>`` metadata of a stream against
``[gateway.auth.tokens]``: an unknown or missing token is ``UNAUTHENTICATED``, a known token
reading a URI it does not list is ``PERMISSION_DENIED``. Tokens are compared in constant time
against every configured token, and no message ever repeats what the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from pgcapture.config import AuthConfig, GatewayConfig, TlsConfig
from pgcapture.errors import ConfigError
from pgcapture.gateway.errors import GatewayError

ANONYMOUS: Final = "anonymous"
_AUTH_HEADER: Final = "authorization"
_BEARER: Final = "bearer"
_ANY_URI: Final = "*"
_SEND_TOKEN: Final = "send the metadata 'authorization: Bearer <token>'"

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class _Token:
    name: str
    digest: bytes  # SHA-256 of the secret: equal lengths make compare_digest's time constant
    uris: frozenset[str]

    def may_read(self, uri: str) -> bool:
        return _ANY_URI in self.uris or uri in self.uris


class Authorizer:
    """Maps a stream's metadata to the name of the token it carries, and checks the URI."""

    def __init__(self, tokens: Mapping[str, tuple[str, Sequence[str]]], disabled: bool) -> None:
        """``tokens``: name -> (secret, URIs it may read, ``"*"`` for all)."""
        self.disabled = disabled
        self._tokens = tuple(
            _Token(name, _digest(secret), frozenset(uris))
            for name, (secret, uris) in tokens.items()
        )

    @classmethod
    def from_config(cls, auth: AuthConfig) -> Authorizer:
        """Every token of ``[gateway.auth.tokens]``, token files read now (not per stream)."""
        tokens: dict[str, tuple[str, Sequence[str]]] = {}
        owners: dict[str, str] = {}
        for name, cfg in auth.tokens.items():
            secret = _load_token(name, cfg.token, cfg.token_file)
            other = owners.setdefault(secret, name)
            if other != name:
                raise ConfigError(
                    f"gateway.auth.tokens.{name} holds the same token as "
                    f"gateway.auth.tokens.{other}; give each client its own token so that its "
                    "name and URIs are unambiguous"
                )
            tokens[name] = (secret, cfg.uris)
        return cls(tokens, auth.disabled)

    def authorize(self, metadata: Metadata | None, uri: str) -> str:
        """The principal allowed to read ``uri`` (a token's name, or ``"anonymous"`` when
        authentication is disabled); ``GatewayError`` UNAUTHENTICATED or PERMISSION_DENIED."""
        if self.disabled:
            return ANONYMOUS
        token = self._identify(_bearer(metadata))
        if not token.may_read(uri):
            raise GatewayError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {token.name!r} may not read URI {uri!r}; add {uri!r} to "
                f"gateway.auth.tokens.{token.name}.uris in the gateway's configuration",
            )
        return token.name

    def _identify(self, secret: str) -> _Token:
        digest = _digest(secret)
        found: _Token | None = None
        for token in self._tokens:  # no early exit: the time taken says nothing about a match
            if hmac.compare_digest(digest, token.digest):
                found = token
        if found is None:
            raise GatewayError(
                grpc.StatusCode.UNAUTHENTICATED,
                "the bearer token is not known to this gateway; check the client's token "
                "against the gateway's [gateway.auth.tokens]",
            )
        return found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _bearer(metadata: Metadata | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` entry of ``metadata``."""
    values = [v for k, v in metadata or () if k.lower() == _AUTH_HEADER]
    if not values:
        raise GatewayError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"no authorization metadata; this gateway requires a token: {_SEND_TOKEN}",
        )
    if len(values) > 1:
        raise GatewayError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"{len(values)} authorization metadata entries; {_SEND_TOKEN} exactly once",
        )
    value = values[0]
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != _BEARER or not token:
        raise GatewayError(
            grpc.StatusCode.UNAUTHENTICATED,
            f"the authorization metadata is not a bearer token; {_SEND_TOKEN}",
        )
    return token


def _load_token(name: str, token: str | None, token_file: Path | None) -> str:
    key = f"gateway.auth.tokens.{name}"
    if token_file is None:
        secret = (token or "").strip()
        where = f"{key}.token"
    else:
        where = f"{key}.token_file"
        try:
            secret = token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ConfigError(
                f"{where}: {str(token_file)!r} does not exist; create it with the token "
                "(e.g. `openssl rand -hex 32 > FILE`) or correct the path"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{where}: cannot read {str(token_file)!r} ({_reason(exc)}); make it a "
                "readable UTF-8 text file holding the token"
            ) from None
    if not secret:
        raise ConfigError(
            f"{where}: the token is empty; write a long random token (e.g. `openssl rand -hex 32`)"
        )
    if not secret.isascii() or not secret.isprintable() or any(c.isspace() for c in secret):
        raise ConfigError(
            f"{where}: the token holds spaces, control or non-ASCII characters, which cannot "
            "travel in an authorization header; use e.g. `openssl rand -hex 32`"
        )
    return secret


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(exc)


def check_security(gateway: GatewayConfig) -> list[str]:
    """Refuse a gateway that would be open by accident; warnings for what is open on purpose.

    Raises ``ConfigError`` naming the keys to set when neither a certificate nor
    ``gateway.tls.disabled`` is given, or neither a token nor ``gateway.auth.disabled``.
    """
    tls, auth = gateway.tls, gateway.auth
    problems = []
    if not tls.disabled and tls.cert is None and tls.key is None:
        problems.append(
            "no TLS certificate: set gateway.tls.cert and gateway.tls.key (PEM files), or "
            "gateway.tls.disabled = true to serve plaintext on a trusted network"
        )
    if not auth.disabled and not auth.tokens:
        problems.append(
            "no tokens: add a [gateway.auth.tokens.NAME] section with token_file (or token) "
            "and uris, or set gateway.auth.disabled = true to let any client read every URI"
        )
    if problems:
        raise ConfigError(
            "the gateway refuses to start open by accident: "
            + "; ".join(problems)
            + " (--insecure sets both disabled keys, for local use)"
        )
    warnings = []
    if tls.disabled:
        warnings.append(
            "TLS disabled (gateway.tls.disabled = true): tokens and changes travel in "
            "plaintext; serve only on a trusted network"
        )
        if tls.cert or tls.key or tls.client_ca:
            warnings.append(
                "gateway.tls.cert, key and client_ca are ignored while gateway.tls.disabled = true"
            )
    if auth.disabled:
        warnings.append(
            "authentication disabled (gateway.auth.disabled = true): any client that reaches "
            f"{gateway.listen} may read every URI"
        )
    return warnings


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """gRPC credentials for ``[gateway.tls]`` (None when disabled), every file checked first.

    With ``client_ca`` set, clients must present a certificate signed by it.
    """
    if tls.disabled:
        return None
    if tls.cert is None or tls.key is None:
        have, lack = ("cert", "key") if tls.key is None else ("key", "cert")
        if tls.cert is None and tls.key is None:
            raise ConfigError(
                "gateway.tls: no certificate; set gateway.tls.cert and gateway.tls.key (PEM "
                "files), or gateway.tls.disabled = true"
            )
        raise ConfigError(
            f"gateway.tls.{have} is set but gateway.tls.{lack} is not; set both: the "
            "certificate chain and its private key, as PEM files"
        )
    cert = _read_pem("gateway.tls.cert", tls.cert, "CERTIFICATE", "a certificate")
    key = _read_pem("gateway.tls.key", tls.key, "PRIVATE KEY", "a private key")
    if b"ENCRYPTED" in key:
        raise ConfigError(
            f"gateway.tls.key: {str(tls.key)!r} is encrypted with a passphrase, which gRPC "
            "cannot use; decrypt it (`openssl pkey -in KEY -out KEY.plain`) and keep the "
            "file readable by the gateway only"
        )
    ca = None
    if tls.client_ca is not None:
        ca = _read_pem("gateway.tls.client_ca", tls.client_ca, "CERTIFICATE", "a CA certificate")
    _check_pair(tls, ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _read_pem(key: str, path: Path, label: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {str(path)!r} does not exist; correct the path") from None
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot read {str(path)!r} ({_reason(exc)}); make it readable by the gateway"
        ) from None
    if b"-----BEGIN " not in data or f"{label}-----".encode() not in data:
        raise ConfigError(
            f"{key}: {str(path)!r} is not {what} in PEM format (no '-----BEGIN ...{label}-----' "
            "block); convert it, e.g. `openssl x509 -inform der -in FILE -out FILE.pem`"
        )
    return data


def _check_pair(tls: TlsConfig, ca: bytes | None) -> None:
    """Let OpenSSL (through ``ssl``) parse the files now: gRPC would only fail each handshake."""
    assert tls.cert is not None
    assert tls.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback: OpenSSL must never stop to prompt on a terminal.
        context.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"gateway.tls.cert {str(tls.cert)!r} and gateway.tls.key {str(tls.key)!r} do not "
            f"load as a pair ({exc.reason or exc}); check that the key belongs to the "
            "certificate and both are PEM"
        ) from None
    if ca is not None:
        try:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"gateway.tls.client_ca: {str(tls.client_ca)!r} holds no usable CA "
                f"certificate ({exc.reason or exc}); give the PEM certificate of the CA that "
                "signs client certificates"
            ) from None
