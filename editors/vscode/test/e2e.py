"""The extension in a real VS Code (code-server) driven by headless Chromium through selenium:
open a file, select a function, run "Flint: Edit Selection" with an instruction and watch the
rewrite stream in; press Esc mid-way through a long answer (the edit stops and the file is as
it was); run it again to the end and accept: the file on disk then holds the model's answer,
identical to `flint edit --json` for the same request. Measures keystroke (Enter on the
instruction) to first visible token against the engine's own time to first token.

Usage: e2e.py CODE_SERVER VSIX FLINT_BIN MODEL OUT_DIR. Screenshots land in OUT_DIR on failure."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../tests/server"))
import chrome  # noqa: E402
from chrome import wait  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402

CODE_SERVER, VSIX, FLINT, MODEL, OUT = sys.argv[1:6]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../..")
with open(os.path.join(ROOT, "benches/edit/inventory.py")) as f:
    FILE = f.read()
LINES = FILE.splitlines(keepends=True)
# The function the accepted edit rewrites: lines 20-21 (1-based), and a line of it to watch.
START, END = 20, 21
MARK = "return self.price * self.quantity"
INSTRUCTION = "Rename the method total_value to value."
# The long answer, stopped mid-way: the whole file, rewritten (about 1,300 tokens).
LONG = "Add type hints and a docstring to every function."


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def up(port, proc, what, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{what} did not listen on {port}")


work = tempfile.mkdtemp(prefix="flint-vscode-e2e-")
folder, user, exts = (os.path.join(work, d) for d in ("project", "user", "extensions"))
for d in (folder, os.path.join(user, "User"), exts):
    os.makedirs(d)
path = os.path.join(folder, "inventory.py")
with open(path, "w") as f:
    f.write(FILE)

flint_port, cs_port = free_port(), free_port()
settings = {
    "security.workspace.trust.enabled": False, "workbench.startupEditor": "none", "telemetry.telemetryLevel": "off",
    "extensions.autoUpdate": False, "extensions.autoCheckUpdates": False, "update.mode": "none", "workbench.tips.enabled": False,
    "editor.minimap.enabled": False, "flint.serverUrl": f"ws://127.0.0.1:{flint_port}", "flint.inlineCompletion.enabled": False,
    "workbench.colorTheme": "Default Light Modern", "chat.disableAIFeatures": True,
}
with open(os.path.join(user, "User", "settings.json"), "w") as f:
    json.dump(settings, f)
subprocess.run([CODE_SERVER, "--extensions-dir", exts, "--user-data-dir", user, "--install-extension", VSIX], check=True)
flint = subprocess.Popen([FLINT, "serve", "--port", str(flint_port), "--model", MODEL, "--backend", "cpu"], stderr=subprocess.DEVNULL)
cs = subprocess.Popen([CODE_SERVER, "--auth", "none", "--bind-addr", f"127.0.0.1:{cs_port}", "--extensions-dir", exts,
                       "--user-data-dir", user, "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust", folder],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
driver = None


def editor_text():
    """The visible lines of the editor, as text (Monaco renders spaces as no-break spaces)."""
    # Read in one script: Monaco re-renders lines as text streams in.
    return driver.execute_script("""
      const rows = [...document.querySelectorAll('.editor-instance .view-lines .view-line')];
      rows.sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top));
      return rows.map((r) => r.textContent).join('\\n');
    """).replace("\u00a0", " ")


def keys(*k):
    ActionChains(driver).send_keys(*k).perform()


def chord(mod, key):
    ActionChains(driver).key_down(mod).send_keys(key).key_up(mod).perform()


def command(name):
    keys(Keys.F1)
    box = wait(lambda: driver.find_element(By.CSS_SELECTOR, ".quick-input-widget input"), "the command palette opens")
    box.send_keys(name)
    time.sleep(0.3)
    box.send_keys(Keys.ENTER)


def instruct(text):
    """Type the instruction into the extension's input box and send it."""
    wait(lambda: "Flint: edit the selection" in driver.find_element(By.CSS_SELECTOR, ".quick-input-widget").text, "the instruction box opens")
    box = driver.find_element(By.CSS_SELECTOR, ".quick-input-widget input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def select_lines(start, end):
    """Lines start..end (1-based), whole: the cursor to the start of `start`, shift+down."""
    chord(Keys.CONTROL, "g")
    box = wait(lambda: driver.find_element(By.CSS_SELECTOR, ".quick-input-widget input"), "go to line")
    box.send_keys(str(start) + Keys.ENTER)
    time.sleep(0.3)
    keys(Keys.HOME, Keys.HOME)
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(*[Keys.DOWN] * (end - start + 1)).key_up(Keys.SHIFT).perform()


def status():
    items = driver.find_elements(By.CSS_SELECTOR, ".statusbar-item")
    return " | ".join(i.text for i in items if "Flint" in i.text)


def disk():
    with open(path) as f:
        return f.read()


try:
    up(flint_port, flint, "flint serve")
    up(cs_port, cs, "code-server")
    driver = chrome.start("--window-size=1400,1000")
    driver.get(f"http://127.0.0.1:{cs_port}/?folder={folder}")
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".monaco-workbench"), "VS Code loads", 120)
    wait(lambda: re.search(r"Flint: SmolLM2", status()), "the extension connects (status bar shows the model)", 120)
    chord(Keys.CONTROL, "p")
    box = wait(lambda: driver.find_element(By.CSS_SELECTOR, ".quick-input-widget input"), "quick open")
    box.send_keys("inventory.py")
    time.sleep(0.5)
    box.send_keys(Keys.ENTER)
    wait(lambda: "class InventoryError" in editor_text(), "inventory.py opens")
    driver.find_element(By.CSS_SELECTOR, ".editor-instance .view-lines").click()
    top = editor_text()

    # A long answer (the whole file), stopped with Esc once it streams: the file is as it was.
    chord(Keys.CONTROL, "a")
    command("Flint: Edit Selection")
    instruct(LONG)
    wait(lambda: editor_text() != top, "the rewrite streams in", 60)
    time.sleep(0.3)
    partial = editor_text()
    keys(Keys.ESCAPE)
    wait(lambda: editor_text() == top, "Esc stops it and puts the original back", 30)
    assert partial != top, "it was stopped mid-way"
    time.sleep(1)
    assert editor_text() == top, "nothing changes after the stop"
    assert disk() == FILE, "the file on disk is unchanged"
    print("ok: after Esc the file is unchanged")

    # The edit to the end, accepted, saved: the file holds flint edit's answer.
    select_lines(START, END)
    command("Flint: Edit Selection")
    # In the page's own clock: Enter on the instruction, and the first change of the editor's
    # rendered lines that removes the selected function's body (the rewrite replacing it).
    driver.execute_script("""
      const f = window.__flint = {enter: 0, first: 0};
      document.addEventListener('keydown', (e) => { if (e.key === 'Enter' && !f.enter) f.enter = performance.now(); }, true);
      const v = document.querySelector('.editor-instance .view-lines');
      new MutationObserver(() => {
        if (f.enter && !f.first && !v.textContent.includes(MARK)) f.first = performance.now();
      }).observe(v, {subtree: true, childList: true, characterData: true});
    """.replace("MARK", json.dumps(MARK)))
    instruct(INSTRUCTION)
    f = wait(lambda: driver.execute_script("return window.__flint.first && window.__flint"), "the first token becomes visible", 60)
    visible = f["first"] - f["enter"]
    wait(lambda: "Ctrl+Enter accepts the edit" in driver.find_element(By.CSS_SELECTOR, ".statusbar").text, "the answer ends (the status bar offers accept / reject)", 120)
    engine_ttft = int(re.search(r"· (\d+) ms · ", status()).group(1))
    # The extension's own log (the Output channel, on disk): request to first delta over the
    # WebSocket, and to the edit applied in the editor.
    logs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(user, "logs")) for f in fs if "Flint" in f]
    timing = [l for p in logs for l in open(p) if "timing: first delta" in l][-1]
    ws_ms, applied_ms = (float(x) for x in re.findall(r"([\d.]+) ms", timing))
    print(f"ok: keystroke to first visible token {visible:.1f} ms; in the extension: request to first delta {ws_ms:.1f} ms "
          f"(the WebSocket's own cost, the engine's time to first token {engine_ttft} ms within it), to the edit applied {applied_ms:.1f} ms; "
          f"VS Code and the extension add {visible - ws_ms:+.1f} ms over the WebSocket")
    time.sleep(0.5)
    chord(Keys.CONTROL, Keys.ENTER)
    time.sleep(0.5)
    chord(Keys.CONTROL, "s")
    wait(lambda: disk() != FILE, "accepted and saved")
    cli = json.loads(subprocess.run([FLINT, "edit", os.path.join(ROOT, "benches/edit/inventory.py"), "--range", f"{START}:{END}", "--instruction", INSTRUCTION,
                                     "--json", "--model", MODEL, "--backend", "cpu"], check=True, capture_output=True, text=True).stdout)
    expected = "".join(LINES[:START - 1]) + cli["text"] + "".join(LINES[END:])
    got = disk()
    assert got == expected, f"the file on disk:\n{got}\nflint edit --json gives:\n{expected}"
    print("ok: the accepted file equals flint edit --json's answer")
    with open(os.path.join(OUT, "timings.json"), "w") as f:
        json.dump({"keystroke_to_first_visible_ms": visible, "request_to_first_delta_ms": ws_ms, "request_to_applied_ms": applied_ms, "engine_ttft_ms": engine_ttft}, f)
except BaseException:
    if driver:
        shot = os.path.join(OUT, "vscode-failure.png")
        driver.save_screenshot(shot)
        print("screenshot:", shot)
    raise
finally:
    if driver:
        driver.quit()
    cs.terminate()
    flint.terminate()
print("all VS Code checks passed")
