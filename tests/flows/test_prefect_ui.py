"""The Prefect UI as the operator's console, checked in a real browser: Debian's headless
Chromium, driven through its own chromedriver (Selenium Manager downloads nothing), against the
UI of the server `hxp server start` started for a user with no Prefect setting at all.

A deploy-stack run's page lists its task runs (`deploy-<unit>@<host>`) and its plan and result
artifacts; a failed deploy's page lists its `rollback-deploy` subflow. With
`HXP_SCREENSHOTS=docs/img` the pages are saved there for docs/prefect.md (else under tmp_path).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stacks import web_stack
from tests.support.user import User
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Root in a container: no sandbox; nothing reaches out (updates, sync, QUIC, first-run pages).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1100",
)
#: The UI is a single-page app: every check waits for what it looks for, up to this long.
UI_WAIT = 60.0


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Installed by scripts/install-system-deps.sh: missing is a failure, never a skip.
    assert shutil.which(CHROMIUM), f"{CHROMIUM} missing: run scripts/install-system-deps.sh"
    assert shutil.which(CHROMEDRIVER), f"{CHROMEDRIVER} missing: run install-system-deps.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager neither looks for nor downloads one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def user(tmp_path: Path) -> Iterator[User]:
    home = tmp_path / "home"
    home.mkdir()
    who = User(home, tmp_path / "state")
    yield who
    stack = tmp_path / "t.yaml"  # web_stack's file: leave nothing running if the test failed
    if stack.exists():
        who.hxp("down", "-f", str(stack))
    who.hxp("server", "stop")


def _shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("HXP_SCREENSHOTS") or tmp_path / "shots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def _flow_runs(api: str, name: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"name": {"any_": [name]}}, "sort": "START_TIME_ASC"}
    response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    rows: list[dict[str, Any]] = response.json()
    return [r for r in rows if r["state_type"] in ("COMPLETED", "FAILED")]


class RunPage:
    """One flow run's page in the UI: its tabs and what each lists."""

    def __init__(self, driver: Any, ui: str, run_id: str) -> None:
        self.driver = driver
        driver.get(f"{ui}/runs/flow-run/{run_id}")
        self.wait_text("Task Runs")  # the page rendered with its data, not an error banner

    def wait_text(self, *wanted: str, within: str = "body") -> str:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        def seen(driver: Any) -> str | None:
            try:
                text = str(driver.find_element(By.CSS_SELECTOR, within).text)
            except StaleElementReferenceException:  # re-rendered under us: look again
                return None
            return text if all(w in text for w in wanted) else None

        try:
            found: str = WebDriverWait(self.driver, UI_WAIT, poll_frequency=0.2).until(seen)
        except Exception as exc:
            body = self.driver.find_element(By.TAG_NAME, "body").text
            raise AssertionError(f"the page never showed {wanted}; it shows:\n{body}") from exc
        return found

    def open_tab(self, tab_id: str, *wanted: str) -> str:
        """Click the tab (its list item's id: task-runs, subflow-runs, artifacts) and wait
        until its panel lists every `wanted` text; the panel's text."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        tab = WebDriverWait(self.driver, UI_WAIT).until(
            ec.element_to_be_clickable((By.CSS_SELECTOR, f"li.p-tab#{tab_id}"))
        )
        tab.click()
        WebDriverWait(self.driver, UI_WAIT).until(
            lambda d: "p-tab__active" in (tab.get_attribute("class") or "")
        )
        text = self.wait_text(*wanted, within=f"#{tab_id}-content")
        self.driver.execute_script("arguments[0].scrollIntoView(true)", tab)
        return text

    def screenshot(self, path: Path) -> None:
        assert self.driver.save_screenshot(str(path)), path
        assert path.stat().st_size > 10_000, f"{path} is nearly empty"


def test_the_ui_shows_a_deploy_and_the_rollback_of_a_failed_one(
    user: User, browser: Any, tmp_path: Path
) -> None:
    started = user.hxp("server", "start")
    assert started.returncode == 0, started.stderr
    found = re.search(r"Prefect server: (http://\S+) \(API (http://\S+/api),", started.stdout)
    assert found is not None, started.stdout
    ui, api = found.groups()
    shots = _shots(tmp_path)
    # The UI finds its API through /ui-settings (the server's default port, 4200, unless told).
    assert httpx.get(f"{ui}/ui-settings", timeout=10).json()["api_url"] == api

    stack, ports = web_stack(tmp_path)
    applied = user.hxp("apply", "-f", str(stack))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  api:\n    command: [/nonexistent/api-server]\n")
    failed = user.hxp("apply", "-f", str(stack), "-f", str(bad))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "api: restored revision 1, healthy" in failed.stderr

    good, broken = wait_for(
        lambda: (runs := _flow_runs(api, "deploy-t")) and len(runs) == 2 and runs,
        "both deploy-t runs on the server",
    )
    assert (good["state_type"], broken["state_type"]) == ("COMPLETED", "FAILED")
    rollback = wait_for(
        lambda: _flow_runs(api, "rollback-t-deploy-2"), "the rollback-t-deploy-2 subflow run"
    )[0]
    assert rollback["parent_task_run_id"], "the rollback is a subflow of the failed deploy"

    page = RunPage(browser, ui, good["id"])
    page.wait_text("deploy-t", "Completed", "deploy-stack")
    tasks = page.open_tab("task-runs", "deploy-db@local", "deploy-cache@local", "deploy-api@local")
    assert "commit-api" in tasks
    page.screenshot(shots / "prefect-deploy-task-runs.png")
    artifacts = page.open_tab("artifacts", "plan-t", "deploy-t")
    assert "deploy #1 succeeded" in artifacts, artifacts
    page.screenshot(shots / "prefect-deploy-artifacts.png")

    page = RunPage(browser, ui, broken["id"])
    page.wait_text("deploy-t", "Failed")
    tasks = page.open_tab("task-runs", "deploy-api@local")
    assert "deploy-db@local" not in tasks  # unchanged units have no deploy task this time
    subflows = page.open_tab("subflow-runs", "rollback-t-deploy-2")
    assert "rollback-deploy" in subflows, subflows
    assert "Completed" in subflows, subflows
    page.screenshot(shots / "prefect-failed-deploy-rollback.png")
    artifacts = page.open_tab("artifacts", "plan-t", "deploy-t")
    assert "deploy #2 failed" in artifacts, artifacts

    assert user.hxp("down", "-f", str(stack)).returncode == 0
    assert not any(_serving(port) for port in ports.values())


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False
