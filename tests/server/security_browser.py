"""What a browser can and cannot do to a `flint serve` on loopback, asserted from the browser's
side in headless Chromium (Debian's chromium and chromedriver, through selenium):

1. A page from another origin (a second HTTP server on another port) tries the open server's
   WebSocket, its Responses WebSocket, a JSON POST, a "simple" text/plain POST and a GET:
   every WebSocket fails before opening, every readable request fails, the text/plain POST
   is opaque to it, and the server ran no generation.
2. DNS rebinding: a name that resolves to 127.0.0.1 (Chromium's --host-resolver-rules) gets
   only the refusal, never the page or the API.
3. Flint's own page on a server with a key: it asks for the key, tells a wrong one, connects
   with the right one, answers, and keeps the key for the tab.

The same page against a server started with --allow-origin '*' (the control) reads and
drives it all, so the refusals above are the guard's doing.

Usage: security_browser.py OPEN_URL KEYED_URL KEY CONTROL_URL."""

import http.server
import json
import sys
import threading
import urllib.request

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

import chrome
from chrome import wait

OPEN, KEYED, KEY, CONTROL = sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/"), sys.argv[3], sys.argv[4].rstrip("/")
PORT = OPEN.split("//")[1].split(":")[1]

EVIL = """<!doctype html><title>elsewhere</title><script>
const T = new URLSearchParams(location.search).get("target");
const out = {};
function socket(path) {
  return new Promise((done) => {
    let opened = false;
    const w = new WebSocket("ws://" + T + path);
    w.onopen = () => { opened = true; w.send(JSON.stringify({type: "generate", content: "hi"})); };
    w.onmessage = (e) => done("read: " + e.data.slice(0, 80));
    w.onerror = () => done(opened ? "error after opening" : "refused");
    w.onclose = () => done(opened ? "closed after opening" : "refused");
    setTimeout(() => done("timeout"), 10000);
  });
}
async function read(path, init) {
  try { const r = await fetch("http://" + T + path, init); return "read: " + r.status + " " + (await r.text()).slice(0, 80); }
  catch (e) { return "blocked: " + e.name; }
}
async function blind(path, init) {
  try { const r = await fetch("http://" + T + path, Object.assign({mode: "no-cors"}, init)); return r.type === "opaque" ? "opaque" : "read: " + r.status; }
  catch (e) { return "blocked: " + e.name; }
}
(async () => {
  const chat = JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 4});
  out.ws = await socket("/v1/ws");
  out.responses_ws = await socket("/v1/responses");
  out.post_json = await read("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"}, body: chat});
  out.post_text = await blind("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "text/plain"}, body: chat});
  out.get_models = await read("/v1/models", {});
  out.get_health = await read("/health", {});
  window.results = out;
})();
</script>"""


class Evil(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = EVIL.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
threading.Thread(target=evil.serve_forever, daemon=True).start()
EVIL_URL = f"http://127.0.0.1:{evil.server_address[1]}/?target="

driver = chrome.start("--host-resolver-rules=MAP rebind.test 127.0.0.1")


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


def metric(base, name, key=None):
    req = urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer " + key} if key else {})
    text = urllib.request.urlopen(req).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


try:
    # 1. Another origin's page.
    driver.get(EVIL_URL + OPEN.split("//")[1])
    r = wait(lambda: driver.execute_script("return window.results"), "the other origin's page ran its attempts")
    print("   from the other origin:", json.dumps(r))
    check(r["ws"] == "refused", "its WebSocket to /v1/ws never opens")
    check(r["responses_ws"] == "refused", "its WebSocket to /v1/responses never opens")
    check(r["post_json"].startswith("blocked"), "its JSON POST is blocked (the preflight is refused)")
    check(r["post_text"] == "opaque", "its text/plain POST is opaque to it")
    check(r["get_models"].startswith("blocked") and r["get_health"].startswith("blocked"), "its GETs cannot be read")
    check(metric(OPEN, "flint_prompt_tokens_total") == 0, "the server ran no generation for it")
    refused = metric(OPEN, 'flint_refused_total{reason="forbidden_origin"}')
    check(refused >= 5, f"the server refused its requests by Origin ({refused:.0f})")

    # The control: the same page, against a server that allows every origin.
    driver.get(EVIL_URL + CONTROL.split("//")[1])
    c = wait(lambda: driver.execute_script("return window.results"), "the control ran the same attempts")
    print("   against the control:", json.dumps(c))
    check(c["ws"].startswith("read") and c["post_json"].startswith("read: 200") and c["get_models"].startswith("read: 200"),
          "with every origin allowed, the same page drives the model: the refusals above are the guard's")

    # 2. DNS rebinding: rebind.test resolves to 127.0.0.1, and gets only the refusal.
    driver.get(f"http://rebind.test:{PORT}/")
    text = driver.find_element(By.TAG_NAME, "body").text
    check("does not answer to the name" in text and "Flint" not in driver.title, "a rebound name gets the refusal, not the page")
    status = driver.execute_script("return fetch('/v1/models').then(r => r.status)")
    check(status == 403, "and the API refuses it too (403)")
    check(metric(OPEN, "flint_prompt_tokens_total") == 0, "still no generation")

    # 3. Flint's own page on a server with a key.
    driver.get(KEYED + "/")
    wait(lambda: driver.find_element(By.ID, "keyform").is_displayed(), "the page asks for the API key")
    box = driver.find_element(By.ID, "key")
    box.send_keys("not-the-key")
    box.send_keys(Keys.ENTER)
    wait(lambda: "refused" in driver.find_element(By.ID, "keynote").text, "a wrong key is told as refused")
    box.send_keys(KEY)
    box.send_keys(Keys.ENTER)
    wait(lambda: driver.execute_script("return document.body.dataset.ready") == "1", "the right key connects the WebSocket")
    inp = driver.find_element(By.ID, "input")
    inp.send_keys("Say hi.")
    inp.send_keys(Keys.ENTER)
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]"), "the page gets an answer")
    check(driver.execute_script("return sessionStorage.getItem('flint.key')") == KEY, "the key is kept in the tab")
    driver.refresh()
    wait(lambda: driver.execute_script("return document.body.dataset.ready") == "1", "a reload connects without asking again")
    check(not driver.find_element(By.ID, "keyform").is_displayed(), "the key form stays hidden")
    check(driver.execute_script("return ws.protocol") == "flint", "the server selected the plain 'flint' subprotocol (the key is not echoed)")
finally:
    driver.quit()
    evil.shutdown()
print("all browser security checks passed")
