"""The gateway's security settings: tokens, TLS files, refusal to start open, the CLI's errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from pgcapture.config import AuthConfig, GatewayConfig, TlsConfig, TokenConfig
from pgcapture.errors import ConfigError
from pgcapture.gateway.errors import GatewayError
from pgcapture.gateway.security import Authorizer, check_security, server_credentials

AUTH = AuthConfig(
    tokens={
        "orders-reader": TokenConfig(token="tok-orders", uris=["orders", "orders.eu"]),
        "ops": TokenConfig(token="tok-ops", uris=["*"]),
    }
)


def bearer(token: str) -> list[tuple[str, str | bytes]]:
    return [("user-agent", "grpc-python"), ("authorization", f"Bearer {token}")]


def refused(
    authorizer: Authorizer, metadata: Sequence[tuple[str, str | bytes]] | None, uri: str = "orders"
) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        authorizer.authorize(metadata, uri)
    return err.value


# -- Authorizer ----------------------------------------------------------------------------------


def test_a_known_token_is_its_name_for_the_uris_it_lists() -> None:
    authorizer = Authorizer.from_config(AUTH)
    assert authorizer.authorize(bearer("tok-orders"), "orders") == "orders-reader"
    assert authorizer.authorize(bearer("tok-orders"), "orders.eu") == "orders-reader"


def test_a_star_token_reads_every_uri() -> None:
    authorizer = Authorizer.from_config(AUTH)
    assert authorizer.authorize(bearer("tok-ops"), "orders") == "ops"
    assert authorizer.authorize(bearer("tok-ops"), "anything-else") == "ops"


def test_scheme_and_key_case_and_bytes_values_are_accepted() -> None:
    authorizer = Authorizer.from_config(AUTH)
    assert authorizer.authorize([("Authorization", "bearer  tok-ops ")], "x") == "ops"
    assert authorizer.authorize([("authorization", b"Bearer tok-ops")], "x") == "ops"


@pytest.mark.parametrize("metadata", [None, [], [("user-agent", "grpc-python")]])
def test_missing_authorization_is_unauthenticated_and_says_what_to_send(
    metadata: list[tuple[str, str | bytes]] | None,
) -> None:
    error = refused(Authorizer.from_config(AUTH), metadata)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no authorization metadata" in error.message
    assert "Bearer <token>" in error.message


@pytest.mark.parametrize("value", ["tok-ops", "Basic dG9rLW9wcw==", "Bearer", "Bearer   ", ""])
def test_malformed_authorization_is_unauthenticated_without_echoing_it(value: str) -> None:
    error = refused(Authorizer.from_config(AUTH), [("authorization", value)])
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not a bearer token" in error.message
    assert "tok-ops" not in error.message
    assert "dG9r" not in error.message


def test_two_authorization_entries_are_refused() -> None:
    metadata: list[tuple[str, str | bytes]] = [
        ("authorization", "Bearer tok-ops"),
        ("authorization", "Bearer tok-orders"),
    ]
    error = refused(Authorizer.from_config(AUTH), metadata)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "exactly once" in error.message


def test_an_unknown_token_is_unauthenticated_and_never_echoed() -> None:
    error = refused(Authorizer.from_config(AUTH), bearer("tok-guessed"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not known" in error.message
    assert "tok-guessed" not in error.message
    assert "tok-" not in error.message


def test_a_prefix_of_a_token_is_not_the_token() -> None:
    error = refused(Authorizer.from_config(AUTH), bearer("tok-op"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_for_another_uri_is_permission_denied_naming_token_uri_and_fix() -> None:
    error = refused(Authorizer.from_config(AUTH), bearer("tok-orders"), "billing")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'orders-reader'" in error.message
    assert "'billing'" in error.message
    assert "gateway.auth.tokens.orders-reader.uris" in error.message
    assert "tok-orders" not in error.message


def test_disabled_auth_lets_anyone_in_as_anonymous() -> None:
    authorizer = Authorizer.from_config(AuthConfig(disabled=True))
    assert authorizer.authorize(None, "orders") == "anonymous"
    assert authorizer.authorize(bearer("whatever"), "billing") == "anonymous"


def test_no_tokens_and_auth_enabled_refuses_every_stream() -> None:
    error = refused(Authorizer.from_config(AuthConfig()), bearer("tok-ops"))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED


# -- token files -----------------------------------------------------------------------------


def from_file(path: Path) -> Authorizer:
    return Authorizer.from_config(
        AuthConfig(tokens={"app": TokenConfig(token_file=path, uris=["orders"])})
    )


def test_token_file_is_read_once_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "app.token"
    path.write_text("  0123abcd\n\n")
    authorizer = from_file(path)
    path.write_text("changed-later\n")
    assert authorizer.authorize(bearer("0123abcd"), "orders") == "app"


def test_missing_token_file_names_the_key_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        from_file(tmp_path / "nope.token")
    text = str(err.value)
    assert text.startswith("gateway.auth.tokens.app.token_file: ")
    assert "nope.token" in text
    assert "does not exist" in text
    assert "openssl rand" in text


def test_unreadable_token_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.auth\.tokens\.app\.token_file: cannot read"):
        from_file(tmp_path)  # a directory
    binary = tmp_path / "binary.token"
    binary.write_bytes(b"\xff\xfe\x00token")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        from_file(binary)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.token"
    path.write_text(" \n")
    with pytest.raises(ConfigError, match=r"tokens\.app\.token_file: the token is empty"):
        from_file(path)


def test_token_that_cannot_travel_in_a_header_is_refused() -> None:
    auth = AuthConfig(tokens={"app": TokenConfig(token="two words")})
    with pytest.raises(ConfigError, match=r"gateway\.auth\.tokens\.app\.token: .*spaces"):
        Authorizer.from_config(auth)


def test_two_names_with_one_token_are_refused() -> None:
    auth = AuthConfig(tokens={"a": TokenConfig(token="same"), "b": TokenConfig(token="same")})
    with pytest.raises(ConfigError, match=r"tokens\.b holds the same token as .*tokens\.a"):
        Authorizer.from_config(auth)


# -- check_security ------------------------------------------------------------------------


def test_a_gateway_without_tls_or_tokens_refuses_to_start_naming_the_keys() -> None:
    with pytest.raises(ConfigError) as err:
        check_security(GatewayConfig())
    text = str(err.value)
    assert "\n" not in text
    for key in ("gateway.tls.cert", "gateway.tls.key", "gateway.tls.disabled = true"):
        assert key in text
    for key in ("[gateway.auth.tokens.NAME]", "gateway.auth.disabled = true", "--insecure"):
        assert key in text


def test_tls_alone_still_needs_tokens(tmp_path: Path) -> None:
    tls = TlsConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    with pytest.raises(ConfigError) as err:
        check_security(GatewayConfig(tls=tls))
    assert "gateway.auth.disabled" in str(err.value)
    assert "gateway.tls" not in str(err.value)


def test_tokens_alone_still_need_tls() -> None:
    with pytest.raises(ConfigError) as err:
        check_security(GatewayConfig(auth=AUTH))
    assert "gateway.tls.disabled" in str(err.value)
    assert "gateway.auth.disabled" not in str(err.value)


def test_a_secured_gateway_starts_without_warnings(tmp_path: Path) -> None:
    tls = TlsConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    assert check_security(GatewayConfig(tls=tls, auth=AUTH)) == []


def test_explicitly_disabled_security_starts_with_warnings(tmp_path: Path) -> None:
    gateway = GatewayConfig(
        listen="0.0.0.0:10001",
        tls=TlsConfig(disabled=True, cert=tmp_path / "c.pem"),
        auth=AuthConfig(disabled=True),
    )
    warnings = check_security(gateway)
    assert any("TLS disabled" in w and "trusted network" in w for w in warnings)
    assert any("ignored" in w and "gateway.tls.cert" in w for w in warnings)
    assert any("authentication disabled" in w and "0.0.0.0:10001" in w for w in warnings)


# -- server_credentials ----------------------------------------------------------------------


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem/server.key signed by it, other.key, and server.key encrypted."""
    out = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(out, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test CA")  # fmt: skip
    (out / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        out, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"
    )
    openssl(out, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", "1", "-days", "2", "-extfile", "server.ext",
            "-out", "server.pem")  # fmt: skip
    openssl(out, "genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", "other.key")  # fmt: skip
    openssl(out, "pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key")  # fmt: skip
    openssl(out, "x509", "-in", "server.pem", "-outform", "der", "-out", "server.der")
    return out


def test_disabled_tls_has_no_credentials(pki: Path) -> None:
    tls = TlsConfig(disabled=True, cert=pki / "server.pem", key=pki / "server.key")
    assert server_credentials(tls) is None


def test_certificate_and_key_make_credentials_with_or_without_client_ca(pki: Path) -> None:
    tls = TlsConfig(cert=pki / "server.pem", key=pki / "server.key")
    assert isinstance(server_credentials(tls), grpc.ServerCredentials)
    mutual = tls.model_copy(update={"client_ca": pki / "ca.pem"})
    assert isinstance(server_credentials(mutual), grpc.ServerCredentials)


def test_certificate_without_key_and_key_without_certificate(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls\.cert is set but gateway\.tls\.key"):
        server_credentials(TlsConfig(cert=pki / "server.pem"))
    with pytest.raises(ConfigError, match=r"gateway\.tls\.key is set but gateway\.tls\.cert"):
        server_credentials(TlsConfig(key=pki / "server.key"))
    with pytest.raises(ConfigError, match=r"gateway\.tls\.disabled = true"):
        server_credentials(TlsConfig())


def test_missing_tls_file_names_the_key_and_path(pki: Path) -> None:
    tls = TlsConfig(cert=pki / "server.pem", key=pki / "server.key", client_ca=pki / "no-ca.pem")
    with pytest.raises(ConfigError, match=r"gateway\.tls\.client_ca: .*no-ca\.pem.*does not exist"):
        server_credentials(tls)
    with pytest.raises(ConfigError, match=r"gateway\.tls\.cert: .*nope\.pem.*does not exist"):
        server_credentials(TlsConfig(cert=pki / "nope.pem", key=pki / "server.key"))


def test_files_that_are_not_pem_are_named(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.tls\.cert: .*not a certificate in PEM"):
        server_credentials(TlsConfig(cert=pki / "server.der", key=pki / "server.key"))
    with pytest.raises(ConfigError, match=r"gateway\.tls\.key: .*not a private key in PEM"):
        server_credentials(TlsConfig(cert=pki / "server.pem", key=pki / "server.pem"))
    tls = TlsConfig(cert=pki / "server.pem", key=pki / "server.key", client_ca=pki / "ca.key")
    with pytest.raises(ConfigError, match=r"gateway\.tls\.client_ca: .*not a CA certificate"):
        server_credentials(tls)


def test_a_key_of_another_certificate_is_refused(pki: Path) -> None:
    with pytest.raises(ConfigError, match="do not load as a pair"):
        server_credentials(TlsConfig(cert=pki / "server.pem", key=pki / "other.key"))


def test_an_encrypted_key_is_refused_with_the_command_to_decrypt_it(pki: Path) -> None:
    with pytest.raises(ConfigError, match=r"encrypted with a passphrase.*openssl pkey"):
        server_credentials(TlsConfig(cert=pki / "server.pem", key=pki / "encrypted.key"))


# -- the gateway command -----------------------------------------------------------------------


def pgcapture(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGCAPTURE_")}
    return subprocess.run(
        [sys.executable, "-m", "pgcapture", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_gateway_command_without_tls_or_auth_exits_2_naming_the_keys(tmp_path: Path) -> None:
    result = pgcapture("gateway", "--nats", "nats://127.0.0.1:1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: the gateway refuses to start")
    assert "gateway.tls.disabled" in lines[0]
    assert "gateway.auth" in lines[0]


def test_gateway_command_reports_a_bad_resolver_and_a_bad_set(tmp_path: Path) -> None:
    result = pgcapture("gateway", "--insecure", "--resolver", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "write it as module:attribute" in result.stderr
    result = pgcapture("gateway", "--insecure", "--set", "gateway.uris", cwd=tmp_path)
    assert result.returncode == 2
    assert "is not KEY=VALUE" in result.stderr


def test_gateway_help_shows_examples_and_what_insecure_does(tmp_path: Path) -> None:
    result = pgcapture("gateway", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Examples:" in result.stdout
    assert "pgcapture gateway --config pgcapture.toml" in result.stdout
    assert "gateway.tls.disabled" in result.stdout
    assert "gateway.auth.disabled" in result.stdout
    assert "gateway.uris.orders.max_unacked=500" in result.stdout
