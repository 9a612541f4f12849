// Flint in VS Code: one persistent WebSocket to `flint serve`, a status bar item, "Edit
// Selection" that streams the rewrite into the editor (Esc stops it, a new instruction while
// it streams redirects it, accept or reject as one undoable edit), a chat panel on the same
// socket, and inline completions.

import * as vscode from "vscode";
import { ChildProcess, spawn } from "child_process";
import { Done, ServerError, Session } from "./session";
import { EditState, changedLines, fenceLanguage } from "./edits";
import { ChatPanel } from "./chat";
import { InlineProvider } from "./inline";

let session: Session | undefined;
let connecting: Promise<Session> | undefined;
let server: ChildProcess | undefined;
let status: vscode.StatusBarItem;
let current: LiveEdit | undefined;
let last = "";
const log = vscode.window.createOutputChannel("Flint");
/** The wall clock in ms with the monotonic clock's resolution (a browser page reads the same). */
const now = () => performance.timeOrigin + performance.now();

function config() {
  const c = vscode.workspace.getConfiguration("flint");
  return {
    url: c.get<string>("serverUrl", "ws://127.0.0.1:8080"),
    path: c.get<string>("path", ""),
    model: c.get<string>("model", ""),
    key: c.get<string>("apiKey", "") || process.env.FLINT_API_KEY || "",
    maxTokens: c.get<number>("maxTokens", 0),
    temperature: c.get<number>("temperature", 0),
  };
}

function params(): Record<string, number> {
  const c = config();
  const p: Record<string, number> = { temperature: c.temperature };
  if (c.maxTokens > 0) p.max_tokens = c.maxTokens;
  return p;
}

function showStatus(text: string, tooltip: string) {
  status.text = text;
  status.tooltip = tooltip;
  status.show();
}

function report(d: Done) {
  last = `${d.timings.ttft_ms.toFixed(0)} ms · ${d.timings.decode_tok_s.toFixed(0)} tok/s`;
  showStatus(`$(zap) Flint: ${session?.model ?? ""} · ${last}`, `time to first token, decode speed of the last answer (${d.finish_reason})`);
}

function fail(what: string, e: ServerError | Error) {
  const msg = "code" in e ? `${e.code}: ${e.message}` : e.message;
  log.appendLine(`${what}: ${msg}`);
  vscode.window.showErrorMessage(`Flint: ${what}: ${msg}`);
}

/** Start `flint serve` when configured to and nothing listens; resolves once it serves. */
async function startServer(): Promise<void> {
  const c = config();
  if (!c.path || server) return;
  const u = new URL(c.url);
  const args = ["serve", "--host", u.hostname, "--port", u.port || "8080"];
  if (c.model) args.push("--model", c.model);
  log.appendLine(`starting ${c.path} ${args.join(" ")}`);
  server = spawn(c.path, args, { stdio: ["ignore", "ignore", "pipe"] });
  server.on("exit", (code) => {
    log.appendLine(`flint serve exited (${code})`);
    server = undefined;
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("flint serve did not start within 120 s")), 120000);
    server!.stderr!.on("data", (b: Buffer) => {
      const t = b.toString();
      log.append(t);
      if (t.includes("serving")) {
        clearTimeout(timer);
        resolve();
      }
    });
    server!.on("exit", (code) => reject(new Error(`flint serve exited with ${code}; see the Flint output`)));
  });
}

/** The open session, connecting (and starting a server) when there is none. */
async function connect(): Promise<Session> {
  if (session?.open) return session;
  if (connecting) return connecting;
  connecting = (async () => {
    const c = config();
    showStatus("$(sync~spin) Flint: connecting", c.url);
    let s: Session;
    try {
      s = await Session.open(c.url, c.key || undefined);
    } catch (e) {
      if (!c.path || !String(e).includes("ECONNREFUSED")) throw e;
      await startServer();
      s = await Session.open(c.url, c.key || undefined);
    }
    s.onState = (st, why) => {
      if (st === "disconnected") {
        session = undefined;
        showStatus("$(debug-disconnect) Flint: disconnected", `${why ?? ""}; click to reconnect`);
      }
    };
    s.onPrefilled = (m) => log.appendLine(`prefill: ${m.prompt_tokens} tokens (${m.cached_tokens} cached) in ${m.prompt_ms.toFixed(0)} ms${m.complete ? "" : ", cut short by the edit"}`);
    session = s;
    showStatus(`$(zap) Flint: ${s.model}${last ? " · " + last : ""}`, `connected to ${c.url} (${s.nCtx}-token context)`);
    return s;
  })();
  try {
    return await connecting;
  } catch (e) {
    showStatus("$(debug-disconnect) Flint: disconnected", `${e}; click to reconnect`);
    throw e;
  } finally {
    connecting = undefined;
  }
}

const streaming = vscode.window.createTextEditorDecorationType({ backgroundColor: new vscode.ThemeColor("diffEditor.insertedTextBackground"), isWholeLine: true });
const changed = vscode.window.createTextEditorDecorationType({ backgroundColor: new vscode.ThemeColor("diffEditor.insertedLineBackground"), isWholeLine: true });

/** An edit in an editor: the region shows the rewrite as it streams; accept or reject ends it. */
class LiveEdit {
  state: EditState;
  private start: vscode.Position;
  private length: number;
  private queue: Promise<unknown> = Promise.resolve();
  private first = true;
  /** The latest turn: a redirected turn's late deltas are not this one's. */
  private gen = 0;

  constructor(readonly editor: vscode.TextEditor, range: vscode.Range, readonly language: string) {
    const doc = editor.document;
    this.state = new EditState(doc.getText(range));
    this.start = range.start;
    this.length = this.state.original.length;
  }

  private region(): vscode.Range {
    const doc = this.editor.document;
    return new vscode.Range(this.start, doc.positionAt(doc.offsetAt(this.start) + this.length));
  }

  /** Replace the region's text (edits are serialized; the first one closes the user's undo group). */
  private show(text: string, undoStopAfter = false) {
    this.queue = this.queue.then(async () => {
      const before = this.first;
      this.first = false;
      const r = this.region();
      await this.editor.edit((b) => b.replace(r, text), { undoStopBefore: before, undoStopAfter });
      this.length = text.length;
      const lines = this.region();
      this.editor.setDecorations(streaming, this.state.phase === "streaming" ? [lines] : []);
    });
    return this.queue;
  }

  /** `asked`: when the instruction reached the extension (the wall clock, in ms). */
  run(instruction: string, redirect: boolean, asked = now()) {
    const e = { code: this.state.original, instruction, language: this.language };
    if (redirect) this.state.restart();
    vscode.commands.executeCommand("setContext", "flint.editing", true);
    const g = ++this.gen;
    const sent = now();
    session!.edit(e, params(), {
      delta: (t) => {
        if (g !== this.gen) return;
        const first = this.state.answer === "";
        const got = now();
        const shown = this.show(this.state.delta(t));
        if (first) {
          // Where the time to the first visible token goes, on the wall clock the browser
          // shares (the end-to-end test reads this): the instruction in, the request out,
          // the first delta in, the edit handed to VS Code, VS Code's answer that it is applied.
          const issued = now();
          shown.then(() => log.appendLine(`timing: asked ${asked.toFixed(1)} sent ${sent.toFixed(1)} delta ${got.toFixed(1)} issued ${issued.toFixed(1)} applied ${now().toFixed(1)}`));
        }
      },
      done: (d) => {
        log.appendLine(`done: ${d.finish_reason} · ${d.usage.completion_tokens} tokens · ${d.usage.cached_tokens}/${d.usage.prompt_tokens} prompt tokens cached · ttft ${d.timings.ttft_ms.toFixed(1)} ms`);
        if (d.finish_reason === "redirected" || g !== this.gen) return;
        report(d);
        vscode.commands.executeCommand("setContext", "flint.editing", false);
        if (d.finish_reason === "cancelled") return this.reject();
        this.state.finish(d.edit?.text ?? d.text);
        this.show(this.state.result!).then(() => this.highlight());
        vscode.commands.executeCommand("setContext", "flint.editPending", true);
        vscode.window.setStatusBarMessage("Flint: Ctrl+Enter accepts the edit, Esc rejects it", 8000);
      },
      error: (err) => {
        if (g !== this.gen) return;
        vscode.commands.executeCommand("setContext", "flint.editing", false);
        if (err.code !== "cancelled") fail("the edit failed", err);
        this.reject();
      },
    }, redirect);
  }

  private highlight() {
    const lines = changedLines(this.state.original, this.state.result!);
    const base = this.start.line;
    this.editor.setDecorations(changed, lines.map((l) => new vscode.Range(base + l, 0, base + l, 0)));
  }

  private end() {
    this.state.phase = "over";
    this.editor.setDecorations(streaming, []);
    this.editor.setDecorations(changed, []);
    vscode.commands.executeCommand("setContext", "flint.editPending", false);
    vscode.commands.executeCommand("setContext", "flint.editing", false);
    if (current === this) current = undefined;
  }

  /** Keep the result: one undoable edit from the original to it. */
  async accept() {
    if (this.state.phase !== "pending") return;
    const result = this.state.result!;
    await this.show(this.state.original, false);
    this.first = true;
    await this.show(result, true);
    this.end();
  }

  /** Put the original back. */
  async reject() {
    if (this.state.phase === "over") return;
    this.state.phase = "over";
    await this.show(this.state.original, true);
    this.end();
  }
}

/**
 * Ask for an instruction. Resolves at the Enter itself (`onDidAccept`), with when it came:
 * `showInputBox` answers only after the box has closed, a round trip later.
 */
function ask(title: string, prompt: string): Promise<{ instruction: string; asked: number } | undefined> {
  return new Promise((resolve) => {
    const box = vscode.window.createInputBox();
    Object.assign(box, { title, prompt, placeholder: "e.g. rename x to count", ignoreFocusOut: true });
    let accepted = false;
    box.onDidAccept(() => {
      const asked = now();
      accepted = true;
      resolve(box.value.trim() ? { instruction: box.value, asked } : undefined);
      box.hide();
    });
    box.onDidHide(() => {
      if (!accepted) resolve(undefined);
      box.dispose();
    });
    box.show();
  });
}

/** The whole lines the selection touches (the cursor's line when nothing is selected). */
function wholeLines(editor: vscode.TextEditor): vscode.Range {
  const doc = editor.document;
  let range: vscode.Range = editor.selection;
  if (editor.selection.isEmpty) range = doc.lineAt(editor.selection.active.line).range;
  // Whole lines: the model rewrites lines, not fragments of them.
  const endLine = range.end.character === 0 && range.end.line > range.start.line ? range.end.line : range.end.line + 1;
  range = new vscode.Range(range.start.line, 0, Math.min(endLine, doc.lineCount), 0);
  if (endLine >= doc.lineCount) range = new vscode.Range(range.start, doc.lineAt(doc.lineCount - 1).range.end);
  return range;
}

async function editSelection() {
  const editor = vscode.window.activeTextEditor;
  if (!editor) return;
  let s: Session;
  try {
    s = await connect();
  } catch (e) {
    return fail("cannot connect", e as Error);
  }
  const redirect = current?.state.phase === "streaming" && current.editor === editor;
  const range = wholeLines(editor);
  const language = fenceLanguage(editor.document.languageId);
  // While the user types the instruction, the server prefills the code (the prompt puts it
  // first), so the answer's first token waits only for the instruction's prefill.
  if (!redirect && !current) s.prefill(editor.document.getText(range), language);
  const answer = await ask(
    redirect ? "Flint: redirect the edit" : "Flint: edit the selection",
    redirect ? "A new instruction; the rewrite so far stays in context" : "What should change?",
  );
  if (!answer) return;
  const { instruction, asked } = answer;
  if (redirect && current?.state.phase === "streaming") return current.run(instruction, true, asked);
  if (current) await current.reject();
  if (s.busy) s.cancel();
  current = new LiveEdit(editor, range, language);
  current.run(instruction, false, asked);
}

export function activate(ctx: vscode.ExtensionContext) {
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.command = "flint.reconnect";
  showStatus("$(debug-disconnect) Flint", "not connected");
  const chat = new ChatPanel(ctx, connect, params, report, fail, () => vscode.window.activeTextEditor);
  ctx.subscriptions.push(
    status,
    log,
    vscode.commands.registerCommand("flint.editSelection", editSelection),
    vscode.commands.registerCommand("flint.acceptEdit", () => current?.accept()),
    vscode.commands.registerCommand("flint.rejectEdit", () => current?.reject()),
    vscode.commands.registerCommand("flint.cancel", () => session?.cancel()),
    vscode.commands.registerCommand("flint.openChat", () => chat.show()),
    vscode.commands.registerCommand("flint.toggleInlineCompletion", async () => {
      const c = vscode.workspace.getConfiguration("flint");
      const on = !c.get<boolean>("inlineCompletion.enabled", true);
      await c.update("inlineCompletion.enabled", on, vscode.ConfigurationTarget.Global);
      log.appendLine(`inline completion ${on ? "on" : "off"}`);
      vscode.window.setStatusBarMessage(`Flint: inline completion ${on ? "on" : "off"}`, 3000);
    }),
    vscode.commands.registerCommand("flint.reconnect", () => connect().catch((e) => fail("cannot connect", e))),
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, new InlineProvider(config, log)),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("flint.serverUrl") || e.affectsConfiguration("flint.apiKey")) {
        session?.close();
        session = undefined;
      }
    }),
  );
  connect().catch((e) => log.appendLine(`not connected: ${e}`));
}

export function deactivate() {
  session?.close();
  server?.kill();
}
