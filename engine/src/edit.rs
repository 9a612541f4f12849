//! Code edits: the model rewrites code following an instruction, with the original code as
//! the prediction for speculative decoding, so the unchanged part costs a fraction of a
//! forward pass per token (`flint edit`, the server's `edit` turns, the VS Code extension).
//!
//! The prompt is a chat whose assistant turn is already opened with the code fence: the model
//! then continues with code rather than an explanation, and the answer ends at the closing
//! fence (a stop string). Everything here is shared, so the CLI, the server and the editor
//! produce the same tokens for the same request.

use crate::generate::Request;
use crate::sampler::SamplerConfig;
use crate::speculative::SpecConfig;
use crate::tokenizer::{Message, Tokenizer};
use anyhow::{bail, Result};

/// Ends the answer: the closing code fence.
pub const FENCE: &str = "```";

const SYSTEM: &str = "You are a code editor. Apply the user's instruction to the code and reply with the complete updated code only, \
in one fenced code block, keeping every other line exactly as it is.";

/// One edit: the code (a whole file or a range of it), what to do, and its language (the
/// fence's info string; may be empty).
#[derive(Clone, Debug)]
pub struct Edit {
    pub code: String,
    pub instruction: String,
    pub language: String,
}

fn with_newline(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

impl Edit {
    /// The user message: the code first, then the instruction. Everything before the
    /// instruction can be prefilled while the user still types it ([`Edit::prefix`]), and a
    /// small model follows an instruction it read last (SmolLM2-135M answered a rename with
    /// "example usage" when the instruction came first).
    fn message(&self, instruction: &str) -> String {
        format!("{FENCE}{}\n{}{FENCE}\n\n{}", self.language, with_newline(&self.code), instruction.trim())
    }

    /// The assistant turn's opening, after the generation prompt.
    fn opening(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        tok.encode(&format!("{FENCE}{}\n", self.language), false)
    }

    /// A fresh conversation's prompt for this edit.
    pub fn prompt(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        if self.instruction.trim().is_empty() {
            bail!("an edit needs an instruction");
        }
        self.prompt_with(tok, &self.instruction)
    }

    fn prompt_with(&self, tok: &Tokenizer, instruction: &str) -> Result<Vec<u32>> {
        let mut p = tok.chat_tokens(&[Message::new("system", SYSTEM), Message::new("user", &self.message(instruction))])?;
        p.extend(self.opening(tok)?);
        Ok(p)
    }

    /// The tokens every instruction's prompt starts with (the instruction is ignored): what
    /// an editor prefills while the user types it, so the edit then prefills only the
    /// instruction. Found as what two different instructions' prompts share, so it holds
    /// whatever the tokenizer merges at the boundary.
    pub fn prefix(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        let (a, b) = (self.prompt_with(tok, "A")?, self.prompt_with(tok, "0")?);
        let n = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        Ok(a[..n].to_vec())
    }

    /// What follows a conversation's context (an earlier edit's prompt and its answer, whole
    /// or cut short) to ask for this edit instead: a redirect keeps what was said.
    pub fn continuation(&self, tok: &Tokenizer) -> Result<Vec<u32>> {
        let mut p = tok.chat_continue(&[Message::new("user", &self.message(&self.instruction))])?;
        p.extend(self.opening(tok)?);
        Ok(p)
    }

    /// The answer's length when a request does not say: twice the code's tokens and 256 more
    /// (room for an edit that adds code), as `flint edit` and the server both take it.
    pub fn default_max_tokens(&self, tok: &Tokenizer) -> Result<usize> {
        Ok(2 * tok.encode(&self.code, false)?.len() + 256)
    }

    /// The expected answer: the original code and the closing fence.
    pub fn prediction(&self) -> String {
        format!("{}{FENCE}", with_newline(&self.code))
    }

    /// The engine request: `prompt`, greedy unless `sampling` says otherwise, the closing
    /// fence as the stop string, the original code as the prediction.
    pub fn request(&self, tok: &Tokenizer, prompt: Vec<u32>, max_tokens: usize, sampling: SamplerConfig) -> Result<Request> {
        let mut r = Request::new(prompt, max_tokens, sampling);
        r.stop = vec![FENCE.to_string()];
        r.speculative = Some(SpecConfig::prediction(tok.encode(&self.prediction(), false)?));
        Ok(r)
    }

    /// The rewritten code in an answer: its text up to the closing fence, with the original's
    /// trailing newline (or its absence) kept.
    pub fn result(&self, answer: &str) -> String {
        let code = answer.split(FENCE).next().unwrap_or("");
        if self.code.ends_with('\n') || self.code.is_empty() {
            with_newline(code)
        } else {
            code.strip_suffix('\n').unwrap_or(code).to_string()
        }
    }
}

/// The fence's language for a file name, from its extension.
pub fn language(path: &std::path::Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "py" => "python",
        "rs" => "rust",
        "js" | "mjs" | "cjs" => "javascript",
        "ts" | "tsx" => "typescript",
        "c" | "h" => "c",
        "cc" | "cpp" | "cxx" | "hpp" => "cpp",
        "go" => "go",
        "java" => "java",
        "rb" => "ruby",
        "sh" | "bash" => "bash",
        "json" => "json",
        "toml" => "toml",
        "md" => "markdown",
        "html" => "html",
        "css" => "css",
        "sql" => "sql",
        _ => "",
    }
}

/// Lines `start..=end` (1-based) of `text`: (before, the range, after), every line keeping
/// its newline.
pub fn split_lines(text: &str, start: usize, end: usize) -> Result<(&str, &str, &str)> {
    let n = text.lines().count();
    if start == 0 || start > end || end > n {
        bail!("--range {start}:{end}: the file has {n} lines (1-based, inclusive, start <= end)");
    }
    // Where each line starts; past the last line, the end of the text.
    let starts: Vec<usize> = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    let offset = |line: usize| starts.get(line - 1).copied().unwrap_or(text.len());
    let (a, b) = (offset(start), offset(end + 1));
    Ok((&text[..a], &text[a..b], &text[b..]))
}

/// A unified diff of `old` and `new` (empty when they are equal).
pub fn diff(name: &str, old: &str, new: &str) -> String {
    let name = name.trim_start_matches('/');
    similar::TextDiff::from_lines(old, new).unified_diff().context_radius(3).header(&format!("a/{name}"), &format!("b/{name}")).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let t = "a\nb\nc\nd\n";
        assert_eq!(split_lines(t, 1, 4).unwrap(), ("", t, ""));
        assert_eq!(split_lines(t, 2, 3).unwrap(), ("a\n", "b\nc\n", "d\n"));
        assert_eq!(split_lines(t, 4, 4).unwrap(), ("a\nb\nc\n", "d\n", ""));
        assert_eq!(split_lines("x\ny", 2, 2).unwrap(), ("x\n", "y", ""));
        for (s, e) in [(0, 1), (2, 1), (1, 5)] {
            assert!(split_lines(t, s, e).is_err(), "{s}:{e}");
        }
    }

    #[test]
    fn results_keep_the_trailing_newline() {
        let e = |code: &str| Edit { code: code.into(), instruction: "x".into(), language: String::new() };
        assert_eq!(e("a\n").result("b\n"), "b\n");
        assert_eq!(e("a\n").result("b"), "b\n");
        assert_eq!(e("a").result("b\n"), "b");
        assert_eq!(e("a\n").result("b\n```\nmore"), "b\n");
        assert_eq!(e("a\n").prediction(), "a\n```");
    }

    #[test]
    fn diffs() {
        assert_eq!(diff("f", "a\n", "a\n"), "");
        let d = diff("f.py", "a\nb\nc\n", "a\nB\nc\n");
        assert!(d.starts_with("--- a/f.py\n+++ b/f.py\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n"), "{d}");
    }
}
