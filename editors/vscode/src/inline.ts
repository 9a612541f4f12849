// Inline completions (ghost text) from the text before the cursor, over HTTP
// `/v1/completions`: debounced, and cancelled (the request aborted, which cancels the
// generation on the server) on every keystroke. The default model has no fill-in-the-middle
// tokens, so the text after the cursor is not sent.

import * as vscode from "vscode";

type Config = () => { url: string; key: string };

export class InlineProvider implements vscode.InlineCompletionItemProvider {
  constructor(private config: Config, private log: vscode.OutputChannel) {}

  async provideInlineCompletionItems(doc: vscode.TextDocument, pos: vscode.Position, _ctx: vscode.InlineCompletionContext, token: vscode.CancellationToken) {
    const c = vscode.workspace.getConfiguration("flint");
    if (!c.get<boolean>("inlineCompletion.enabled", true)) return;
    this.log.appendLine(`inline completion: asked at ${pos.line + 1}:${pos.character + 1}`);
    const wait = c.get<number>("inlineCompletion.debounceMs", 150);
    await new Promise((r) => setTimeout(r, wait));
    if (token.isCancellationRequested) return;
    const before = doc.getText(new vscode.Range(new vscode.Position(Math.max(0, pos.line - 60), 0), pos));
    if (!before.trim()) return;
    const { url, key } = this.config();
    const http = url.replace(/^ws/, "http").replace(/\/+$/, "").replace(/\/v1\/ws$/, "");
    const abort = new AbortController();
    const t0 = performance.now();
    const sub = token.onCancellationRequested(() => abort.abort());
    try {
      const headers: Record<string, string> = { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;
      const body = { prompt: before, max_tokens: c.get<number>("inlineCompletion.maxTokens", 32), temperature: 0, stop: ["\n\n"] };
      const r = await fetch(`${http}/v1/completions`, { method: "POST", headers, body: JSON.stringify(body), signal: abort.signal });
      if (!r.ok) {
        this.log.appendLine(`inline completion: HTTP ${r.status}: ${await r.text()}`);
        return;
      }
      const text: string = (await r.json()).choices?.[0]?.text ?? "";
      this.log.appendLine(`inline completion: ${text.length} characters after ${(performance.now() - t0).toFixed(0)} ms`);
      if (!text.trim() || token.isCancellationRequested) return;
      return [new vscode.InlineCompletionItem(text, new vscode.Range(pos, pos))];
    } catch (e) {
      if (!abort.signal.aborted) this.log.appendLine(`inline completion: ${e}`);
    } finally {
      sub.dispose();
    }
  }
}
