"""The worklist, study and jobs pages over HTTP while a study flows through the node."""

from __future__ import annotations

import dataclasses
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.config import HttpSettings
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from integration.peers import wait_until


def start_with_http(node_factory: Callable[..., Node], **kwargs: object) -> Node:
    base = node_factory(start=False, **kwargs).config
    node = Node(dataclasses.replace(base, http=HttpSettings(enabled=True, port=0)))
    node.start()
    return node


def request(
    node: Node, path: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    assert node.http is not None
    body = None if data is None else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{node.http.port}{path}", body, headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def page(node: Node, path: str) -> str:
    status, body, _ = request(node, path)
    assert status == 200, body[:500]
    return body.decode()


def send_and_wait_done(node: Node, files: list[Path]) -> str:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "PACS")
    assert all(r.ok for r in results)
    study_uid = node.index.studies()[0].study_instance_uid
    wait_until(lambda: 'data-state="done"' in page(node, "/"), 120, "the study to show as done")
    return study_uid


def test_a_study_flows_through_the_pages(
    node_factory: Callable[..., Node], folder_scp: FolderSCP, phantom_files: list[Path]
) -> None:
    # Given a node with its HTTP port and a PACS that accepts the results
    node = start_with_http(node_factory, pacs_port=folder_scp.port)
    try:
        # When a study is sent and processed
        study_uid = send_and_wait_done(node, phantom_files)
        # Then the worklist shows it with its priority, findings and delivery
        worklist = page(node, "/")
        assert study_uid in worklist
        assert "routine" in worklist
        assert "finding(s)" in worklist
        assert re.search(r"pacs: \d+ done", worklist)
        # and the study page shows the SR's findings, key slices and every attempt
        study = page(node, f"/studies/{study_uid}")
        assert "Volume" in study and "Tracking ID" in study
        assert "completed after the 1 s quiet period" in study  # the PACS does not count
        slices = re.findall(r'src="(/jobs/\d+/slices/[^"]+\.png)"', study)
        assert slices
        status, png, headers = request(node, urllib.parse.unquote(slices[0]))
        assert status == 200 and headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png))
        assert image.size[0] >= 384
        assert "sent" in study  # the delivery attempts, from the audit trail
        # and the view was audited, without patient data
        views = [r for r in read_audit(node.config.node.audit_path) if r["event"] == "page_view"]
        assert views[-1]["study_instance_uid"] == study_uid
        assert "PatientName" not in str(views[-1])
        # When the operator retries the job from the jobs page
        job = node.jobs.list_jobs()[0]
        status, _, headers = request(
            node, f"/jobs/{job.id}/retry", {"next": "/jobs"}, {"Origin": "http://evil.example"}
        )
        assert status == 403
        status, _, headers = request(node, f"/jobs/{job.id}/retry", {"next": "/jobs"})
        # Then the page says what the outbox answered: re-queued, or why not (a done job
        # may need an explicit force, depending on Outbox.retry_job)
        assert status == 303
        assert headers["location"].startswith("/jobs?message=")
        message = urllib.parse.unquote(headers["location"])
        assert f"job {job.id}" in message
        if message.endswith("queued"):
            wait_until(lambda: node.jobs.get(job.id).state == "done", 120, "the retried job")
        else:
            assert "not retried" in message
            assert "not retried" in page(node, headers["location"])
    finally:
        node.stop(timeout=30)


def test_static_files_and_unknown_study(node_factory: Callable[..., Node]) -> None:
    node = start_with_http(node_factory)
    try:
        assert "fetch(" in page(node, "/static/refresh.js")
        assert request(node, "/studies/1.2.3")[0] == 404
        assert "No studies yet" in page(node, "/")
        assert "No dead-lettered results" in page(node, "/jobs")
    finally:
        node.stop(timeout=30)


def test_a_browser_signs_in_with_the_token(node_factory: Callable[..., Node]) -> None:
    # Given a node that requires a token
    base = node_factory(start=False).config
    node = Node(dataclasses.replace(base, http=HttpSettings(enabled=True, port=0, token="s3cret")))
    node.start()
    try:
        # When a browser asks for the worklist, it is sent to sign in
        status, _, headers = request(node, "/", headers={"Accept": "text/html"})
        assert status == 303 and headers["location"] == "/login"
        assert request(node, "/login", {"token": "wrong"})[0] == 401
        # Then the right token gives a cookie that opens the pages
        status, _, headers = request(node, "/login", {"token": "s3cret"})
        assert status == 303
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        status, body, _ = request(node, "/", headers={"Cookie": cookie.split(";")[0]})
        assert status == 200 and b"Worklist" in body
        assert request(node, "/jobs")[0] == 401
    finally:
        node.stop(timeout=30)
