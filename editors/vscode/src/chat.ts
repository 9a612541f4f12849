// The chat panel: a webview with the conversation over the extension's one WebSocket. Send,
// Stop, New (forget the conversation), sending while it answers redirects, and "Apply to file" on each code block (it
// replaces the active editor's selection, or inserts at its cursor).

import * as vscode from "vscode";
import { Done, ServerError, Session } from "./session";

type Connect = () => Promise<Session>;

export class ChatPanel {
  private panel?: vscode.WebviewPanel;
  private editor?: vscode.TextEditor;

  constructor(
    private ctx: vscode.ExtensionContext,
    private connect: Connect,
    private params: () => Record<string, number>,
    private report: (d: Done) => void,
    private fail: (what: string, e: ServerError | Error) => void,
    private active: () => vscode.TextEditor | undefined,
  ) {
    ctx.subscriptions.push(vscode.window.onDidChangeActiveTextEditor((e) => e && (this.editor = e)));
  }

  show() {
    this.editor = this.active() ?? this.editor;
    if (this.panel) return this.panel.reveal();
    this.panel = vscode.window.createWebviewPanel("flint.chat", "Flint Chat", vscode.ViewColumn.Beside, { enableScripts: true, retainContextWhenHidden: true });
    this.panel.webview.html = html(this.panel.webview.cspSource);
    this.panel.onDidDispose(() => (this.panel = undefined), null, this.ctx.subscriptions);
    this.panel.webview.onDidReceiveMessage((m) => this.onMessage(m), null, this.ctx.subscriptions);
  }

  private post(m: object) {
    this.panel?.webview.postMessage(m);
  }

  private async onMessage(m: { type: string; text?: string; code?: string }) {
    if (m.type === "apply") return this.apply(m.code ?? "");
    let s: Session;
    try {
      s = await this.connect();
    } catch (e) {
      this.post({ type: "error", message: String(e) });
      return this.fail("cannot connect", e as Error);
    }
    if (m.type === "stop") return s.cancel();
    if (m.type === "reset") return s.busy ? undefined : s.reset();
    if (m.type !== "send" || !m.text) return;
    const handlers = {
      delta: (t: string) => this.post({ type: "delta", text: t }),
      done: (d: Done) => {
        if (d.finish_reason !== "redirected") this.report(d);
        this.post({ type: "done", reason: d.finish_reason });
      },
      error: (e: ServerError) => {
        this.post({ type: "error", message: `${e.code}: ${e.message}` });
        if (e.code !== "cancelled") this.fail("chat", e);
      },
    };
    const body = { content: m.text, ...this.params() };
    try {
      if (s.busy) s.redirect(body, handlers);
      else s.generate(body, handlers);
      this.post({ type: "started" });
    } catch (e) {
      this.fail("chat", e as Error);
    }
  }

  private async apply(code: string) {
    const ed = this.editor;
    if (!ed) return vscode.window.showWarningMessage("Flint: open a file to apply the code to");
    await ed.edit((b) => (ed.selection.isEmpty ? b.insert(ed.selection.active, code) : b.replace(ed.selection, code)));
  }
}

function html(csp: string): string {
  const nonce = Math.random().toString(36).slice(2);
  return `<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src ${csp} 'unsafe-inline'; script-src 'nonce-${nonce}';">
<style>
 body { font: var(--vscode-font-size) var(--vscode-font-family); color: var(--vscode-foreground); display: flex; flex-direction: column; height: 100vh; margin: 0; }
 #log { flex: 1; overflow-y: auto; padding: 8px; }
 .msg { margin: 6px 0; white-space: pre-wrap; } .user { opacity: .8; } .user::before { content: "› "; }
 pre { background: var(--vscode-textCodeBlock-background); padding: 6px; overflow-x: auto; position: relative; }
 pre button { position: absolute; top: 2px; right: 2px; font-size: 11px; }
 form { display: flex; gap: 4px; padding: 6px; } textarea { flex: 1; min-height: 3em; font: inherit; }
</style></head><body>
<div id="log"></div>
<form id="f"><textarea id="in" placeholder="Ask; Enter sends, sending while it answers redirects"></textarea><button id="send">Send</button><button id="stop" type="button" disabled>Stop</button><button id="new" type="button" title="Forget the conversation">New</button></form>
<script nonce="${nonce}">
const vscode = acquireVsCodeApi();
const log = document.getElementById("log"), input = document.getElementById("in");
// The answers not yet ended, oldest first: a redirected answer's last deltas and its done
// come before the new one's.
const pending = [];
let busy = false;
function render(a) {
  const answer = a.el, text = a.text;
  answer.textContent = "";
  text.split("\`\`\`").forEach((part, i) => {
    if (i % 2 === 0) return answer.appendChild(document.createTextNode(part));
    const pre = document.createElement("pre"), code = part.replace(/^[^\\n]*\\n/, "");
    pre.textContent = code;
    const b = document.createElement("button");
    b.textContent = "Apply to file";
    b.onclick = () => vscode.postMessage({ type: "apply", code });
    pre.appendChild(b);
    answer.appendChild(pre);
  });
  log.scrollTop = log.scrollHeight;
}
function bubble(cls, t) { const d = document.createElement("div"); d.className = "msg " + cls; d.textContent = t; log.appendChild(d); return d; }
function setBusy(b) { busy = b; document.getElementById("stop").disabled = !b; document.getElementById("new").disabled = b; document.getElementById("send").textContent = b ? "Redirect" : "Send"; }
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  const t = input.value.trim(); if (!t) return;
  input.value = ""; bubble("user", t);
  pending.push({ el: bubble("assistant", ""), text: "" });
  vscode.postMessage({ type: "send", text: t }); setBusy(true);
};
input.onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("f").requestSubmit(); } };
document.getElementById("stop").onclick = () => vscode.postMessage({ type: "stop" });
document.getElementById("new").onclick = () => { log.textContent = ""; vscode.postMessage({ type: "reset" }); };
window.addEventListener("message", (e) => {
  const m = e.data;
  if (m.type === "delta") { const a = pending[0]; if (a) { a.text += m.text; render(a); } }
  else if (m.type === "done" || m.type === "error") {
    const a = pending.shift();
    if (a) a.el.dataset.finish = m.type === "done" ? m.reason : "error";
    if (m.type === "error") bubble("error", m.message);
    if (!pending.length) setBusy(false);
  }
});
</script></body></html>`;
}
