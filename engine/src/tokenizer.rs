//! The tokenizer, built from GGUF metadata with the `tokenizers` crate: byte-level BPE from
//! `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the pre-tokenizer named by
//! `tokenizer.ggml.pre`, special tokens recognised only when asked. Decoding maps each token
//! back to its bytes; [`StreamDecoder`] emits only whole UTF-8 characters.

use crate::gguf::{Gguf, Value};
use anyhow::{anyhow, bail, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    /// Special tokens are plain text.
    plain: tokenizers::Tokenizer,
    /// Special tokens are recognised.
    special: tokenizers::Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    is_control: Vec<bool>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Extra ids that end a generation (e.g. `<|endoftext|>` next to `<|im_end|>`).
    pub eog: Vec<u32>,
    pub add_bos: bool,
    chat: Option<ChatTemplate>,
}

/// GPT-2's byte-level alphabet: the printable stand-in character for each byte.
pub fn byte_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

fn string_array<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    let arr = g.get(key).and_then(Value::as_array).ok_or_else(|| anyhow!("{key} is missing or not an array"))?;
    arr.iter().map(|v| v.as_str().ok_or_else(|| anyhow!("{key} holds a non-string"))).collect()
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        if model != "gpt2" {
            bail!("tokenizer model {model:?} is not supported (Flint reads byte-level BPE, \"gpt2\")");
        }
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let merges_raw = string_array(g, "tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            Some(_) => bail!("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length"),
            None => vec![1; tokens.len()],
        };
        let mut vocab = std::collections::HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // Duplicates resolve to the first id, as in llama.cpp.
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for m in &merges_raw {
            let (a, b) = m.split_once(' ').ok_or_else(|| anyhow!("merge {m:?} has no space"))?;
            if !vocab.contains_key(a) || !vocab.contains_key(b) {
                bail!("merge {m:?} names a token that is not in the vocabulary");
            }
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .build()
            .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
        let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let byte_level = |regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
        let pre_tok = match pre {
            // SmolLM: digits one by one, then the GPT-2 split.
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(
                    Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                        .map_err(|e| anyhow!("{e}"))?,
                ),
                byte_level(false),
            ])),
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            other => {
                eprintln!("flint: warning: pre-tokenizer {other:?} is unknown, using the GPT-2 split");
                byte_level(true)
            }
        };
        let mut special = tokenizers::Tokenizer::new(bpe);
        special.with_pre_tokenizer(Some(pre_tok));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        special.add_special_tokens(&specials);
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);

        let u2b: std::collections::HashMap<char, u8> =
            byte_to_unicode().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| {
                if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                    return t.as_bytes().to_vec();
                }
                let mut out = Vec::with_capacity(t.len());
                for c in t.chars() {
                    match u2b.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            })
            .collect();
        let id = |key: &str| -> Option<u32> {
            g.get(key).and_then(Value::as_u64).filter(|&i| (i as usize) < tokens.len()).map(|i| i as u32)
        };
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut eog: Vec<u32> = eos.into_iter().collect();
        for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>"] {
            if let Some(i) = tokens.iter().position(|t| *t == name) {
                if types[i] == TOKEN_CONTROL && !eog.contains(&(i as u32)) {
                    eog.push(i as u32);
                }
            }
        }
        let template = g.get("tokenizer.chat_template").and_then(Value::as_str);
        Ok(Tokenizer {
            plain,
            special,
            is_control: types.iter().map(|&t| t == TOKEN_CONTROL).collect(),
            token_bytes,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos,
            eog,
            add_bos: g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            chat: template.and_then(ChatTemplate::parse),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Token ids of `text`; special tokens are recognised only when `special` is set.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let t = if special { &self.special } else { &self.plain };
        let enc = t.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The bytes a token stands for. Control tokens (`<|im_end|>`, ...) render as nothing
    /// unless `special`.
    pub fn token_bytes(&self, id: u32, special: bool) -> &[u8] {
        match self.token_bytes.get(id as usize) {
            Some(_) if self.is_control[id as usize] && !special => &[],
            Some(b) => b,
            None => &[],
        }
    }

    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i, special).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The prompt for a conversation, rendered with the model's chat template and tokenized
    /// (special tokens recognised in the template, not in the messages' text).
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.render_chat(messages, true)
    }

    /// What follows a conversation's context (its last prompt and the assistant's answer,
    /// whole or cut short) to add `messages` and ask for the next answer: the end of the
    /// assistant's turn, the new turns, the generation prompt. Appending keeps the context's
    /// tokens exactly as they were, so their KV cache is reused in full.
    pub fn chat_continue(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let t = self.template()?;
        let mut ids = self.encode(&t.end, true)?;
        ids.extend(self.encode("\n", false)?);
        ids.extend(self.render_chat(messages, false)?);
        Ok(ids)
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat.as_ref().ok_or_else(|| anyhow!("this model has no chat template Flint understands (ChatML); use --raw"))
    }

    fn render_chat(&self, messages: &[Message], first: bool) -> Result<Vec<u32>> {
        let t = self.template()?;
        let mut ids = Vec::new();
        if first && self.add_bos {
            ids.extend(self.bos);
        }
        let start = self.encode(&t.start, true)?;
        let end = self.encode(&t.end, true)?;
        let mut turn = |role: &str, content: &str| -> Result<()> {
            ids.extend(&start);
            // Role and content in one piece, as the rendered template would be tokenized;
            // special tokens inside a message stay text.
            ids.extend(self.encode(&format!("{role}\n{content}"), false)?);
            ids.extend(&end);
            ids.extend(self.encode("\n", false)?);
            Ok(())
        };
        if first && messages.first().map_or(true, |m| m.role != "system") {
            if let Some(sys) = &t.default_system {
                turn("system", sys)?;
            }
        }
        for m in messages {
            turn(&m.role, &m.content)?;
        }
        ids.extend(&start);
        ids.extend(self.encode("assistant\n", false)?);
        Ok(ids)
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), with the default system message a
/// template may insert when the conversation has none (SmolLM2's does).
struct ChatTemplate {
    start: String,
    end: String,
    default_system: Option<String>,
}

impl ChatTemplate {
    fn parse(src: &str) -> Option<Self> {
        if !src.contains("<|im_start|>") || !src.contains("<|im_end|>") {
            return None;
        }
        let default_system = src.find("'<|im_start|>system\n").and_then(|i| {
            let rest = &src[i + "'<|im_start|>system\n".len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string())
        });
        Some(ChatTemplate { start: "<|im_start|>".into(), end: "<|im_end|>".into(), default_system })
    }
}

/// Turns a stream of token bytes into text without ever splitting a UTF-8 character:
/// an incomplete sequence at the end waits for the next token.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..ok]).expect("valid prefix"));
                    match e.error_len() {
                        // Incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..ok);
                            return out;
                        }
                        // Invalid bytes: replace them, as a lossy decode would.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..ok + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of the stream (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
