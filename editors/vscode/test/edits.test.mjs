// The edit logic (out/edits.js): what the region shows as the rewrite streams, and which
// lines of a result changed.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { changedLines, shown, fenceLanguage, EditState } = require("../out/edits.js");

test("the region shows the answer up to a closing fence", () => {
  assert.equal(shown("def f():\n    pass\n"), "def f():\n    pass\n");
  assert.equal(shown("x = 1\n```\nExplanation"), "x = 1\n");
  const e = new EditState("a\n");
  assert.equal(e.delta("b"), "b");
  assert.equal(e.delta("\n```"), "b\n");
  e.finish("b\n");
  assert.equal(e.phase, "pending");
  e.restart();
  assert.equal(e.answer, "");
  assert.equal(e.phase, "streaming");
});

test("changed lines are those outside the longest common subsequence", () => {
  assert.deepEqual(changedLines("a\nb\nc", "a\nb\nc"), []);
  assert.deepEqual(changedLines("a\nb\nc", "a\nB\nc"), [1]);
  assert.deepEqual(changedLines("a\nc", "a\nb\nc"), [1]);
  assert.deepEqual(changedLines("a\nb\nc", "a\nc"), []);
  assert.deepEqual(changedLines("", "x\ny"), [0, 1]);
  assert.deepEqual(changedLines("def f(w):\n  return w\n", "def f(width):\n  return width\n"), [0, 1]);
});

test("languages map to fence names", () => {
  assert.equal(fenceLanguage("python"), "python");
  assert.equal(fenceLanguage("typescriptreact"), "typescript");
  assert.equal(fenceLanguage("plaintext"), "");
});
