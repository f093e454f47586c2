"""``medloupe serve``: a real server process on loopback, driven over HTTP."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from medloupe.errors import InputError, UnsupportedImageError
from medloupe.service import check_binding, is_loopback
from medloupe.service.uploads import sniff_upload
from tests.conftest import cli_env
from tests.service_helpers import Server, blood_smear_png, post_run, sse_events, wait_done

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("svc")
    srv = Server(home, "--workers", "2", env={"MEDLOUPE_MAX_UPLOAD_MB": "2"}).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_sniff_upload_judges_content_not_names() -> None:
    assert sniff_upload(b"\x89PNG\r\n\x1a\n" + b"\0" * 400) == ".img"
    assert sniff_upload(b"\0" * 128 + b"DICM" + b"\0" * 300) == ".dcm"
    nifti = bytearray(352)
    nifti[0:4] = (348).to_bytes(4, "little")
    nifti[344:348] = b"n+1\x00"
    assert sniff_upload(bytes(nifti)) == ".nii"
    assert sniff_upload(gzip.compress(bytes(nifti) + b"\0" * 1000)[:512]) == ".nii.gz"
    with pytest.raises(UnsupportedImageError, match="not an image"):
        sniff_upload(b"%PDF-1.7 " + b"x" * 400)


def test_binding_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(InputError, match="MEDLOUPE_API_TOKEN"):
        check_binding("0.0.0.0", None)
    with pytest.raises(InputError, match="too weak"):
        check_binding("0.0.0.0", "short")
    for weak in ("x" * 32, " " * 16, "correct horse battery staple"):
        with pytest.raises(InputError, match="too weak"):
            check_binding("0.0.0.0", weak)
    check_binding("0.0.0.0", "Xq3-vT9pL2mZ8rW5kY7b")
    check_binding("127.0.0.1", None)


def test_cli_refuses_public_bind_without_token(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    env.pop("MEDLOUPE_API_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "medloupe", "serve", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "MEDLOUPE_API_TOKEN" in proc.stderr


def test_run_streams_every_step_then_serves_answer_trace_artifacts_and_reviews(
    client: httpx.Client, tmp_path: Path
) -> None:
    smear = blood_smear_png(tmp_path / "smear.png")
    resp = post_run(client, smear, "Where are the white blood cells?", {"max_steps": 1})
    assert resp.status_code == 202, resp.text
    created = resp.json()
    run_id = created["run_id"]
    assert created["links"]["events"] == f"/v1/runs/{run_id}/events"

    events = list(sse_events(client, run_id))
    names = [n for n, _ in events]
    assert names[-3:] == ["run_end", "answer", "end"]
    seqs = [d["seq"] for n, d in events if n not in ("answer", "end")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    nodes_started = {d["node"] for n, d in events if n == "node_start"}
    assert {"intake", "think", "plan", "act", "retrieve", "rethink", "answer"} <= nodes_started
    tools = [d["name"] for n, d in events if n == "tool_call"]
    assert "count_cells" in tools and "crop" in tools
    started = [d["name"] for n, d in events if n == "tool_start"]
    assert sorted(started) == sorted(tools)  # each tool call streams its start and its end
    first_start = names.index("tool_start")
    assert first_start < names.index("tool_call")
    assert any(n == "rethink_round" for n, _ in events)
    answer = dict(events)["answer"]
    assert answer["short_answer"] and answer["claims"]

    # Last-Event-ID: a reconnecting client gets only what it missed
    with client.stream(
        "GET", f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(seqs[-2])}
    ) as r:
        body = r.read().decode()
    assert f"id: {seqs[-1]}\n" in body and f"id: {seqs[-2]}\n" not in body

    info = client.get(f"/v1/runs/{run_id}").json()
    assert info["status"] == "done" and info["error"] is None
    assert info["answer"]["short_answer"] == answer["short_answer"]
    assert info["question"] == "Where are the white blood cells?"
    assert any(r["run_id"] == run_id for r in client.get("/v1/runs").json())

    trace = client.get(f"/v1/runs/{run_id}/trace").json()
    assert trace["run_id"] == run_id and trace["answer"]["short_answer"] == answer["short_answer"]
    cited = {i for c in answer["claims"] for i in c["evidence_ids"]}
    assert cited <= {e["id"] for e in trace["evidence"]}

    image_id = trace["meta"]["image"]["display_artifact"]
    img = client.get(f"/v1/runs/{run_id}/artifacts/{image_id}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content.startswith(b"\x89PNG")
    crop_ids = [a for e in trace["events"] if e["kind"] == "rethink_round" for a in e["payload"]["crops"]]
    assert crop_ids and client.get(f"/v1/runs/{run_id}/artifacts/{crop_ids[0]}").status_code == 200

    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Where are the white blood cells?" in page.text and "data:image/png;base64," in page.text
    assert "review-form" in page.text

    review = client.post(
        f"/v1/runs/{run_id}/reviews", json={"verdict": "agree", "comment": "both cells boxed"}
    )
    assert review.status_code == 201, review.text
    assert review.json()["verdict"] == "agree"
    assert client.get(f"/v1/runs/{run_id}").json()["reviews"][0]["comment"] == "both cells boxed"
    assert client.get(f"/v1/runs/{run_id}/trace").json()["reviews"][0]["verdict"] == "agree"


def test_malformed_requests_get_the_right_4xx_and_the_server_stays_healthy(
    client: httpx.Client, ct_dcm: Path, tmp_path: Path
) -> None:
    good = ct_dcm.read_bytes()
    q = "What organ is shown?"
    # multipart without the image / without the question
    r = client.post("/v1/runs", data={"question": q})
    assert r.status_code == 422
    r = client.post("/v1/runs", files={"image": ("a.dcm", good, "application/dicom")})
    assert r.status_code == 422
    # not multipart at all
    assert client.post("/v1/runs", json={"question": q}).status_code == 422
    # bytes of no image format, whatever the name says
    r = post_run(client, b"%PDF-1.7\n" + b"x" * 1000, q, name="scan.dcm")
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    # empty upload
    assert post_run(client, b"", q).status_code == 415
    # a DICOM cut short: readable header, pixels missing
    r = post_run(client, good[: len(good) // 3], q)
    assert r.status_code == 400, r.text
    assert str(tmp_path) not in r.text and "uploads" not in r.json()["detail"]
    # over the upload limit (2 MB in this server) and without a length
    r = post_run(client, b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024), q)
    assert r.status_code == 413 and "MEDLOUPE_MAX_UPLOAD_MB" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b"--x\r\n"

    r = client.post(
        "/v1/runs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 411
    # wrong types and unknown options
    assert post_run(client, good, "   ").status_code == 422
    r = post_run(client, good, q, {"max_steps": "many"})
    assert r.status_code == 422 and "max_steps" in r.text
    assert post_run(client, good, q, {"review_plan": True}).status_code == 422
    r = client.post(
        "/v1/runs",
        files={"image": ("a", good, "application/dicom")},
        data={"question": q, "options": "{not json"},
    )
    assert r.status_code == 422
    # unknown run ids, artifacts and bad reviews
    assert client.get("/v1/runs/run-20000101-000000-abcdef").status_code == 404
    assert client.get("/v1/runs/../../etc/passwd").status_code == 404
    assert client.get("/v1/runs/nope/events").status_code == 404
    assert client.get("/runs/nope").status_code == 404
    ok = post_run(client, good, q)
    assert ok.status_code == 202
    run_id = ok.json()["run_id"]
    assert client.get(f"/v1/runs/{run_id}/artifacts/..%2Frun.json").status_code == 404
    assert client.get(f"/v1/runs/{run_id}/artifacts/image-0000000000000000.png").status_code == 404
    assert client.post(f"/v1/runs/{run_id}/reviews", json={"verdict": "maybe"}).status_code == 422
    r = client.post(f"/v1/runs/{run_id}/reviews", json={"verdict": "agree", "x": 1})
    assert r.status_code == 422
    # still healthy, and the good run finishes
    assert client.get("/healthz").json()["status"] == "ok"
    assert wait_done(client, run_id)["status"] == "done"
    assert client.get("/v1/tools").status_code == 200


def test_tool_catalogue_and_openapi(client: httpx.Client) -> None:
    tools = {t["name"]: t for t in client.get("/v1/tools").json()}
    assert {"crop", "segment", "count_cells", "measure"} <= set(tools)
    assert tools["crop"]["input_schema"]["type"] == "object"
    assert isinstance(tools["segment"]["available"], bool)
    spec = client.get("/openapi.json").json()
    assert "/v1/runs" in spec["paths"] and "/v1/runs/{run_id}/events" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_full_queue_answers_429_and_accepted_runs_all_finish(
    tmp_path: Path, chest_dcm: Path
) -> None:
    srv = Server(tmp_path / "home", "--workers", "1", "--queue", "0").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            data = chest_dcm.read_bytes()
            with ThreadPoolExecutor(4) as pool:
                answers = list(
                    pool.map(lambda _: post_run(c, data, "Is this a chest X-ray?"), range(4))
                )
            codes = sorted(r.status_code for r in answers)
            assert 202 in codes and 429 in codes, codes
            busy = next(r for r in answers if r.status_code == 429)
            assert busy.headers["retry-after"] and "retry later" in busy.json()["detail"]
            for r in answers:
                if r.status_code == 202:
                    assert wait_done(c, r.json()["run_id"])["status"] == "done"
    finally:
        srv.stop()


def test_restart_resumes_interrupted_runs_and_fails_unrecoverable_ones_with_a_reason(
    tmp_path: Path, chest_dcm: Path
) -> None:
    home = tmp_path / "home"
    srv = Server(home, "--workers", "1", "--queue", "8").start()
    data = chest_dcm.read_bytes()
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        ids = [post_run(c, data, f"Question {i}: what modality is this?").json()["run_id"] for i in range(4)]
    srv.kill()  # a crash: no shutdown code runs

    db = sqlite3.connect(home / "service.sqlite")
    rows = dict(db.execute("SELECT run_id, status FROM runs").fetchall())
    dirs = dict(db.execute("SELECT run_id, dir FROM runs").fetchall())
    db.close()
    assert set(rows) == set(ids)
    unfinished = [i for i in ids if rows[i] not in ("done", "failed")]
    assert len(unfinished) >= 2, rows
    lost = unfinished[-1]  # its directory disappears while the server is down
    import shutil

    shutil.rmtree(dirs[lost])

    srv2 = Server(home, "--workers", "2").start()
    try:
        with httpx.Client(base_url=srv2.url, timeout=120) as c:
            final = {i: wait_done(c, i) for i in ids}
            listed = {r["run_id"] for r in c.get("/v1/runs").json()}
    finally:
        srv2.stop()
    assert set(ids) <= listed  # earlier runs are still listed and served
    assert final[lost]["status"] == "failed" and "lost its run directory" in final[lost]["error"]
    for i in ids:
        if i != lost:
            assert final[i]["status"] == "done", final[i]
            assert final[i]["answer"]["short_answer"]
    assert any(final[i]["resumes"] >= 1 for i in unfinished if i != lost)
    for i in unfinished:
        if i != lost:
            trace = json.loads((Path(dirs[i]) / "trace.json").read_text())
            assert trace["answer"] is not None


def test_token_is_required_when_configured(tmp_path: Path, ct_dcm: Path) -> None:
    token = "t0ken-a1b2c3d4e5f6g7h8i9j0"
    srv = Server(tmp_path / "home", env={"MEDLOUPE_API_TOKEN": token}).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/healthz").status_code == 200
            r = c.get("/v1/runs")
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert post_run(c, ct_dcm, "What is shown?").status_code == 401
            assert c.get("/v1/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/docs").status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            assert c.get("/v1/runs", headers=auth).status_code == 200
            assert c.get(f"/v1/runs?access_token={token}").status_code == 200
    finally:
        srv.stop()
