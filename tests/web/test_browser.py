"""The pages in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, while a study flows through the node.

It checks what a person would see: the study appears and its state changes without a
reload, the findings and priority match the node's records, the key slices load, and a
dead-lettered job is re-sent from the jobs page.  Screenshots are kept in
``tests/web/artifacts/`` (or ``$DICOMNODE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicomnode.app.node import Node
from dicomnode.config import HttpSettings, RetrySettings
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.web import pages
from dicomnode.web.views import findings_text, priority_of

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("DICOMNODE_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = "Debian's chromium and chromium-driver are not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; they are required in CI", pytrace=False)
        pytest.skip(f"{message} (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    chromium, driver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1000",
    ):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    session.set_page_load_timeout(60)
    yield session
    session.quit()


def screenshot(browser: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def row_state(browser: WebDriver, study_uid: str) -> str:
    """The study's state in the worklist ("" while the page is being refreshed: a row found
    just before the page replaced it is stale)."""
    try:
        rows = browser.find_elements(By.CSS_SELECTOR, f'tr.study[data-study="{study_uid}"]')
        return rows[0].get_attribute("data-state") or "" if rows else ""
    except StaleElementReferenceException:
        return ""


def test_a_person_follows_a_study_and_resends_its_results(
    node_factory: Callable[..., Node],
    phantom_files: list[Path],
    free_port: Callable[[], int],
    tmp_path: Path,
    browser: WebDriver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a node whose PACS is down (one try, then the results are dead-lettered)
    monkeypatch.setattr(pages, "REFRESH_S", 1)
    pacs_port = free_port()
    base = node_factory(
        start=False,
        pacs_port=pacs_port,
        quiet_period_s=3.0,
        delivery=RetrySettings(max_attempts=1, backoff_initial_s=0.2, backoff_max_s=0.5),
    ).config
    node = Node(dataclasses.replace(base, http=HttpSettings(enabled=True, port=0)))
    node.start()
    pacs: FolderSCP | None = None
    wait = WebDriverWait(browser, 120, poll_frequency=0.2)
    try:
        assert node.http is not None
        url = f"http://127.0.0.1:{node.http.port}"
        browser.get(url + "/")
        assert "No studies yet" in browser.page_source
        # When a study arrives, the open worklist shows it receiving, then failed
        # (delivery dead-lettered), without a reload
        results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        assert all(r.ok for r in results)
        study_uid = node.index.studies()[0].study_instance_uid
        seen: set[str] = set()

        def state_is(wanted: str) -> bool:
            seen.add(row_state(browser, study_uid))
            return wanted in seen

        wait.until(lambda _: state_is("receiving"))
        screenshot(browser, "worklist-receiving")
        wait.until(lambda _: state_is("failed"))
        assert {"receiving", "failed"} <= seen
        # Then the findings and priority are those the node recorded
        (job,) = node.jobs.list_jobs()
        row = browser.find_element(By.CSS_SELECTOR, f'tr.study[data-study="{study_uid}"]')
        assert priority_of(job) in row.find_element(By.CSS_SELECTOR, ".priority").text.lower()
        findings = row.find_element(By.CSS_SELECTOR, "td.findings").text
        for line in findings_text(job):
            assert line in findings
        assert "pacs:" in row.text and "dead" in row.text
        screenshot(browser, "worklist-failed")

        # When the person opens the study
        row.find_element(By.CSS_SELECTOR, "a").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "table.findings-table"))
        # Then the SR's findings are a table and the key slices have loaded
        table_rows = browser.find_elements(By.CSS_SELECTOR, "table.findings-table tbody tr")
        assert len(table_rows) >= 1
        assert "Volume" in browser.find_element(By.CSS_SELECTOR, "table.findings-table").text
        wait.until(
            lambda b: all(
                b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                for i in b.find_elements(By.CSS_SELECTOR, ".slices img")
            )
        )
        assert browser.find_elements(By.CSS_SELECTOR, ".slices img")
        attempts = browser.find_element(By.CSS_SELECTOR, "table.attempts").text
        assert "failed" in attempts or "refused" in attempts
        screenshot(browser, "study")

        # When the PACS is back and the person re-sends the dead-lettered results
        pacs = FolderSCP("PACS", tmp_path / "pacs", port=pacs_port)
        pacs.start()
        browser.get(url + "/jobs")
        screenshot(browser, "jobs-dead-letter")
        browser.find_element(
            By.CSS_SELECTOR, f'table.dead-letter button[data-job="{job.id}"]'
        ).click()
        wait.until(lambda b: "sending" in b.find_element(By.ID, "message").text)
        # Then the job's row turns done by itself, and so does the study on the worklist
        wait.until(
            lambda b: b.find_elements(
                By.CSS_SELECTOR, f'tr.job[data-job="{job.id}"][data-state="done"]'
            )
        )
        browser.get(url + "/")
        wait.until(lambda _: row_state(browser, study_uid) == "done")
        assert "pacs:" in browser.find_element(By.CSS_SELECTOR, "tr.study").text
        screenshot(browser, "dashboard")
    finally:
        node.stop(timeout=30)
        if pacs is not None:
            pacs.stop()
