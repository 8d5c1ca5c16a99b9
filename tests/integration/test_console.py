"""The web console (`streamrec ui`) in a real headless browser (Debian's chromium, through
Selenium) against the real stack: a worker, the broker, Valkey and tritonserver.

A click in the console is an interaction of the user shown (196): the worker applies it to
state and a tritonserver of the module's own (`own_server`), never to the session's.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from records import T0, stack_settings, wait_until

from streamrec.client import Client
from streamrec.stack.process import free_port, spawn, stop, wait_ready
from streamrec.workers import Workers, worker_env

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def console_url(own_server, kafka, artifacts):
    own = own_server
    settings = stack_settings(
        own.settings, kafka, own.redis_url, own.triton_url, artifacts, request_deadline_ms=60_000
    )
    workers = Workers(settings)
    workers.start(1)
    port = free_port()
    log = settings.run_dir / f"console-{port}.log"
    # as of the data set's time, as the state loaded from it (a click today would weigh
    # 28 years of popularity growth)
    cmd = [sys.executable, "-m", "streamrec.cli", "ui", "--port", str(port), "--as-of", str(T0)]
    pid = spawn(cmd, log, env=worker_env(settings))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready("console", pid, lambda: _answers(url), 60, log)
        yield url, settings
    finally:
        stop(pid)
        workers.stop_all()


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: `make test` installs Debian's chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_console_shows_live_figures_and_a_click_leaves_the_list(console_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, settings = console_url
    stop_traffic = threading.Event()

    def traffic():  # requests, and interactions of a user and items of its own (the catalog
        # keeps its popularity, which the list clicked below depends on)
        with Client(settings=settings, timeout=60.0) as client:
            for n in itertools.count():
                if stop_traffic.is_set():
                    return
                client.recommend("405", k=5)
                client.track("console-traffic", f"console-item-{n}", ts=T0 + n)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        browser.get(url)
        wait_until(lambda: browser.find_element(By.ID, "workers").text == "1", 30, "the worker")
        rate = wait_until(
            lambda: _number(browser.find_element(By.ID, "responses_per_s").text), 30, "a rate"
        )
        assert rate > 0
        assert browser.find_elements(By.CSS_SELECTOR, "#throughput .main-svg")  # Plotly drew
        assert browser.find_elements(By.CSS_SELECTOR, "#latency .main-svg")
    finally:
        stop_traffic.set()
        thread.join()

    def listed() -> list[str]:  # read in one go: the page re-renders the table
        return browser.execute_script(
            "return [...document.querySelectorAll('#items tr[data-item]')]"
            ".map((row) => row.dataset.item)"
        )

    item = wait_until(listed, 60, "the user's list")[0]
    started = time.monotonic()
    browser.find_element(By.CSS_SELECTOR, f"#items tr[data-item='{item}'] button.click").click()
    wait_until(
        lambda: (shown := listed()) and item not in shown,
        2.0,
        f"item {item} to leave the list after the click",
    )
    assert time.monotonic() - started <= 2.0
    shot = Path(os.environ.get("STREAMREC_CONSOLE_SCREENSHOT", tmp_path / "console.png"))
    assert browser.save_screenshot(str(shot))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
