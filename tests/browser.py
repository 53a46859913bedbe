"""Headless Chromium for page tests (the service's page; the run report's): Debian's chromium and
chromium-driver driven by Selenium. Tests using it skip with one line when either is absent:
    apt-get install -y chromium chromium-driver
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time

import pytest

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1366,900")


def require_chromium():
    """(chromium, chromedriver) paths, or skip the test with one line saying how to install them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install -r requirements-dev.txt)")
    return chromium, driver


@contextlib.contextmanager
def chromium_session(tmp_path):
    """A Selenium WebDriver on headless Chromium with a fresh profile in *tmp_path*."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(app):
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)
