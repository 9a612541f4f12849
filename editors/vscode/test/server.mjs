// A real `flint serve` on a free loopback port for the tests: FLINT_BIN (default: the
// workspace's release build) on FLINT_MODEL (default: the model `flint pull` fetched).

import { spawn, execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";

export const bin = process.env.FLINT_BIN ?? resolve(import.meta.dirname, "../../../target/release/flint");
export const model = process.env.FLINT_MODEL ?? join(homedir(), ".cache/flint/SmolLM2-135M-Instruct.Q4_1.gguf");

export function available() {
  return existsSync(bin) && existsSync(model);
}

/** Start the server; resolves to { url, stop }. */
export function start(extra = []) {
  const child = spawn(bin, ["serve", "--port", "0", "--model", model, ...extra], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolve, reject) => {
    let err = "";
    child.stderr.on("data", (b) => {
      err += b.toString();
      const m = err.match(/http:\/\/(\S+)/);
      if (m) resolve({ url: `ws://${m[1]}`, http: `http://${m[1]}`, stop: () => child.kill() });
    });
    child.on("exit", (code) => reject(new Error(`flint serve exited (${code}): ${err}`)));
  });
}

/** `flint edit --json` on a file. */
export function cliEdit(file, instruction, extra = []) {
  const out = execFileSync(bin, ["edit", file, "--instruction", instruction, "--json", "--model", model, "--backend", "cpu", ...extra], { encoding: "utf8" });
  return JSON.parse(out);
}
