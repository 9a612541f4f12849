//! `flint edit FILE --instruction TEXT`: the model rewrites the file (or a line range), with
//! the original as the prediction; prints the unified diff, or applies it with `--write`
//! (through a temporary file and a rename, so the original survives any failure).

use super::{model_path, out, report_timings, stream, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use flint::edit::{self, Edit};
use flint::generate::FinishReason;
use flint::Loaded;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args)]
pub struct EditArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The file to edit (UTF-8 text).
    file: PathBuf,
    /// What to change.
    #[arg(long, short)]
    instruction: String,
    /// Only these lines: START:END, 1-based and inclusive.
    #[arg(long)]
    range: Option<String>,
    /// Apply the change to the file instead of printing the diff.
    #[arg(long)]
    write: bool,
    /// Print {"diff", "text", "finish_reason", "timings"} (text: the rewritten code).
    #[arg(long)]
    json: bool,
    /// Longest answer in tokens (default: twice the code's tokens, plus 256).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Plain decoding, without the original code as the prediction (the output is the same).
    #[arg(long)]
    no_prediction: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn range(r: &str) -> Result<(usize, usize)> {
    let (a, b) = r.split_once(':').context("--range START:END, e.g. 10:24")?;
    Ok((a.trim().parse().context("--range START")?, b.trim().parse().context("--range END")?))
}

/// Write `text` to `path` in one step: a temporary file beside it, renamed over it.
fn replace(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("not a file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.flint-edit-{}", std::process::id()));
    let written = std::fs::write(&tmp, text)
        .and_then(|_| std::fs::metadata(path).and_then(|m| std::fs::set_permissions(&tmp, m.permissions())))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}; it is unchanged", path.display()));
    }
    Ok(())
}

pub fn edit(a: EditArgs) -> Result<()> {
    let original = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {} as UTF-8 text", a.file.display()))?;
    let (before, code, after) = match &a.range {
        Some(r) => {
            let (s, e) = range(r)?;
            edit::split_lines(&original, s, e)?
        }
        None => ("", original.as_str(), ""),
    };
    let e = Edit { code: code.to_string(), instruction: a.instruction.clone(), language: edit::language(&a.file).to_string() };
    let l = Loaded::open(&model_path(&a.model.model)?)?;
    let prompt = e.prompt(&l.tokenizer)?;
    let code_tokens = l.tokenizer.encode(code, false)?.len();
    let room = l.config.n_ctx.saturating_sub(prompt.len() + 1);
    if room < code_tokens + 1 {
        bail!("the edit needs {} prompt tokens and about {code_tokens} for the answer; the model's context is {}: edit a --range", prompt.len(), l.config.n_ctx);
    }
    let max_tokens = a.max_tokens.map_or_else(|| e.default_max_tokens(&l.tokenizer), Ok)?.min(room);
    let mut engine = l.engine_on(a.model.backend, prompt.len() + max_tokens, a.model.adapter.as_deref())?;
    let mut req = e.request(&l.tokenizer, prompt, max_tokens, a.sampling.config())?;
    if a.no_prediction {
        req.speculative = None;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || c.store(true, Ordering::Relaxed));
    let o = stream(&mut engine, req, cancel, false)?;
    let name = a.file.to_string_lossy();
    match o.finish_reason {
        FinishReason::Cancelled => bail!("cancelled; {name} is unchanged"),
        FinishReason::Length if a.write => bail!("the answer reached --max-tokens {max_tokens} before the code ended; {name} is unchanged"),
        FinishReason::Length => eprintln!("flint: warning: the answer reached --max-tokens {max_tokens} before the code ended"),
        _ => {}
    }
    let text = e.result(&o.text);
    let updated = format!("{before}{text}{after}");
    let diff = edit::diff(&name, &original, &updated);
    if a.json {
        let t = &o.timings;
        let v = serde_json::json!({
            "diff": diff, "text": text, "finish_reason": o.finish_reason.as_str(),
            "timings": {
                "prompt_tokens": o.prompt_tokens.len(), "tokens": o.tokens.len(), "prompt_ms": t.prompt_ms, "ttft_ms": t.ttft_ms,
                "decode_tok_s": t.decode_tok_s, "forward_passes": t.forward_passes, "drafted": t.drafted, "accepted": t.accepted,
                "rejected": t.rejected(),
            },
        });
        out(&format!("{v}\n"));
    } else if !a.write {
        out(&diff);
    }
    if !a.json {
        report_timings(&o);
    }
    if a.write && updated != original {
        replace(&a.file, &updated)?;
        eprintln!("flint: wrote {name}");
    }
    Ok(())
}
