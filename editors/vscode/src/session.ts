// One persistent WebSocket to `flint serve` (/v1/ws, docs/protocol.md): turns, deltas,
// cancel and redirect. No VS Code dependency, so node's test runner drives it against a
// real server (test/session.test.mjs).

import WebSocket from "ws";

export interface Timings {
  ttft_ms: number;
  prompt_ms: number;
  decode_tok_s: number;
  forward_passes: number;
}

export interface Done {
  type: "done";
  id?: unknown;
  finish_reason: string;
  text: string;
  usage: { prompt_tokens: number; completion_tokens: number; cached_tokens: number; accepted_prediction_tokens: number };
  timings: Timings;
  /** For an edit turn: the rewritten code. */
  edit?: { text: string };
}

export interface ServerError {
  code: string;
  message: string;
  retry_after?: number;
}

/** What one turn reports, in order: deltas, then exactly one of done or error. */
export interface Handlers {
  delta?(text: string, tokens: number): void;
  done?(d: Done): void;
  error?(e: ServerError): void;
}

/** A code edit, as the server's `edit` turns take it. */
export interface EditRequest {
  code: string;
  instruction: string;
  language: string;
}

const PREFILL = "flint.prefill";

export type State = "connecting" | "connected" | "disconnected";

export class Session {
  model = "";
  nCtx = 0;
  /** Turns whose final event has not come: the running one first, then redirects. */
  private turns: Handlers[] = [];
  private closed = false;
  /** The last prefill's report (`prefilled`), for the log and the tests. */
  onPrefilled: (m: { complete: boolean; prompt_tokens: number; cached_tokens: number; prompt_ms: number }) => void = () => {};
  onState: (s: State, detail?: string) => void = () => {};

  private constructor(private ws: WebSocket) {}

  /** Connect and wait for the `session` message. */
  static open(url: string, key?: string, timeoutMs = 10000): Promise<Session> {
    const target = url.replace(/\/+$/, "").replace(/\/v1\/ws$/, "") + "/v1/ws";
    const headers: Record<string, string> = key ? { Authorization: `Bearer ${key}` } : {};
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(target, { headers, perMessageDeflate: false });
      const s = new Session(ws);
      const timer = setTimeout(() => {
        ws.terminate();
        reject(new Error(`no session from ${target} within ${timeoutMs} ms`));
      }, timeoutMs);
      ws.on("unexpected-response", (_req, res) => {
        clearTimeout(timer);
        let body = "";
        res.on("data", (c: Buffer) => (body += c.toString()));
        res.on("end", () => {
          let why = body;
          try {
            why = JSON.parse(body).error.message;
          } catch {}
          reject(new Error(`${target} refused the connection: HTTP ${res.statusCode}: ${why}`));
        });
      });
      ws.on("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      ws.once("message", (data) => {
        clearTimeout(timer);
        const m = JSON.parse(data.toString());
        if (m.type !== "session") return reject(new Error(`expected a session message, got ${m.type}`));
        s.model = m.model;
        s.nCtx = m.n_ctx;
        ws.removeAllListeners("error");
        ws.on("message", (d) => s.onMessage(JSON.parse(d.toString())));
        ws.on("close", (code, reason) => s.onClose(code, reason.toString()));
        ws.on("error", () => {});
        resolve(s);
      });
    });
  }

  get busy(): boolean {
    return this.turns.length > 0;
  }

  get open(): boolean {
    return !this.closed && this.ws.readyState === WebSocket.OPEN;
  }

  private send(m: object) {
    if (!this.open) throw new Error("not connected to the Flint server");
    this.ws.send(JSON.stringify(m));
  }

  /** Start a turn (fails at once if one runs: cancel or redirect it). */
  generate(body: object, h: Handlers) {
    if (this.busy) throw new Error("a generation is running: stop or redirect it");
    this.turns.push(h);
    this.send({ type: "generate", ...body });
  }

  /** Stop the running turn at its next token and run this one on its context. */
  redirect(body: object, h: Handlers) {
    this.turns.push(h);
    this.send({ type: this.turns.length > 1 ? "redirect" : "generate", ...body });
  }

  edit(e: EditRequest, params: object, h: Handlers, redirect = false) {
    const body = { edit: e, ...params };
    if (redirect) this.redirect(body, h);
    else this.generate(body, h);
  }

  /**
   * Prefill the edit of `code` while the user types its instruction: the edit that follows
   * then prefills only the instruction. Nothing to wait for; skipped while a turn runs.
   */
  prefill(code: string, language: string) {
    if (this.busy || !this.open) return;
    this.send({ type: "prefill", edit: { code, language }, id: PREFILL });
  }

  cancel() {
    if (this.busy && this.open) this.send({ type: "cancel" });
  }

  reset() {
    this.send({ type: "session.update", reset: true });
  }

  close() {
    this.closed = true;
    this.ws.close();
  }

  private onMessage(m: any) {
    const h = this.turns[0];
    switch (m.type) {
      case "delta":
        h?.delta?.(m.text, m.tokens?.length ?? 0);
        break;
      case "done":
        this.turns.shift();
        // A cancel drops the redirects that had not started: they get no turn.
        if (m.finish_reason === "cancelled") this.turns.splice(0).forEach((t) => t.error?.({ code: "cancelled", message: "stopped" }));
        h?.done?.(m as Done);
        break;
      case "prefilled":
        this.onPrefilled(m);
        break;
      case "error": {
        const e: ServerError = { code: m.code, message: m.message, retry_after: m.retry_after };
        // A refused prefill is no turn's (it only saves time).
        if (m.id === PREFILL) break;
        // An error that ended the running turn, or the refusal of the message just sent.
        const t = m.turn_ended ? this.turns.shift() : this.turns.pop();
        t?.error?.(e);
        break;
      }
      case "session.updated":
        break;
    }
  }

  private onClose(code: number, reason: string) {
    this.closed = true;
    const why = reason || `connection closed (${code})`;
    this.turns.splice(0).forEach((t) => t.error?.({ code: "disconnected", message: why }));
    this.onState("disconnected", why);
  }
}
