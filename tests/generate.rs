//! The decode loop: streaming, stop strings, cancellation, limits and KV reuse.

mod common;

use common::tiny_model;
use flint::generate::{Engine, FinishReason, Request};
use flint::quant::GgmlType;
use flint::sampler::SamplerConfig;
use flint::tokenizer::StreamDecoder;
use flint::{BackendKind, Loaded};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn engine() -> (Loaded, Engine) {
    let l = Loaded::open(&tiny_model(GgmlType::Q4_1, 512)).unwrap();
    let e = l.engine(BackendKind::Cpu, 64).unwrap();
    (l, e)
}

fn prompt(l: &Loaded) -> Vec<u32> {
    l.tokenizer.encode("the quick brown fox", false).unwrap()
}

#[test]
fn streamed_text_is_the_final_text() {
    let (l, mut e) = engine();
    let mut g = e.generate(Request::new(prompt(&l), 40, SamplerConfig::greedy()), None).unwrap();
    let mut streamed = String::new();
    let mut steps = 0;
    for s in g.by_ref() {
        streamed.push_str(&s.unwrap().text);
        steps += 1;
    }
    let o = g.outcome();
    assert_eq!(streamed, o.text);
    assert!(steps >= o.tokens.len());
    assert_eq!(o.tokens.len(), 40, "a random model never emits EOS in 40 greedy steps here");
    assert_eq!(o.finish_reason, FinishReason::Length);
    assert_eq!(o.timings.forward_passes, 40);
}

#[test]
fn same_seed_same_output() {
    let (l, mut e) = engine();
    let c = SamplerConfig { temperature: 1.0, seed: 5, ..Default::default() };
    let a = e.generate(Request::new(prompt(&l), 30, c.clone()), None).unwrap().finish().unwrap();
    e.reset();
    let b = e.generate(Request::new(prompt(&l), 30, c), None).unwrap().finish().unwrap();
    assert_eq!(a.tokens, b.tokens);
}

/// A stop string taken from the middle of the free-running output ends generation just
/// before it, even when it spans tokens; nothing past it is ever streamed.
#[test]
fn stop_strings_end_generation_before_them() {
    let (l, mut e) = engine();
    let free = e.generate(Request::new(prompt(&l), 40, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    let chars: Vec<char> = free.text.chars().collect();
    assert!(chars.len() > 20, "{:?}", free.text);
    let stop: String = chars[10..14].iter().collect();
    let want: String = free.text[..free.text.find(&stop).unwrap()].to_string();
    let mut req = Request::new(prompt(&l), 40, SamplerConfig::greedy());
    req.stop = vec!["never appears ✗".into(), stop.clone()];
    let mut g = e.generate(req, None).unwrap();
    let mut streamed = String::new();
    for s in g.by_ref() {
        streamed.push_str(&s.unwrap().text);
    }
    let o = g.outcome();
    assert_eq!(o.finish_reason, FinishReason::Stop);
    assert_eq!(o.text, want, "stop {stop:?}");
    assert_eq!(streamed, want);
}

#[test]
fn cancel_takes_effect_at_the_next_step() {
    let (l, mut e) = engine();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut g = e.generate(Request::new(prompt(&l), 100, SamplerConfig::greedy()), Some(cancel.clone())).unwrap();
    for _ in 0..3 {
        g.next().unwrap().unwrap();
    }
    cancel.store(true, Ordering::Relaxed);
    while let Some(s) = g.next() {
        assert!(s.unwrap().token.is_none(), "no token after the cancel");
    }
    let o = g.outcome();
    assert_eq!(o.finish_reason, FinishReason::Cancelled);
    assert_eq!(o.tokens.len(), 3);
}

/// A follow-up prompt that extends the previous context prefills only the new tokens and
/// gives what a fresh engine gives.
#[test]
fn kv_cache_is_reused_across_requests() {
    let (l, mut e) = engine();
    let p = prompt(&l);
    let first = e.generate(Request::new(p.clone(), 10, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    let mut follow = p.clone();
    follow.extend(&first.tokens);
    follow.extend(l.tokenizer.encode(" and more", false).unwrap());
    let again = e.generate(Request::new(follow.clone(), 10, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    assert!(again.timings.cached_tokens >= p.len() + first.tokens.len() - 1, "cached {}", again.timings.cached_tokens);
    let (_, mut fresh) = engine();
    let want = fresh.generate(Request::new(follow, 10, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    assert_eq!(again.tokens, want.tokens);
    assert_eq!(want.timings.cached_tokens, 0);
    // The same prompt again reuses all but the last token.
    let again2 = e.generate(Request::new(p.clone(), 1, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    assert_eq!(again2.timings.cached_tokens, p.len() - 1);
    assert_eq!(again2.tokens[0], first.tokens[0]);
}

#[test]
fn bad_requests_are_clear_errors() {
    let (l, mut e) = engine();
    let err = |r: Request, e: &mut Engine| e.generate(r, None).err().expect("must fail").to_string();
    assert!(err(Request::new(vec![], 5, SamplerConfig::greedy()), &mut e).contains("empty"));
    let long = vec![300u32; 512];
    assert!(err(Request::new(long, 5, SamplerConfig::greedy()), &mut e).contains("context is 512"));
    assert!(err(Request::new(vec![1, 9999], 5, SamplerConfig::greedy()), &mut e).contains("vocabulary"));
    let bad = SamplerConfig { top_p: 2.0, ..Default::default() };
    assert!(err(Request::new(prompt(&l), 5, bad), &mut e).contains("top_p"));
    // Generation stops with "length" when the context fills up.
    let near = vec![300u32; 505];
    let o = e.generate(Request::new(near, 100, SamplerConfig::greedy()), None).unwrap().finish().unwrap();
    assert_eq!((o.finish_reason, o.tokens.len()), (FinishReason::Length, 7));
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let text = "a€🦀é";
    let bytes = text.as_bytes();
    let mut d = StreamDecoder::default();
    let mut out = String::new();
    for b in bytes {
        let s = d.push(&[*b]);
        assert!(s.chars().all(|c| c != char::REPLACEMENT_CHARACTER));
        out.push_str(&s);
    }
    out.push_str(&d.finish());
    assert_eq!(out, text);
    // Invalid bytes become U+FFFD without losing what follows; a cut character at the end too.
    let mut d = StreamDecoder::default();
    assert_eq!(d.push(&[b'x', 0xFF, b'y']), "x\u{FFFD}y");
    assert_eq!(d.push(&[0xF0, 0x9F]), "");
    assert_eq!(d.finish(), "\u{FFFD}");
}
