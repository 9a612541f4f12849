"""Headless Chromium for the browser tests: Debian's chromium and chromedriver, through
selenium, in a fresh profile with no background traffic."""

import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def start(*extra):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp()}", *extra]:
        opts.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait(cond, what, timeout=30, detail=lambda: ""):
    """Poll `cond` until it is truthy (printing `what`), or fail after `timeout` seconds."""
    from selenium.common.exceptions import StaleElementReferenceException
    t = time.time()
    while time.time() - t < timeout:
        try:
            v = cond()
        except StaleElementReferenceException:
            v = None  # the page re-rendered what it was reading: read again
        if v:
            print("ok:", what)
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out: {what}\n{detail()}")
