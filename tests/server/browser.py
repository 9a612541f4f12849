"""Drive the browser page of a running `flint serve` in headless Chromium (Debian's
chromium and chromedriver, through selenium): send a message and watch it stream, stop an
answer, redirect one by sending while it streams. Usage: browser.py BASE_URL."""

import sys
import tempfile

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import chrome

BASE = sys.argv[1].rstrip("/")
driver = chrome.start()


def wait(cond, what, timeout=30):
    return chrome.wait(cond, what, timeout, lambda: driver.find_element(By.ID, "log").text)


def answers():
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def send(text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


try:
    driver.get(BASE + "/")
    wait(lambda: driver.execute_script("return document.body.dataset.ready") == "1", "the page connects")
    send("Write a hello world in C.")
    wait(lambda: answers() and answers()[0].get_attribute("data-finish"), "the first answer finishes")
    a = answers()[0]
    assert a.find_element(By.CSS_SELECTOR, ".body").text.strip(), "the answer has text"
    stats = driver.find_element(By.ID, "stats").text
    assert "ms to first token" in stats and "tok/s" in stats, stats
    print("ok: live stats:", stats)

    # Stop: a long answer, stopped after its first tokens.
    driver.execute_script("document.getElementById('input').value = ''")
    send("Tell me a very long story.")
    wait(lambda: len(answers()) == 2 and answers()[1].find_element(By.CSS_SELECTOR, ".body").text, "the second answer streams")
    assert driver.find_element(By.ID, "send").text == "Redirect", "sending while it streams redirects"
    driver.find_element(By.ID, "stop").click()
    wait(lambda: answers()[1].get_attribute("data-finish") == "cancelled", "Stop cancels the answer")

    # Redirect: send while it streams; the answer ends as redirected and a new one follows.
    send("Another long story, please.")
    wait(lambda: len(answers()) == 3 and answers()[2].find_element(By.CSS_SELECTOR, ".body").text, "the third answer streams")
    send("No, just one word.")
    wait(lambda: answers()[2].get_attribute("data-finish") == "redirected", "sending mid-answer redirects it")
    wait(lambda: len(answers()) == 4 and answers()[3].get_attribute("data-finish") in ("stop", "length"), "the redirected turn is answered")
    meta = answers()[3].find_element(By.CSS_SELECTOR, ".meta").text
    print("ok: final answer meta:", meta)
    driver.save_screenshot(sys.argv[2] if len(sys.argv) > 2 else tempfile.mktemp(suffix=".png"))
finally:
    driver.quit()
print("all browser checks passed")
