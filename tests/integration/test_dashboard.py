"""`kmctl dashboard` in a real headless browser on a real 3-node cluster (issue 17, item 5).

The page loads from the running cluster and shows its three nodes, the leader, the attested
links and the audit records of releases made while it is open; after the leader is killed it
shows another leader and the killed node down, without a reload. Ctrl-C stops the server
cleanly, and `kmctl status --watch` shows the same cluster. The screenshot is kept under the
test's directory, and copied to ``$KMSIM_ARTIFACTS_DIR/dashboard.png`` (relative to the repo
root) when that is set, as CI does.

Needs Debian's chromium and chromium-driver and the selenium package; without them the test is
skipped with the reason, unless CI (or ``KMSIM_REQUIRE_BROWSER=1``) makes that a failure
(``tests/requirements.py``).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.requirements import unavailable

from .harness import REPO, LocalCluster, running

pytestmark = pytest.mark.timeout(300)

INSTALL = "apt-get install chromium chromium-driver && pip install selenium"
#: Bounded waits: the page, the URL line of the server, leader changes, Ctrl-C.
PAGE_WAIT_S = 30.0
START_WAIT_S = 60.0


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    return None


@pytest.fixture(scope="module")
def browser_available() -> None:
    reason = _browser_missing()
    if reason is None:
        return
    unavailable("BROWSER", f"no headless browser: {reason}", INSTALL)


@pytest.fixture
def cluster(
    browser_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("dashboard")) as c:
        yield c


def kmctl(cluster: LocalCluster, *args: str, **popen: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "kmnode.cli", "-c", str(cluster.config_path), *args]
    return subprocess.Popen(command, cwd=REPO, text=True, **popen)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process prints, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line within {timeout}s (exit code {proc.poll()})"
    return proc.stdout.readline()


@pytest.fixture
def dashboard(cluster: LocalCluster) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`kmctl dashboard` on any free loopback port, and its URL."""
    proc = kmctl(
        cluster, "dashboard", "--port", "0", "--no-open",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        line = read_line(proc, START_WAIT_S)
        assert " at http://127.0.0.1:" in line, line
        yield proc, line.split(" at ", 1)[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(15)


@pytest.fixture
def browser(browser_available: None) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, check: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, PAGE_WAIT_S, poll_frequency=0.2).until(check, f"page: {what}")


def by_data(driver: Any, selector: str, key: str) -> dict[str, str]:
    """``data-KEY`` -> ``data-state`` of every element ``selector`` matches, read in one
    script (the page redraws every second, so elements found earlier may be gone)."""
    script = (
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(e => [e.dataset[arguments[1]], e.dataset.state])"
    )
    return dict(driver.execute_script(script, selector, key))


def rows(driver: Any) -> dict[str, str]:
    return by_data(driver, "#nodes tbody tr", "node")


def shown_leader(driver: Any) -> str:
    return str(driver.execute_script("return document.getElementById('leader').dataset.leader"))


def links(driver: Any) -> dict[str, str]:
    return by_data(driver, "#graph line", "link")


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent"))


def keep_screenshot(driver: Any, path: Path) -> None:
    assert driver.save_screenshot(str(path)), "the browser took no screenshot"
    target = os.environ.get("KMSIM_ARTIFACTS_DIR")
    if target:
        directory = REPO / target  # an absolute path stays as it is
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, directory / path.name)


def test_the_page_shows_the_cluster_and_follows_a_leader_kill(
    cluster: LocalCluster,
    dashboard: tuple[subprocess.Popen[str], str],
    browser: Any,
    tmp_path: Path,
) -> None:
    proc, url = dashboard
    leader = cluster.leader()
    browser.get(url)
    wait_for(
        browser, "three ready nodes", lambda d: rows(d) == dict.fromkeys(cluster.names, "ready")
    )
    wait_for(browser, f"leader {leader}", lambda d: shown_leader(d) == leader)
    assert text_of(browser, "cluster") == cluster.config.cluster
    wait_for(browser, "three attested links", lambda d: sorted(links(d).values()) == ["up"] * 3)

    # Releases while the page is open (and subscribed): their audit records come over MQTT.
    connected = "return document.getElementById('mqtt').dataset.connected"
    wait_for(browser, "MQTT connected", lambda d: d.execute_script(connected) == "true")
    assert cluster.leader_call("POST", "/v1/keys", {"name": "watched"})[0] == 201
    code, reply = cluster.leader_call("POST", "/v1/keys/watched/release", {"node": "all"})
    assert code == 200, reply
    wait_for(
        browser,
        "three audit records",
        lambda d: text_of(d, "audit").count('"status":"provisioned"') == 3,
    )
    keep_screenshot(browser, tmp_path / "dashboard-before.png")

    cluster.kill(leader)
    others = [n for n in cluster.names if n != leader]
    wait_for(browser, "a new leader", lambda d: shown_leader(d) in others)
    wait_for(browser, f"{leader} down", lambda d: rows(d)[leader] == "down")
    down = {k: v for k, v in links(browser).items() if leader in k.split("-")}
    assert sorted(down.values()) == ["down", "down"], links(browser)
    keep_screenshot(browser, tmp_path / "dashboard.png")
    print(f"screenshots in {tmp_path}")

    # The terminal view of the same cluster: one node down, so exit code 1.
    watch = kmctl(
        cluster, "status", "--watch", "--interval", "0.2", "--count", "2",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 1, err
    assert out.count(f"cluster '{cluster.config.cluster}'") == 2
    assert f"{leader} " in out and "down" in out and "leader" in out

    # Ctrl-C stops the server cleanly.
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "dashboard stopped" in err and "Traceback" not in err
