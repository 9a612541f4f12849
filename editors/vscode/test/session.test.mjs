// The extension's protocol client (out/session.js) against a real `flint serve`.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";
import * as server from "./server.mjs";

const require = createRequire(import.meta.url);
const { Session } = require("../out/session.js");

const CODE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n";
const INSTRUCTION = "Rename the parameter w to width.";
let srv;

if (!server.available()) {
  if (process.env.FLINT_REQUIRE_VSCODE) throw new Error(`flint (${server.bin}) and the model (${server.model}) are required`);
  console.log(`SKIPPED session tests: needs ${server.bin} and ${server.model}`);
} else {
  before(async () => (srv = await server.start(["--backend", "cpu"])));
  after(() => srv?.stop());

  /** One turn's events: resolves to { deltas, done } or rejects with the server's error. */
  function turn(start) {
    return new Promise((resolve, reject) => {
      const deltas = [];
      start({ delta: (t) => deltas.push(t), done: (d) => resolve({ deltas, done: d }), error: (e) => reject(Object.assign(new Error(e.message), e)) });
    });
  }

  test("connects and reads the session", async () => {
    const s = await Session.open(srv.url);
    assert.match(s.model, /SmolLM2/);
    assert.equal(s.nCtx, 8192);
    s.close();
  });

  test("a prefill while the instruction is typed leaves only the instruction to prefill", async () => {
    const s = await Session.open(srv.url);
    const prefilled = new Promise((resolve) => (s.onPrefilled = resolve));
    s.prefill(CODE, "python");
    const p = await prefilled;
    assert.equal(p.complete, true);
    assert.ok(p.prompt_tokens > 40, `the code is in the prefix: ${JSON.stringify(p)}`);
    const { done } = await turn((h) => s.edit({ code: CODE, instruction: INSTRUCTION, language: "python" }, {}, h));
    s.close();
    // The engine keeps the prefix's last token for the step after it.
    assert.ok(done.usage.cached_tokens >= p.prompt_tokens - 1, `reused: ${JSON.stringify(done.usage)} after ${JSON.stringify(p)}`);
    assert.ok(done.timings.prompt_ms < p.prompt_ms, `the edit's prefill (${done.timings.prompt_ms} ms) is shorter than the code's (${p.prompt_ms} ms)`);
  });

  test("an edit streams and its result equals flint edit --json's", async () => {
    const s = await Session.open(srv.url);
    const { deltas, done } = await turn((h) => s.edit({ code: CODE, instruction: INSTRUCTION, language: "python" }, {}, h));
    s.close();
    assert.ok(deltas.length > 1, "the rewrite streamed in pieces");
    assert.equal(done.finish_reason, "stop");
    assert.ok(done.usage.accepted_prediction_tokens > 0, "the original code was the prediction");
    const dir = mkdtempSync(join(tmpdir(), "flint-vscode-"));
    const file = join(dir, "shapes.py");
    writeFileSync(file, CODE);
    const cli = server.cliEdit(file, INSTRUCTION);
    assert.equal(done.edit.text, cli.text, "the server's edit turn and flint edit give the same code");
    assert.equal(deltas.join("").split("```")[0].trimEnd(), done.edit.text.trimEnd());
  });

  test("cancel stops a long answer; the session goes on", async () => {
    const s = await Session.open(srv.url);
    let cancelled = false;
    const r = await turn((h) =>
      s.generate({ content: "Write a very long story about a compiler.", max_tokens: 2000 }, {
        ...h,
        delta: (t) => {
          if (!cancelled) {
            cancelled = true;
            s.cancel();
          }
        },
      }),
    );
    assert.equal(r.done.finish_reason, "cancelled");
    assert.ok(r.done.usage.completion_tokens < 50, `stopped within a few tokens (${r.done.usage.completion_tokens})`);
    const again = await turn((h) => s.generate({ content: "Say hi.", max_tokens: 8 }, h));
    assert.ok(["stop", "length"].includes(again.done.finish_reason));
    s.close();
  });

  test("a redirect ends the running edit as redirected and runs the new instruction", async () => {
    const s = await Session.open(srv.url);
    const reasons = [];
    const second = new Promise((resolve, reject) => {
      let sent = false;
      s.edit({ code: CODE, instruction: "Add a docstring to every function.", language: "python" }, {}, {
        delta: () => {
          if (sent) return;
          sent = true;
          s.edit({ code: CODE, instruction: INSTRUCTION, language: "python" }, {}, { done: resolve, error: reject }, true);
        },
        done: (d) => reasons.push(d.finish_reason),
        error: reject,
      });
    });
    const d = await second;
    assert.deepEqual(reasons, ["redirected"]);
    assert.ok(d.edit.text.includes("def area"), d.edit.text);
    assert.ok(d.usage.cached_tokens > 0, "the redirected turn's context was reused");
    s.close();
  });

  test("server errors reach the turn's handler", async () => {
    const s = await Session.open(srv.url);
    await assert.rejects(turn((h) => s.edit({ code: CODE, instruction: " ", language: "" }, {}, h)), /instruction/);
    await assert.rejects(turn((h) => s.generate({ content: "x".repeat(100000) }, h)), (e) => e.code === "context_full");
    assert.ok(s.open, "the session stays usable");
    s.close();
  });

  test("a wrong key is refused with the server's reason", async () => {
    const keyed = await server.start(["--backend", "cpu", "--api-key", "sk-vscode-test"]);
    try {
      await assert.rejects(Session.open(keyed.url, "sk-wrong"), /HTTP 401/);
      const s = await Session.open(keyed.url, "sk-vscode-test");
      assert.ok(s.open);
      s.close();
    } finally {
      keyed.stop();
    }
  });
}
