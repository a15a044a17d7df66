"""The diagnose server's outer guards on a real uvicorn (issue 16, item 8): huge ids are a JSON 4xx with the
security headers, unknown Host names are refused (DNS rebinding), a chunked oversized body is 413, and
/api/info does not reveal the absolute DB path."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import httpx
import pytest

from diagnose_helpers import LiveServer, build_tiny_db, make_engine
from safesail.diagnose.api.common import ServerSettings
from safesail.diagnose.guard import allowed_host_names, host_name
from safesail.diagnose.server import create_app


@pytest.fixture(scope="module")
def db_path(tiny_model, tmp_path_factory):
    return build_tiny_db(tiny_model, [0, 1], tmp_path_factory.mktemp("guards"))


@pytest.fixture(scope="module")
def server(tiny_model, db_path):
    engine = make_engine(tiny_model, db_path, max_new_tokens_limit=16)
    with LiveServer(create_app(engine, ServerSettings(max_body_bytes=4096))) as srv:
        yield srv


def _secure(r) -> None:
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert "content-security-policy" in r.headers
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("path", ["/api/latents/0/9223372036854775808", "/api/latents/0/-1",
                                  "/api/latents/99999999999999999999999/0"])
def test_out_of_range_ids_are_a_json_4xx_with_the_headers(server, path):
    r = httpx.get(server.url + path)
    assert 400 <= r.status_code < 500, r.text
    _secure(r)
    assert r.json()["error"] in ("invalid", "not_found") and r.json()["message"].endswith(".")
    ok = httpx.get(server.url + "/api/latents/0/9223372036854775807")  # the largest SQLite integer: not found
    assert ok.status_code == 404 and ok.json()["error"] == "not_found"


def test_an_unexpected_failure_is_a_json_500_with_the_headers(server, monkeypatch):
    from safesail.neurondb import NeuronDB

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(NeuronDB, "latent", boom)
    r = httpx.get(server.url + "/api/latents/0/1")
    assert r.status_code == 500
    _secure(r)
    assert r.json()["error"] == "internal" and "a bug" not in r.text


def _get_with_host(server, host: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("GET", "/api/info", skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def test_only_the_bound_host_names_are_served(server):
    for good in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost", f"[::1]:{server.port}"):
        status, _, body = _get_with_host(server, good)
        assert status == 200, (good, body)
    for bad in (f"evil.example:{server.port}", "attacker.test", f"127.0.0.1.evil.example:{server.port}"):
        status, headers, body = _get_with_host(server, bad)
        assert status == 400 and json.loads(body)["error"] == "bad_host", (bad, body)
        assert headers["x-frame-options"] == "DENY"


def test_allowed_host_names():
    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("10.1.2.3") == {"10.1.2.3"}
    assert allowed_host_names("127.0.0.1", ["diag.lab.example"]) == {"diag.lab.example"}
    assert allowed_host_names("0.0.0.0", ["*"]) is None
    assert "localhost" in allowed_host_names("0.0.0.0")
    assert host_name(b"[::1]:8765") == "::1" and host_name(b"LocalHost.:80") == "localhost"


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():
        payload = json.dumps({"query": "x" * (2 << 20)}).encode()
        for i in range(0, len(payload), 64 << 10):
            yield payload[i:i + (64 << 10)]

    r = httpx.post(server.url + "/api/diagnose", content=chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text
    _secure(r)
    assert r.json()["error"] == "too_large"


def test_info_does_not_reveal_the_db_folder(server, db_path):
    info = httpx.get(server.url + "/api/info").json()
    assert info["db_path"] == Path(db_path).name
    assert "/" not in info["db_path"] and str(db_path) not in json.dumps(info)
