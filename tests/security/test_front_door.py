"""The HTTP front door of `medloupe serve` (a real server process on loopback), as an attacker
or a careless deployment would meet it: body limits however the body is framed, DNS
rebinding, cross-site form posts, security headers, the token in logs, weak tokens, raw
uploads left by a kill, and two servers on one home."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import Server, free_port, post_run

pytestmark = pytest.mark.slow

TOKEN = "Zq8-xV3pL0mN7rT2wY5u"


def raw(port: int, head: bytes, body: bytes) -> bytes:
    """Send a raw request (head, then body) and return the server's reply. A server that
    refuses on the headers answers before the body is sent: that reply is returned."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        s.settimeout(2)
        try:
            early = s.recv(65536)
        except TimeoutError:
            early = b""
        if early:
            return early
        s.settimeout(30)
        try:
            s.sendall(body)
            return s.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as exc:
            return f"reset {exc}".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("front-door")
    leftover = home / "uploads" / "tmpkilled"
    leftover.mkdir(parents=True)
    (leftover / "upload.dcm").write_bytes(b"PATIENT NAME ZANZIBAROV")  # a killed intake's file
    srv = Server(home, "--vlm", "none", env={"MEDLOUPE_MAX_UPLOAD_MB": "1"}).start()
    yield srv
    srv.stop()


def test_leftover_uploads_are_removed_at_start(server: Server) -> None:
    assert not (server.home / "uploads" / "tmpkilled").exists()


def test_body_limits_hold_however_the_body_is_framed(server: Server) -> None:
    body = b"x" * (2_500_000)
    framed = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    both = raw(
        server.port,
        b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n",
        framed,
    )
    assert both.split(b" ", 2)[1] in (b"400", b"413"), both[:200]
    chunked = raw(
        server.port,
        b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n",
        framed,
    )
    assert chunked.split(b" ", 2)[1] in (b"411", b"413"), chunked[:200]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert post_run(c, body, "q").status_code == 413  # declared
        assert c.get("/v1/runs").json() == []  # nothing got in


def test_dns_rebinding_and_cross_site_posts_are_refused(server: Server) -> None:
    from pydicom.data import get_testdata_file

    small = Path(str(get_testdata_file("CT_small.dcm")))  # under the server's 1 MB limit
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.get("/v1/runs", headers={"Host": "attacker.example"})
        assert r.status_code == 421 and "attacker.example" in r.json()["detail"]
        assert c.get("/v1/runs", headers={"Host": f"localhost:{server.port}"}).status_code == 200
        evil = c.post(
            "/v1/runs",
            files={"image": ("a.dcm", small.read_bytes(), "application/octet-stream")},
            data={"question": "What is shown?"},
            headers={"Origin": "http://attacker.example"},
        )
        assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
        assert c.post("/v1/runs", files={"image": ("a", b"", "x")},
                      headers={"Origin": "null"}).status_code == 403
        same = c.post(
            "/v1/runs",
            files={"image": ("a.dcm", small.read_bytes(), "application/octet-stream")},
            data={"question": "What is shown?"},
            headers={"Origin": server.url},
        )
        assert same.status_code == 202, same.text


def test_security_headers_on_every_response(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for path in ("/healthz", "/v1/runs", "/runs/nope", "/nope"):
            h = c.get(path).headers
            assert h["x-content-type-options"] == "nosniff", path
            assert h["x-frame-options"] == "DENY" and h["referrer-policy"] == "no-referrer"
            assert "frame-ancestors 'none'" in h["content-security-policy"]
            assert "script-src 'sha256-" in h["content-security-policy"]


def test_the_token_never_reaches_the_access_log(tmp_path: Path) -> None:
    srv = Server(tmp_path / "home", "--vlm", "none", env={"MEDLOUPE_API_TOKEN": TOKEN}).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get(f"/v1/runs?access_token={TOKEN}").status_code == 200
            assert c.get(f"/runs/x?a=1&access_token={TOKEN}&b=2").status_code == 404
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "access_token=***" in log  # the access log ran, masked
    assert TOKEN not in log


@pytest.mark.parametrize("token", [" " * 16, "aaaaaaaaaaaaaaaaaaaa", "short"])
def test_weak_tokens_are_refused(token: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medloupe", "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MEDLOUPE_HOME": str(tmp_path), "MEDLOUPE_API_TOKEN": token},
    )
    assert done.returncode == 2 and "too weak" in done.stderr, done.stderr[-2000:]


def test_a_second_server_on_the_same_home_is_refused(server: Server) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "medloupe", "serve", "--port", str(free_port()), "--vlm", "none"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MEDLOUPE_HOME": str(server.home)},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another medloupe serve (pid" in done.stderr
