//! The engine thread: one table of requests keyed by id, each in one [`Phase`]. Generations
//! in progress take turns, one model step each (a decode step, a speculative verification,
//! or a slice of a long prompt's prefill), so a long prompt or a long answer never starves
//! the others. Plain decode steps of every generation at one are batched into one forward
//! pass (the weights are read once for all of them). A job whose client reads slowly is
//! skipped while its channel is full: the engine never blocks on a client and never
//! buffers more than the channel holds.
//!
//! Every loop: commands in; stop requests taken in every phase ([`Worker::sweep`]); queued
//! jobs admitted while there is room; one model step. Every exit goes through
//! [`Worker::terminate`].

use super::{Cmd, Control, Final, Limits, Reply, Slot, Why, CLIENT_STALL};
use crate::generate::{Engine, FinishReason, Generation, Outcome, Request, Step, Timings};
use crate::model::Forward;
use crate::server::metrics::Metrics;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The shortest shared prefix for which a new conversation takes a pooled cache (a few
/// tokens are no gain, and would take the cache from the requests that share more).
const POOLED_PREFIX: usize = 16;

pub(super) struct Job {
    pub id: u64,
    pub slot: Slot,
    pub req: Request,
    pub control: Control,
    pub reply: Reply,
    pub submitted: Instant,
}

/// Where a request is in its life. It leaves the table, from any phase, only through
/// [`Worker::terminate`].
pub(super) enum Phase {
    /// Waiting for a place (and, for a conversation, for its previous turn to end).
    Queued(Request),
    /// Its prompt's uncached tokens run in slices.
    Prefill(Generation<Engine>),
    /// One token (or one verified draft) per step.
    Decode(Generation<Engine>),
    /// Its request or generation is in the hands of the step running now.
    Moved,
}

/// How a request leaves the table.
enum Exit {
    /// Its natural end: an end-of-generation token, a stop string, the length.
    Finished,
    /// Stopped before that, with the reason.
    Stopped(Why),
    /// Refused or failed, with an error code; nothing of it is reported but the error.
    Failed(&'static str, String),
}

struct Entry {
    slot: Slot,
    reply: Reply,
    control: Control,
    submitted: Instant,
    phase: Phase,
    last_token: Option<Instant>,
    /// Since when its channel has been full.
    blocked_since: Option<Instant>,
}

pub(super) struct Worker {
    base: Engine,
    limits: Limits,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    table: HashMap<u64, Entry>,
    /// Queued ids, oldest first.
    waiting: VecDeque<u64>,
    /// Running ids (prefill or decode), in turn order.
    order: VecDeque<u64>,
    /// Idle conversation caches.
    convs: HashMap<u64, Engine>,
    /// Idle pool caches.
    pool: Vec<Engine>,
    /// Conversations closed while a job of theirs was running.
    closed: Vec<u64>,
    deadline: Option<Instant>,
}

impl Worker {
    pub fn new(base: Engine, limits: Limits, metrics: Arc<Metrics>, queued: Arc<AtomicUsize>) -> Worker {
        Worker {
            base,
            limits,
            metrics,
            queued,
            table: HashMap::new(),
            waiting: VecDeque::new(),
            order: VecDeque::new(),
            convs: HashMap::new(),
            pool: Vec::new(),
            closed: Vec::new(),
            deadline: None,
        }
    }

    pub fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            if self.table.is_empty() {
                if self.deadline.is_some() {
                    return;
                }
                match rx.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            self.sweep();
            self.admit();
            // A panic inside a step (a bug) fails the running requests, not the server.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step())) {
                Ok(true) => {}
                // Every job waits on its client: nothing to compute.
                Ok(false) => std::thread::sleep(Duration::from_micros(500)),
                Err(panic) => {
                    let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                    let message = format!("the engine failed: {}", what.unwrap_or_else(|| "a panic".into()));
                    eprintln!("flint: {message}; ending the running generations");
                    for id in self.order.clone() {
                        // Their caches may be half-written: dropped, not given back.
                        if let Some(e) = self.table.get_mut(&id) {
                            e.phase = Phase::Moved;
                        }
                        self.terminate(id, Exit::Failed("internal", message.clone()));
                    }
                }
            }
            self.metrics.queue_depth.set(self.waiting.len() as i64);
            self.metrics.active_generations.set(self.order.len() as i64);
        }
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Submit(job) => {
                let e = Entry {
                    slot: job.slot,
                    reply: job.reply,
                    control: job.control,
                    submitted: job.submitted,
                    phase: Phase::Queued(job.req),
                    last_token: None,
                    blocked_since: None,
                };
                self.table.insert(job.id, e);
                self.waiting.push_back(job.id);
                if self.deadline.is_some() {
                    self.terminate(job.id, Exit::Failed("shutting_down", "the server is shutting down".into()));
                }
            }
            Cmd::Close(id) => {
                let running = self.table.values().any(|e| e.slot == Slot::Conv(id) && !matches!(e.phase, Phase::Queued(_)));
                match self.convs.remove(&id) {
                    // Its cache goes to the pool: a later connection or request with the same
                    // prefix (the same agent's next run, say) reuses it.
                    Some(e) => self.put(Slot::Pool, e),
                    None if running => self.closed.push(id),
                    None => {}
                }
            }
            Cmd::Shutdown(grace) => {
                self.deadline = Some(Instant::now() + grace);
                for id in self.waiting.clone() {
                    self.terminate(id, Exit::Failed("shutting_down", "the server is shutting down".into()));
                }
            }
        }
    }

    /// Take every stop request, in every phase, before any model work: a cancel takes
    /// effect within the step that was running when it arrived.
    fn sweep(&mut self) {
        let overdue = self.deadline.is_some_and(|d| Instant::now() >= d);
        let stops: Vec<(u64, Why)> = self
            .table
            .iter()
            .filter_map(|(&id, e)| {
                let why = e.control.requested().or_else(|| e.reply.data.is_closed().then_some(Why::ClientGone));
                let why = why.or_else(|| e.blocked_since.is_some_and(|t| t.elapsed() > CLIENT_STALL).then_some(Why::Stalled));
                let why = why.or_else(|| (overdue && !matches!(e.phase, Phase::Queued(_))).then_some(Why::Shutdown));
                why.map(|w| (id, w))
            })
            .collect();
        for (id, why) in stops {
            self.terminate(id, Exit::Stopped(why));
        }
    }

    /// Move queued jobs into the running set, oldest first, while there is room.
    fn admit(&mut self) {
        let mut i = 0;
        while self.order.len() < self.limits.parallel && i < self.waiting.len() {
            let id = self.waiting[i];
            let slot = self.table[&id].slot;
            // A conversation runs one job at a time; a later one waits for it.
            if slot != Slot::Pool && self.order.iter().any(|r| self.table[r].slot == slot) {
                i += 1;
                continue;
            }
            self.waiting.remove(i);
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let e = self.table.get_mut(&id).expect("a waiting id is in the table");
            let Phase::Queued(req) = std::mem::replace(&mut e.phase, Phase::Moved) else {
                unreachable!("a waiting job is queued")
            };
            let mut engine = match self.take(slot, &req.prompt) {
                Ok(e) => e,
                Err(err) => {
                    self.order.push_back(id);
                    self.terminate(id, Exit::Failed("internal", format!("{err:#}")));
                    continue;
                }
            };
            if let Err(err) = engine.prepare(&req) {
                let code = if err.to_string().contains("context") { "context_full" } else { "invalid_request" };
                self.put(slot, engine);
                self.order.push_back(id);
                self.terminate(id, Exit::Failed(code, format!("{err:#}")));
                continue;
            }
            // The engine thread alone decides when a generation stops (no shared flag read
            // inside a step), so a step's checks and its work see the same state.
            let gen = Generation::new(engine, req, None);
            self.table.get_mut(&id).expect("still there").phase = Phase::Prefill(gen);
            self.order.push_back(id);
        }
    }

    /// One model step for the job first in turn, which then goes to the back. Where that
    /// step is a plain decode step, every other job at the same point joins it in one
    /// batched pass. Returns false when no job could step.
    fn step(&mut self) -> bool {
        for _ in 0..self.order.len() {
            let id = self.order.pop_front().expect("non-empty");
            self.order.push_back(id);
            let e = self.table.get_mut(&id).expect("a running id is in the table");
            if e.reply.data.capacity() == 0 {
                e.blocked_since.get_or_insert_with(Instant::now);
                continue;
            }
            e.blocked_since = None;
            match &mut e.phase {
                Phase::Queued(_) | Phase::Moved => unreachable!("a running job is past the queue"),
                Phase::Prefill(gen) => match gen.prefill_chunk(self.limits.prefill_chunk) {
                    Ok(true) => return true,
                    Ok(false) => {
                        let Phase::Prefill(gen) = std::mem::replace(&mut e.phase, Phase::Moved) else {
                            unreachable!()
                        };
                        e.phase = Phase::Decode(gen);
                    }
                    Err(err) => {
                        self.terminate(id, Exit::Failed("internal", format!("{err:#}")));
                        return true;
                    }
                },
                Phase::Decode(_) => {}
            }
            let batch = self.decode_batch(id);
            if batch.len() > 1 {
                self.step_batch(batch);
            } else {
                let Phase::Decode(gen) = &mut self.table.get_mut(&id).expect("running").phase else { unreachable!() };
                let step = gen.next();
                self.deliver(id, step);
            }
            return true;
        }
        false
    }

    /// The jobs whose next step is a plain decode step, `lead` first (if it is one), with
    /// each one's token and position.
    fn decode_batch(&self, lead: u64) -> Vec<(u64, u32, usize)> {
        let plain = |id: &u64| {
            let e = &self.table[id];
            match &e.phase {
                Phase::Decode(g) if e.reply.data.capacity() > 0 => g.batch_token().map(|(t, p)| (*id, t, p)),
                _ => None,
            }
        };
        let Some(first) = plain(&lead) else { return Vec::new() };
        let mut batch = vec![first];
        batch.extend(self.order.iter().filter(|&&r| r != lead).filter_map(plain));
        batch
    }

    /// One decode step of several generations in one forward pass.
    fn step_batch(&mut self, batch: Vec<(u64, u32, usize)>) {
        self.metrics.batch_size.observe(batch.len() as f64);
        let (tokens, pos): (Vec<u32>, Vec<usize>) = batch.iter().map(|&(_, t, p)| (t, p)).unzip();
        let mut gens: Vec<(u64, Generation<Engine>)> = batch.iter().map(|&(id, ..)| (id, self.take_decoding(id))).collect();
        // Each row's largest logits where every sampler of the batch needs no more: a GPU
        // backend then reads back a few pairs a row, not the vocabulary.
        let k = gens.iter().map(|(_, g)| g.batch_candidates()).collect::<Option<Vec<usize>>>().and_then(|ks| ks.into_iter().max());
        let result = {
            let mut fwds: Vec<&mut dyn Forward> = gens.iter_mut().map(forward_of).collect();
            let (lead, rest) = fwds.split_first_mut().expect("non-empty batch");
            match k {
                Some(k) => lead.forward_multi_top(rest, &tokens, &pos, k).map(BatchRows::Top),
                None => lead.forward_multi(rest, &tokens, &pos).map(BatchRows::Dense),
            }
        };
        let steps: Vec<Option<anyhow::Result<Step>>> = match result {
            Ok(BatchRows::Dense(logits)) => {
                let v = logits.len() / gens.len();
                gens.iter_mut().zip(logits.chunks_exact(v)).map(|((_, g), row)| g.next_with_logits(row.to_vec())).collect()
            }
            Ok(BatchRows::Top(top)) => gens.iter_mut().zip(top).map(|((_, g), row)| g.next_with_top(row)).collect(),
            Err(e) => gens
                .iter_mut()
                .map(|(_, g)| {
                    g.fail_batched();
                    Some(Err(anyhow::anyhow!("{e:#}")))
                })
                .collect(),
        };
        for ((id, g), step) in gens.into_iter().zip(steps) {
            self.table.get_mut(&id).expect("batched jobs stay in the table").phase = Phase::Decode(g);
            self.deliver(id, step);
        }
    }

    fn take_decoding(&mut self, id: u64) -> Generation<Engine> {
        let e = self.table.get_mut(&id).expect("running");
        match std::mem::replace(&mut e.phase, Phase::Moved) {
            Phase::Decode(g) => g,
            _ => unreachable!("batched jobs decode"),
        }
    }

    /// Send a step's output, or end the job.
    fn deliver(&mut self, id: u64, step: Option<anyhow::Result<Step>>) {
        match step {
            Some(Ok(step)) => {
                let e = self.table.get_mut(&id).expect("running");
                let now = Instant::now();
                if step.token.is_some() {
                    match e.last_token {
                        None => self.metrics.ttft.observe((now - e.submitted).as_secs_f64()),
                        Some(t) => self.metrics.inter_token.observe((now - t).as_secs_f64()),
                    }
                    e.last_token = Some(now);
                    self.metrics.completion_tokens.inc();
                }
                // Room was checked before the step, and only the engine sends.
                let _ = e.reply.data.try_send(super::Event::Delta { text: step.text, tokens: step.token.into_iter().collect() });
                if matches!(&e.phase, Phase::Decode(g) if g.is_finished()) {
                    self.terminate(id, Exit::Finished);
                }
            }
            Some(Err(err)) => self.terminate(id, Exit::Failed("internal", format!("{err:#}"))),
            None => self.terminate(id, Exit::Finished),
        }
    }

    /// The one way out of the table: emits the request's final event (exactly one), gives
    /// its KV cache back, and counts it.
    fn terminate(&mut self, id: u64, exit: Exit) {
        let Some(e) = self.table.remove(&id) else { return };
        if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(i) = self.order.iter().position(|&r| r == id) {
            self.order.remove(i);
        }
        let stopped = match &exit {
            Exit::Stopped(why) => Some(why.label()),
            _ => None,
        };
        let (outcome, tail, engine) = match (e.phase, exit) {
            (phase, Exit::Failed(code, message)) => {
                if let Phase::Prefill(g) | Phase::Decode(g) = phase {
                    self.put(e.slot, g.into_engine());
                }
                self.count(code);
                e.reply.finish(Final::Error { code, message });
                return;
            }
            (Phase::Queued(req), _) => (unstarted(req), String::new(), None),
            (Phase::Moved, _) => unreachable!("a step gives its generation back before it ends"),
            (Phase::Prefill(mut g) | Phase::Decode(mut g), _) => {
                // Stopped: no model work, only the held-back text is flushed.
                g.stop();
                let mut tail = String::new();
                while let Some(Ok(s)) = g.next() {
                    tail.push_str(&s.text);
                }
                (g.outcome(), tail, Some(g.into_engine()))
            }
        };
        let t = &outcome.timings;
        let m = &self.metrics;
        m.prompt_tokens.inc_by(outcome.prompt_tokens.len() as u64);
        m.cached_tokens.inc_by(t.cached_tokens as u64);
        m.drafted_tokens.inc_by(t.drafted as u64);
        m.accepted_tokens.inc_by(t.accepted as u64);
        if t.decode_tok_s > 0.0 {
            m.decode_tok_s.observe(t.decode_tok_s);
        }
        self.count(stopped.unwrap_or(outcome.finish_reason.as_str()));
        if let Some(engine) = engine {
            self.put(e.slot, engine);
        }
        e.reply.finish(Final::Done(Box::new(outcome), tail));
    }

    fn count(&self, reason: &'static str) {
        self.metrics.requests.get_or_create(&crate::server::metrics::Finish { reason }).inc();
    }

    fn take(&mut self, slot: Slot, prompt: &[u32]) -> anyhow::Result<Engine> {
        let common = |e: &Engine| e.cached().iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let best = (0..self.pool.len()).max_by_key(|&i| common(&self.pool[i]));
        let found = match slot {
            // A conversation's own cache; for its first turn, a pooled one holding more than
            // a few tokens of its prompt, if any does.
            Slot::Conv(id) => match self.convs.remove(&id) {
                Some(e) => Some(e),
                None => best.filter(|&i| common(&self.pool[i]) > POOLED_PREFIX).map(|i| self.pool.swap_remove(i)),
            },
            Slot::Pool => best.map(|i| self.pool.swap_remove(i)),
        };
        match found {
            Some(e) => Ok(e),
            None => self.base.fork(),
        }
    }

    fn put(&mut self, slot: Slot, e: Engine) {
        match slot {
            Slot::Conv(id) => {
                if let Some(i) = self.closed.iter().position(|&c| c == id) {
                    // Closed while it ran: to the pool, as at a close.
                    self.closed.swap_remove(i);
                    self.put(Slot::Pool, e);
                } else {
                    self.convs.insert(id, e);
                }
            }
            Slot::Pool => {
                if self.pool.len() < self.limits.parallel {
                    self.pool.push(e);
                }
            }
        }
    }
}

/// The outcome of a request stopped before it ran: its prompt, nothing generated.
fn unstarted(req: Request) -> Outcome {
    Outcome { prompt_tokens: req.prompt, tokens: Vec::new(), text: String::new(), finish_reason: FinishReason::Cancelled, timings: Timings::default() }
}

fn forward_of(g: &mut (u64, Generation<Engine>)) -> &mut dyn Forward {
    g.1.engine_mut().fwd.as_mut()
}

/// What a batched decode step hands back: every row's logits, or each row's largest.
enum BatchRows {
    Dense(Vec<f32>),
    Top(Vec<Vec<(u32, f32)>>),
}
