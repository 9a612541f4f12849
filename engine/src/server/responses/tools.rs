//! Function tools in the chat template: their schemas rendered into the system turn, the
//! model's calls recognised in its output, and earlier calls and their results rendered
//! back into the conversation.
//!
//! The syntax is the common `<tool_call>{"name": ..., "arguments": ...}</tool_call>` form
//! (Hermes, Qwen 2.5, and the SmolLM2 family's tool-use fine-tunes); a result goes back as a
//! user turn holding `<tool_response>...</tool_response>`.

use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function tool the request offers.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

impl Tool {
    /// The function tools of a request's `tools`; other types (web search, MCP, custom...)
    /// are skipped: this server cannot run them and the model never sees them.
    pub fn from_request(tools: &[Value]) -> Vec<Tool> {
        tools
            .iter()
            .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
            .filter_map(|t| {
                // The Responses API puts the fields at the top; Chat Completions under "function".
                let f = t.get("function").unwrap_or(t);
                Some(Tool {
                    name: f.get("name")?.as_str()?.to_string(),
                    description: f.get("description").and_then(Value::as_str).map(str::to_string),
                    parameters: f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
                })
            })
            .collect()
    }
}

/// The system turn's tool section: what the model needs to call them.
pub fn system_section(tools: &[Tool]) -> String {
    let mut s = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for t in tools {
        let sig = json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}});
        s.push('\n');
        s.push_str(&sig.to_string());
    }
    s.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
         <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    s
}

/// An earlier call, as the assistant wrote it.
pub fn render_call(name: &str, arguments: &str) -> String {
    // Arguments are a JSON text; keep them as an object where they parse.
    let args = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| Value::String(arguments.to_string()));
    format!("{OPEN}\n{}\n{CLOSE}", json!({"name": name, "arguments": args}))
}

/// A call's result, as the user turn that hands it back.
pub fn render_output(output: &str) -> String {
    format!("<tool_response>\n{output}\n</tool_response>")
}

/// What the model wrote, split into plain text and calls.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Call { name: String, arguments: String },
}

/// Splits streamed text into [`Piece`]s as it arrives: text is passed on at once except a
/// tail that may still begin `<tool_call>`; a call is handed out whole once closed.
#[derive(Debug, Default)]
pub struct CallParser {
    held: String,
    /// Inside `<tool_call>`: `held` is the call's body so far.
    inside: bool,
}

impl CallParser {
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.inside {
                let Some(end) = self.held.find(CLOSE) else { break };
                let body = self.held[..end].to_string();
                self.held.drain(..end + CLOSE.len());
                self.inside = false;
                out.push(parse_call(&body).unwrap_or_else(|| Piece::Text(format!("{OPEN}{body}{CLOSE}"))));
            } else if let Some(start) = self.held.find(OPEN) {
                if start > 0 {
                    out.push(Piece::Text(self.held[..start].to_string()));
                }
                self.held.drain(..start + OPEN.len());
                self.inside = true;
            } else {
                // Hold back the longest tail that is a beginning of the opening tag.
                let keep = (1..OPEN.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&n| self.held.is_char_boundary(self.held.len() - n) && OPEN.starts_with(&self.held[self.held.len() - n..]))
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                if cut > 0 {
                    out.push(Piece::Text(self.held[..cut].to_string()));
                    self.held.drain(..cut);
                }
                break;
            }
        }
        out
    }

    /// The end of the output: what is held goes out; a call the model never closed counts
    /// if its body parses (it may stop at its end-of-turn token instead of the tag).
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        if self.inside {
            self.inside = false;
            return vec![parse_call(&held).unwrap_or_else(|| Piece::Text(format!("{OPEN}{held}")))];
        }
        if held.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(held)]
        }
    }
}

fn parse_call(body: &str) -> Option<Piece> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or_else(|| json!({}));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(Piece::Call { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&str]) -> Vec<Piece> {
        let mut p = CallParser::default();
        let mut out: Vec<Piece> = chunks.iter().flat_map(|c| p.push(c)).collect();
        out.extend(p.finish());
        // Adjacent text pieces are one text for the comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    fn call(name: &str, args: &str) -> Piece {
        Piece::Call { name: name.into(), arguments: args.into() }
    }

    #[test]
    fn text_without_calls_passes_through_at_once() {
        let mut p = CallParser::default();
        assert_eq!(p.push("hello <b>"), vec![Piece::Text("hello <b>".into())]);
        // A possible tag start is held, then released when it turns out not to be one.
        assert_eq!(p.push(" a <tool"), vec![Piece::Text(" a ".into())]);
        assert_eq!(p.push("box>"), vec![Piece::Text("<toolbox>".into())]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn calls_split_across_chunks_anywhere() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"shell\", \"arguments\": {\"command\": [\"ls\", \"-la\"]}}\n</tool_call>";
        let want = vec![Piece::Text("Let me look.\n".into()), call("shell", r#"{"command":["ls","-la"]}"#)];
        for cut in 0..text.len() {
            if text.is_char_boundary(cut) {
                assert_eq!(all(&[&text[..cut], &text[cut..]]), want, "split at {cut}");
            }
        }
        // One byte at a time.
        let bytes: Vec<String> = text.chars().map(String::from).collect();
        assert_eq!(all(&bytes.iter().map(String::as_str).collect::<Vec<_>>()), want);
    }

    #[test]
    fn several_calls_string_arguments_and_an_unclosed_last_call() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>\n<tool_call>{\"name\": \"b\", \"parameters\": {}}";
        assert_eq!(all(&[text]), vec![call("a", r#"{"x": 1}"#), Piece::Text("\n".into()), call("b", "{}")]);
    }

    #[test]
    fn a_malformed_call_stays_text() {
        assert_eq!(all(&["<tool_call>not json</tool_call> ok"]), vec![Piece::Text("<tool_call>not json</tool_call> ok".into())]);
        assert_eq!(all(&["x <tool_call>{\"name\":"]), vec![Piece::Text("x <tool_call>{\"name\":".into())]);
        assert_eq!(all(&["é<tool_"]), vec![Piece::Text("é<tool_".into())]);
    }

    #[test]
    fn rendering_round_trips_through_the_parser() {
        let r = render_call("apply_patch", r#"{"input": "*** Begin Patch"}"#);
        assert_eq!(all(&[&r]), vec![call("apply_patch", r#"{"input":"*** Begin Patch"}"#)]);
        assert_eq!(render_output("done"), "<tool_response>\ndone\n</tool_response>");
        let tools = Tool::from_request(&[
            json!({"type": "function", "name": "shell", "description": "Run", "parameters": {"type": "object"}}),
            json!({"type": "web_search"}),
            json!({"type": "function", "function": {"name": "chat_style"}}),
        ]);
        assert_eq!(tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["shell", "chat_style"]);
        let s = system_section(&tools);
        assert!(s.contains(r#""name":"shell""#) && s.contains("<tool_call>") && !s.contains("web_search"), "{s}");
    }
}
