"""TLS both ways: to an ``https://`` upstream whose certificate a private CA signed (``ca_file``),
refused when the chain does not verify; and on the proxy's own listener (``listen.tls``).
The CA and certificates are made per test session with the ``openssl`` command line."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.standins import StandIn
from tests.conftest import ProxyFactory, proxy_config
from tests.helpers.recording_upstream import recorder_server
from tests.helpers.service import running
from tests.helpers.through_proxy import CHAT, final_record

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(folder: Path, name: str) -> Pki:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by that CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", f"/CN=wattproxy test CA {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    openssl(
        "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=folder,
    )  # fmt: skip
    (folder / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
        cwd=folder,
    )  # fmt: skip
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "a")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-other"), "b")


def https_url(server: TestServer) -> str:
    return f"https://127.0.0.1:{server.port}"


async def test_https_upstream_with_a_private_ca(
    aiohttp_server: Any, make_proxy: ProxyFactory, tmp_path: Path, pki: Pki
) -> None:
    standin = StandIn(flavor="vllm", scale=0.0)
    up = await aiohttp_server(standin.app(), ssl=pki.server_context())
    url = https_url(up)
    cfg = proxy_config(
        url, tmp_path, upstreams=[{"name": "llm", "url": url, "ca_file": str(pki.ca_file)}]
    )
    proxy, _ = await make_proxy(cfg)
    base = f"http://127.0.0.1:{proxy.port}"
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 16
            rid = r.headers["X-Request-Id"]
        async with s.post(base + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
    assert len(standin.requests) == 2
    rec = await final_record(base, rid)
    assert rec["status"] == 200 and rec["outcome"] == "ok"


@pytest.mark.parametrize("trust", ["system", "other-ca"])
async def test_https_upstream_that_does_not_verify_is_refused(
    aiohttp_server: Any,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    pki: Pki,
    other_pki: Pki,
    trust: str,
) -> None:
    rec, up = await recorder_server_tls(aiohttp_server, pki)
    url = https_url(up)
    upstream: dict[str, Any] = {"name": "llm", "url": url}
    if trust == "other-ca":
        upstream["ca_file"] = str(other_pki.ca_file)
    proxy, _ = await make_proxy(proxy_config(url, tmp_path, upstreams=[upstream]))
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["type"] == "upstream_error"
    assert rec.seen == []  # not one byte of the request went to an unverified peer


async def recorder_server_tls(aiohttp_server: Any, pki: Pki) -> Any:
    async def with_tls(app: Any, **kw: Any) -> Any:
        return await aiohttp_server(app, ssl=pki.server_context(), **kw)

    return await recorder_server(with_tls)


async def test_tls_on_the_listener(
    aiohttp_server: Any, tmp_path: Path, pki: Pki, other_pki: Pki
) -> None:
    standin = StandIn(flavor="vllm", scale=0.0)
    up = await aiohttp_server(standin.app())
    cfg = proxy_config(
        f"http://127.0.0.1:{up.port}",
        tmp_path,
        listen={
            "host": "127.0.0.1",
            "port": 0,
            "tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)},
        },
    )
    async with running(cfg) as svc, aiohttp.ClientSession() as s:
        base = f"https://127.0.0.1:{svc.port}"
        async with s.post(base + "/v1/chat/completions", json=CHAT, ssl=pki.client_context()) as r:
            assert r.status == 200
            assert (await r.json())["model"] == "m"
        # a client that does not trust the CA gets no answer
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(base + "/healthz", ssl=other_pki.client_context()) as r:
                await r.read()
        # plain HTTP on the TLS port gets no HTTP answer either
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{svc.port}/healthz") as r:
                await r.read()
    assert len(standin.requests) == 1
