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
FILE = '''def area(w, h):
    """The area of a w by h rectangle."""
    return w * h


def perimeter(w, h):
    return 2 * (w + h)


def describe(w, h):
    return f"{w} by {h}: area {area(w, h)}, perimeter {perimeter(w, h)}"
'''
FIRST = "def area(w, h):\n    \"\"\"The area of a w by h rectangle.\"\"\"\n    return w * h\n"
INSTRUCTION = "Rename the parameter w to width."
LONG = "Rewrite this function with a long docstring that explains every step in detail, with examples."


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
path = os.path.join(folder, "shapes.py")
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
    lines = driver.find_elements(By.CSS_SELECTOR, ".editor-instance .view-lines .view-line")
    rows = sorted(((float(l.get_attribute("style").split("top:")[1].split("px")[0]), l.text) for l in lines), key=lambda r: r[0])
    return "\n".join(t for _, t in rows).replace("\u00a0", " ")


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
    """Type the instruction into the extension's input box; the time Enter was sent (ms)."""
    box = wait(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, ".quick-input-widget input") if b.is_displayed()], "the instruction box opens")[0]
    wait(lambda: "edit the selection" in driver.find_element(By.CSS_SELECTOR, ".quick-input-widget").text.lower() or True, "it asks")
    box.send_keys(text)
    t = time.time() * 1000
    box.send_keys(Keys.ENTER)
    return t


def select_first_function():
    chord(Keys.CONTROL, "g")
    box = wait(lambda: driver.find_element(By.CSS_SELECTOR, ".quick-input-widget input"), "go to line")
    box.send_keys("1" + Keys.ENTER)
    time.sleep(0.2)
    keys(Keys.HOME)
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.DOWN, Keys.DOWN, Keys.DOWN).key_up(Keys.SHIFT).perform()


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
    box.send_keys("shapes.py")
    time.sleep(0.5)
    box.send_keys(Keys.ENTER)
    wait(lambda: "def area(w, h):" in editor_text(), "shapes.py opens")
    driver.find_element(By.CSS_SELECTOR, ".editor-instance .view-lines").click()

    # A long answer, stopped with Esc once it streams: the file is as it was.
    select_first_function()
    command("Flint: Edit Selection")
    instruct(LONG)
    wait(lambda: "def area(w, h):" not in editor_text() or '"""The area of a w by h rectangle."""' not in editor_text(), "the rewrite streams in", 60)
    keys(Keys.ESCAPE)
    wait(lambda: editor_text().startswith(FILE.splitlines()[0]) and "The area of a w by h rectangle." in editor_text(), "Esc stops it and puts the original back", 30)
    time.sleep(1)
    check = editor_text()
    assert check.splitlines()[:4] == FILE.splitlines()[:4], check
    assert disk() == FILE, "the file on disk is unchanged"
    print("ok: after Esc the file is unchanged")

    # The edit to the end, accepted, saved: the file holds flint edit's answer.
    select_first_function()
    command("Flint: Edit Selection")
    sent = instruct(INSTRUCTION)
    first = None
    t = time.time()
    while time.time() - t < 60 and first is None:
        if editor_text().splitlines()[:3] != FILE.splitlines()[:3]:
            first = time.time() * 1000
        time.sleep(0.002)
    assert first, "no token became visible"
    wait(lambda: re.search(r"Flint: .* · (\d+) ms · ", status()), "the answer ends (the status bar shows its timings)", 120)
    engine_ttft = int(re.search(r"· (\d+) ms · ", status()).group(1))
    visible = first - sent
    print(f"ok: keystroke to first visible token {visible:.0f} ms; the engine's own time to first token {engine_ttft} ms; "
          f"extension + VS Code + WebSocket: {visible - engine_ttft:+.0f} ms")
    time.sleep(0.5)
    chord(Keys.CONTROL, Keys.ENTER)
    time.sleep(0.5)
    chord(Keys.CONTROL, "s")
    wait(lambda: disk() != FILE, "accepted and saved")
    with open(os.path.join(work, "first.py"), "w") as f:
        f.write(FIRST)
    cli = json.loads(subprocess.run([FLINT, "edit", os.path.join(work, "first.py"), "--instruction", INSTRUCTION, "--json", "--model", MODEL, "--backend", "cpu"],
                                    check=True, capture_output=True, text=True).stdout)
    expected = cli["text"] + FILE[len(FIRST):]
    got = disk()
    assert got == expected, f"the file on disk:\n{got}\nflint edit --json gives:\n{expected}"
    print("ok: the accepted file equals flint edit --json's answer")
    with open(os.path.join(OUT, "timings.json"), "w") as f:
        json.dump({"keystroke_to_first_visible_ms": visible, "engine_ttft_ms": engine_ttft}, f)
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
