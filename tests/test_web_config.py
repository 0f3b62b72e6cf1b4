"""`--web-config-file` (exporter-toolkit's web configuration): the file read strictly,
and the exporter serving over TLS with client certificates and basic auth, to real
clients: aiohttp, a real Prometheus scraping, a real Alertmanager posting to the webhook.
Refused: a wrong password, no certificate, a certificate of another CA, plain HTTP to the
TLS port; the exporter unharmed after each."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml

from exporter.web.webconfig import WebConfigError, load
from tests.conftest import StartDNS
from tests.harness.components import missing
from tests.harness.coredns import Behaviour, CoreDNS
from tests.harness.exporter import Exporter
from tests.harness.monitoring import Monitoring
from tests.harness.monitoring import binaries_missing as monitoring_missing
from tests.harness.netns import NetNS
from tests.harness.scrape import samples, wait_until
from tests.harness.tls import PKI

PASSWORD = "correct horse battery staple"
TOKEN = "webhook-token-over-tls"


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# -- the file ------------------------------------------------------------------------------


def test_a_good_file_reads_with_paths_beside_it(tmp_path: Path) -> None:
    config = load(write(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "/abs/server.key",
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "client_ca_file": "ca.crt", "min_version": "TLS13",
                              "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"],
                              "curve_preferences": ["X25519", "CurveP256"]},
        "http_server_config": {"http2": False, "headers": {"X-Frame-Options": "deny"}},
        "basic_auth_users": {"prometheus": hashed("x")},
    }))
    tls = config.tls
    assert tls is not None
    assert tls.cert_file == tmp_path / "server.crt"  # the file's directory, as the toolkit
    assert tls.key_file == Path("/abs/server.key")
    assert tls.min_version is ssl.TLSVersion.TLSv1_3
    assert tls.ciphers == ("ECDHE-RSA-AES128-GCM-SHA256",) and tls.curve == "X25519"
    assert dict(config.headers) == {"X-Frame-Options": "deny"}
    assert set(config.users) == {"prometheus"}
    # An empty file: plain HTTP, no auth.
    empty = load(write(tmp_path / "empty.yml", None))
    assert empty.tls is None and not empty.users


@pytest.mark.parametrize(("data", "problem"), [
    ({"tls_server_config": {"cert_filse": "x"}}, "tls_server_config: unknown key 'cert_filse'"),
    ({"tls": {}}, "unknown key 'tls'"),
    ({"tls_server_config": {"cert_file": "c"}}, "missing one of key or key_file"),
    ({"tls_server_config": {"key_file": "k"}}, "missing one of cert or cert_file"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k",
                            "client_auth_type": "RequireAnyClientCert", "client_ca_file": "a"}},
     "without verifying it, which Python's ssl does not do"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k", "client_ca_file": "a"}},
     "client CA's have been configured without a Client Auth Policy"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k",
                            "client_auth_type": "RequireAndVerifyClientCert"}},
     "needs client_ca_file"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k", "min_version": "TLS111"}},
     "min_version: expected one of TLS10, TLS11, TLS12, TLS13"),
    ({"tls_server_config": {"cert_file": "c", "key_file": "k", "cipher_suites": ["RC4"]}},
     "unknown cipher 'RC4'"),
    ({"http_server_config": {"headers": {"Server": "x"}}}, "'Server' can not be configured"),
    ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
     "invalid value for X-Frame-Options: expected one of deny, sameorigin"),
    ({"basic_auth_users": {"alice": "plaintext"}}, "basic_auth_users.alice: not a bcrypt hash"),
    ({"rate_limit": {"interval": "1s", "burst": 5}}, "rate_limit: not supported"),
])
def test_a_bad_file_names_the_key(tmp_path: Path, data: dict[str, Any], problem: str) -> None:
    with pytest.raises(WebConfigError) as caught:
        load(write(tmp_path / "web.yml", data))
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_a_bad_file_is_a_configuration_error_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write(tmp_path / "web.yml", {"tls_server_config": {"cert_file": "nope.crt",
                                                              "key_file": "nope.key"}})
    for flag in ("--web-config-file", "--web.config.file"):
        done = subprocess.run([sys.executable, "-m", "exporter", "serve", "--server",
                               "127.0.0.1", flag, str(path)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert "configuration error" in done.stderr and "cannot be loaded" in done.stderr
        assert "Traceback" not in done.stderr


# -- serving -------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def web_config(pki: PKI, path: Path, **tls: Any) -> Path:
    return write(path, {
        "tls_server_config": {"cert_file": pki.path("server.crt"),
                              "key_file": pki.path("server.key"),
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "client_ca_file": pki.path("ca.crt"), **tls},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        "basic_auth_users": {"prometheus": hashed(PASSWORD)},
    })


Served = Callable[..., Exporter]


@pytest.fixture
def served(tmp_path: Path, pki: PKI, healthy_dns: CoreDNS) -> Iterator[Served]:
    started: list[Exporter] = []
    token = tmp_path / "token"
    token.write_text(TOKEN)

    def start(*args: str, netns: NetNS | None = None, **tls: Any) -> Exporter:
        config = web_config(pki, tmp_path / f"web-{len(started)}.yml", **tls)
        exporter = Exporter(["--server", healthy_dns.address, "--web-config-file", str(config),
                             "--webhook-token-file", str(token), *args], netns=netns)
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def get(url: str, context: ssl.SSLContext | None, auth: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as session, session.get(
            url, ssl=context if context is not None else False, headers=auth) as response:
        return response.status, dict(response.headers), await response.text()


async def test_tls_with_a_client_certificate_and_basic_auth(served: Served, pki: PKI) -> None:
    exporter = served()
    [line] = exporter.logged("listening")
    assert line["tls"] is True and line["basic_auth"] is True
    url = f"https://{exporter.address}"
    good = basic("prometheus", PASSWORD)
    status, headers, body = await get(url + "/metrics", pki.client("prometheus"), good)
    assert status == 200 and "dnsprobe_build_info" in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Every endpoint: the status page too; the health endpoints without basic auth (the
    # kubelet's probes cannot send it), the client certificate still asked for.
    assert (await get(url + "/", pki.client("prometheus"), good))[0] == 200
    assert (await get(url + "/", pki.client("prometheus")))[0] == 401
    for path in ("/-/healthy", "/-/ready"):
        assert (await get(url + path, pki.client("prometheus")))[0] == 200
    # A wrong password, an unknown user, none: 401, the same answer.
    for auth in (basic("prometheus", "wrong"), basic("eve", PASSWORD), None):
        status, headers, _ = await get(url + "/metrics", pki.client("prometheus"), auth)
        assert status == 401 and headers["WWW-Authenticate"] == "Basic", auth
    # No certificate, or one of a CA nobody trusts: the handshake is refused.
    for client in (pki.client(None), pki.client("stranger")):
        with pytest.raises(aiohttp.ClientError):
            await get(url + "/metrics", client, good)
    # Plain HTTP to the TLS port: refused.
    with pytest.raises(aiohttp.ClientError):
        await get(f"http://{exporter.address}/metrics", None, good)
    # The webhook: its bearer token over TLS (Alertmanager has one Authorization header).
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/webhook/alertmanager", ssl=pki.client("alertmanager"),
                                json={}, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 400  # past the authentication: the payload is empty
        async with session.post(url + "/webhook/alertmanager", ssl=pki.client("alertmanager"),
                                json={}, headers=good) as r:
            assert r.status == 401  # basic auth is not the webhook's token
    # Unharmed.
    assert exporter.process.poll() is None
    assert (await get(url + "/-/healthy", pki.client("prometheus"), good))[0] == 200


async def test_client_allowed_sans_admit_only_the_certificates_that_name_one(
        served: Served, pki: PKI) -> None:
    exporter = served(client_allowed_sans=["alertmanager"])
    url = f"https://{exporter.address}/metrics"
    good = basic("prometheus", PASSWORD)
    assert (await get(url, pki.client("alertmanager"), good))[0] == 200
    status, _, body = await get(url, pki.client("prometheus"), good)
    assert status == 403 and "client_allowed_sans" in body


async def test_a_renewed_certificate_is_served_without_a_restart(served: Served,
                                                                  pki: PKI) -> None:
    exporter = served()
    url = f"https://{exporter.address}/-/healthy"
    good = basic("prometheus", PASSWORD)

    async def serial() -> int:
        reader, writer = await asyncio.open_connection(
            *exporter.address.rsplit(":", 1), ssl=pki.client("prometheus"))
        cert = writer.get_extra_info("peercert")
        writer.close()
        await writer.wait_closed()
        del reader
        return int(cert["serialNumber"], 16)

    before = await serial()
    pki.issue("server", "/CN=exporter", "subjectAltName=IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth\n")
    assert await serial() != before
    assert exporter.logged("web config: TLS certificate reloaded")
    assert (await get(url, pki.client("prometheus"), good))[0] == 200


async def test_real_prometheus_scrapes_and_alertmanager_posts_over_tls(
    netns: Callable[[str], NetNS], start_dns: StartDNS, tmp_path: Path, pki: PKI
) -> None:
    reason = monitoring_missing()
    if reason:
        missing("Prometheus and Alertmanager", reason)
    ns = netns("tls")
    dns = start_dns(Behaviour.HEALTHY, netns=ns, port=53)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    (tmp_path / "password").write_text(PASSWORD)
    config = web_config(pki, tmp_path / "web.yml")
    exporter = Exporter(["--server", dns.address, "--web-config-file", str(config),
                         "--webhook-token-file", str(token), "--listen", "127.0.0.1:9953"],
                        netns=ns)
    # An alert the route sends to the webhook, at once: the static exporter answers each
    # post with the skip `no_kubernetes`, counted.
    alerting = {"groups": [{"name": "t", "interval": "1s", "rules": [{
        "alert": "CoreDNSPodUDPFailing", "expr": "vector(1)",
        "labels": {"namespace": "kube-system", "pod": "coredns-x"}}]}]}
    monitoring = Monitoring(
        ns, tmp_path / "monitoring", "127.0.0.1:9953", token, alerting,
        scrape_configs=[{
            "job_name": "coredns-health-exporter", "scheme": "https",
            "tls_config": {"ca_file": pki.path("ca.crt"), "cert_file": pki.path("prometheus.crt"),
                           "key_file": pki.path("prometheus.key")},
            "basic_auth": {"username": "prometheus",
                           "password_file": str(tmp_path / "password")},
            "static_configs": [{"targets": ["127.0.0.1:9953"]}]}],
        webhook_tls={"ca_file": pki.path("ca.crt"), "cert_file": pki.path("alertmanager.crt"),
                     "key_file": pki.path("alertmanager.key")})
    try:
        def scraped() -> bool:
            return bool(monitoring.query('up{job="coredns-health-exporter"} == 1')) and bool(
                monitoring.query("dnsprobe_success == 1"))

        assert await wait_until(scraped, 60), monitoring.query("up")

        def posted() -> bool:
            return bool(monitoring.query('dnsprobe_remediations_total{result="no_kubernetes"}'
                                         " > 0"))

        assert await wait_until(posted, 60), monitoring.query("dnsprobe_remediations_total")
        body = await _metrics(exporter, pki)
        assert any(s.name == "dnsprobe_remediations_total" and s.value > 0
                   and s.labels["result"] == "no_kubernetes" for s in samples(body))
    finally:
        monitoring.stop()
        exporter.stop()


async def _metrics(exporter: Exporter, pki: PKI) -> str:
    """/metrics through the relay to the namespace (TLS passes through it untouched)."""
    status, _, body = await get(f"https://{exporter.address}/metrics",
                                pki.client("prometheus"),
                                basic("prometheus", PASSWORD))
    assert status == 200
    return body


def test_certificate_files_need_no_writable_temporary_directory(
        pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a read-only root filesystem (the shipped pods) there is no temporary
    directory: certificate files are loaded where they are."""
    import tempfile

    from exporter.web.access import WebAccess

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "read-only-nowhere"))
    access = WebAccess(str(web_config(pki, tmp_path / "web.yml")))
    assert access.ssl_context is not None
