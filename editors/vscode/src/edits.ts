// The edit's logic apart from the editor: what the region shows while the rewrite streams,
// and which lines of the result differ from the original (to highlight them). No VS Code
// dependency (test/edits.test.mjs).

/** The fence language for a VS Code language id (the server's prompt names it). */
export function fenceLanguage(languageId: string): string {
  const known: Record<string, string> = {
    python: "python", rust: "rust", javascript: "javascript", typescript: "typescript", typescriptreact: "typescript",
    javascriptreact: "javascript", c: "c", cpp: "cpp", go: "go", java: "java", ruby: "ruby", shellscript: "bash",
    json: "json", toml: "toml", markdown: "markdown", html: "html", css: "css", sql: "sql",
  };
  return known[languageId] ?? "";
}

/** What the region shows while streaming: the answer so far, cut at a closing fence. */
export function shown(answer: string): string {
  const i = answer.indexOf("```");
  return i < 0 ? answer : answer.slice(0, i);
}

/** The line indices (0-based) of `updated` that are not in a longest common subsequence
 * of lines with `original`: the lines the edit added or changed. */
export function changedLines(original: string, updated: string): number[] {
  const a = original.split("\n");
  const b = updated.split("\n");
  const n = a.length;
  const m = b.length;
  // lcs[i][j]: the LCS length of a[i..] and b[j..].
  const lcs: Uint32Array[] = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out: number[] = [];
  let i = 0;
  let j = 0;
  while (j < m) {
    if (i < n && a[i] === b[j]) {
      i++;
      j++;
    } else if (i < n && lcs[i + 1][j] >= lcs[i][j + 1]) {
      i++;
    } else {
      out.push(j++);
    }
  }
  return out;
}

/** An edit's life: streaming, then pending (accept or reject), then over. */
export type Phase = "streaming" | "pending" | "over";

export class EditState {
  phase: Phase = "streaming";
  answer = "";
  result?: string;

  constructor(readonly original: string) {}

  /** A delta arrived: the region's new content. */
  delta(text: string): string {
    this.answer += text;
    return shown(this.answer);
  }

  /** The turn ended with the server's rewritten code. */
  finish(result: string) {
    this.result = result;
    this.phase = "pending";
  }

  /** A redirect: the answer starts over (the server keeps the old one in context). */
  restart() {
    this.answer = "";
    this.phase = "streaming";
  }
}
