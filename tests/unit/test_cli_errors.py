"""Connection problems in plain words, one line, with the fix: never `unreachable:
ClientConnectorError`. Each case is made for real (a closed port, a name DNS cannot resolve, a
server whose certificate nobody trusts)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shoal import errors
from shoal.cli import main
from tests.support.procs import free_port


async def problem(url: str, **kwargs: object) -> str:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(url, **kwargs):  # type: ignore[arg-type]
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            where = url.split("/")[2]
            return errors.connection_problem(exc, where)
    raise AssertionError(f"{url} answered")


async def test_connection_refused() -> None:
    port = free_port()
    assert await problem(f"http://127.0.0.1:{port}/v2/") == \
        f"connection refused at 127.0.0.1:{port}: is the registry running there, on that port?"


async def test_name_not_found() -> None:
    line = await problem("http://registry.nonexistent.invalid:5000/v2/")
    assert line == "name not found: registry.nonexistent.invalid (DNS has no address for it): check the host " \
                   "name in the URL"


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test registry")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async def v2(_request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v2/", v2)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{port}/v2/", cert
    finally:
        await runner.cleanup()


async def test_tls_verification_names_the_ca_option_and_it_works(
        https_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = https_server
    line = await problem(url)
    port = url.split(":")[2].split("/")[0]
    assert line.startswith(f"TLS verification of 127.0.0.1:{port} failed (")
    assert "SSL_CERT_FILE" in line and "\n" not in line
    # the hint is what the components' default context honours
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    async with aiohttp.ClientSession() as http, http.get(url, ssl=ssl.create_default_context()) as resp:
        assert resp.status == 200


async def test_no_answer_in_time() -> None:
    # a listener that never accepts: the connection is made by the kernel, the answer never comes
    server = await asyncio.start_server(lambda _r, _w: asyncio.sleep(30), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        line = await problem(f"http://127.0.0.1:{port}/v2/", timeout=aiohttp.ClientTimeout(total=0.3))
    finally:
        server.close()
    assert line == f"no answer from 127.0.0.1:{port} in time: is the registry up, and is the address reachable " \
                   "from here?"


def test_login_refused_names_user_and_realm() -> None:
    assert errors.login_refused("seeder", "basic-realm") == \
        "the registry refused the login of user 'seeder' at realm 'basic-realm' (HTTP 401)"


def test_status_of_a_component_that_is_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["status", "--agent", f"http://127.0.0.1:{port}", "--origin", "", "--tracker", ""]) == 1
    out = capsys.readouterr().out
    assert f"connection refused at 127.0.0.1:{port}: is the agent running there, on that port?" in out
    assert "ClientConnectorError" not in out and "unreachable" not in out


def test_seed_against_an_origin_that_is_not_running(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("shoal_op_" + "a" * 40)
    port = free_port()
    assert main(["seed", "--origin", f"http://127.0.0.1:{port}", "--token-file", str(token),
                 "registry.test/app:v1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shoal seed: cannot reach the origin: connection refused at 127.0.0.1:{port}: is the origin "
                   "running there, on that port?"]


# (attack17) a login in a component's URL was printed whole: `shoal status` showed it in its table
# and in "connection refused at op:PASSWORD@host:port", `shoal seed`/`audit` in their error lines,
# and a URL of another scheme was echoed as given
@pytest.mark.parametrize("argv", [
    ["status", "--origin", "http://op:hunter2secret@127.0.0.1:{port}", "--agent", "", "--tracker", ""],
    ["status", "--agent", "http://hunter2secret@127.0.0.1:{port}", "--origin", "", "--tracker", ""],
    ["status", "--origin", "ftp://op:hunter2secret@127.0.0.1:{port}", "--agent", "", "--tracker", ""],
    ["seed", "--origin", "http://op:hunter2secret@127.0.0.1:{port}", "--token-file", "{token}", "registry.test/a:1"],
    ["audit", "--origin", "https://op:pa/hunter2secret@127.0.0.1:{port}", "--token-file", "{token}"],
])
def test_a_login_in_a_components_url_is_never_printed(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("shoal_op_" + "a" * 40)
    args = [a.format(port=free_port(), token=token) for a in argv]
    try:
        status = main(args)
        shown = capsys.readouterr()
        text = shown.out + shown.err
    except SystemExit as exc:  # (its message is what the shell prints)
        status, text = 2, str(exc.code)
    assert status != 0
    assert "hunter2secret" not in text
    assert "no login in the URL" in text or "***@" in text


async def test_an_answer_that_breaks_off() -> None:
    async def short(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as resp:
            with pytest.raises(aiohttp.ClientPayloadError) as broke:
                await resp.read()
    finally:
        server.close()
    assert errors.read_problem(broke.value, f"registry 127.0.0.1:{port}") == \
        f"registry 127.0.0.1:{port}'s answer broke off (shorter than it said, or a broken encoding)"
