"""Helpers for the web view's tests: run ``nettwin ui`` as a child process, drive headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from ingest.settings import NettwinSettings
from twin_store.services.processes import settings_env, stop_process

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
)


def have_chromium() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ui(settings: NettwinSettings, log: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """``nettwin ui`` on a free port with ``settings``, once it answers: the process and its URL."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nettwin.cli.main", "ui", "--port", str(port), "--refresh", "1", *args],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"nettwin ui exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            requests.get(url + "api/state", timeout=1)
            return proc, url
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                stop_process(proc, timeout=10)
                raise AssertionError("nettwin ui did not answer within 30 s") from None
            time.sleep(0.2)


@contextmanager
def running_ui(settings: NettwinSettings, log: Path, *args: str) -> Iterator[str]:
    """``nettwin ui`` on a free port with ``settings``; yields its URL once it answers; stops it after."""
    proc, url = start_ui(settings, log, *args)
    try:
        yield url
        assert proc.poll() is None, f"nettwin ui died: {log.read_text()[-2000:]}"
    finally:
        stop_process(proc, timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Debian's package) driven by selenium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nettwin-chromium-")
    opts = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(fn: Any, timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
