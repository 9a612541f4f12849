//! The engine thread. One thread owns the model and every KV cache; connections send it
//! jobs and read their tokens from a bounded channel. Generations in progress take turns,
//! one model step each (a decode step, a speculative verification, or a slice of a long
//! prompt's prefill), so a long prompt or a long answer never starves the others. A job
//! Plain decode steps of all generations that are at one are batched into one forward pass
//! (the weights are read once for all of them). A job whose client reads slowly is skipped while its channel is full: the engine never blocks
//! on a client and never buffers more than the channel holds.

use super::metrics::Metrics;
use crate::generate::{Engine, Generation, Outcome, Request, Step};
use crate::model::Forward;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Which KV cache a job runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// A conversation's own cache, kept across its turns until [`Scheduler::close`].
    Conv(u64),
    /// Any cache of the shared pool (stateless HTTP requests); the one holding the longest
    /// prefix of the prompt is chosen, so repeated prompts still reuse their KV.
    Pool,
}

pub struct Job {
    pub slot: Slot,
    pub req: Request,
    pub cancel: Arc<AtomicBool>,
    pub events: mpsc::Sender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// Text now safe to show and the tokens it came from (none for the final flush).
    Delta { text: String, tokens: Vec<u32> },
    /// The generation ended; the outcome carries its tokens, usage and timings.
    Done(Box<Outcome>),
    /// The request was refused or the model failed; nothing more follows.
    Error { code: &'static str, message: String },
}

/// Room a job needs in its channel before it may take a step: a delta, the final flush
/// and `done`.
const STEP_ROOM: usize = 3;
/// Channel size per job: how far the engine may run ahead of a slow client.
pub const CHANNEL: usize = 64;
/// A generation whose client has read nothing for this long is cancelled, so clients that
/// stop reading cannot hold the engine's places forever.
pub const CLIENT_STALL: Duration = Duration::from_secs(30);

pub struct Limits {
    /// Generations in progress at once; more wait in a FIFO queue.
    pub parallel: usize,
    /// Jobs waiting beyond that; more are refused as busy.
    pub max_queue: usize,
    /// Prompt tokens per prefill slice.
    pub prefill_chunk: usize,
}

enum Cmd {
    Submit(Job, Instant),
    Close(u64),
    Shutdown(Duration),
}

#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Cmd>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Scheduler {
    /// Start the engine thread; `base` is forked for every conversation and pool slot.
    pub fn start(base: Engine, limits: Limits, metrics: Arc<Metrics>) -> (Scheduler, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let max_queue = limits.max_queue;
        let worker = Worker {
            base,
            limits,
            metrics,
            queued: queued.clone(),
            convs: HashMap::new(),
            pool: Vec::new(),
            waiting: VecDeque::new(),
            active: VecDeque::new(),
            closed: Vec::new(),
            deadline: None,
        };
        let handle = std::thread::Builder::new()
            .name("flint-engine".into())
            .spawn(move || worker.run(rx))
            .expect("cannot start the engine thread");
        (Scheduler { tx, queued, max_queue }, handle)
    }

    /// Queue a job. Refused (with an `Error` event on its channel) when the queue is full
    /// or the server is shutting down.
    pub fn submit(&self, job: Job) {
        // Counted here so a burst of submissions cannot overshoot the limit.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = job.events.try_send(Event::Error { code: "busy", message: "the server's queue is full; retry later".into() });
            return;
        }
        if let Err(mpsc::error::SendError(Cmd::Submit(job, _))) = self.tx.send(Cmd::Submit(job, Instant::now())) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            let _ = job.events.try_send(Event::Error { code: "shutting_down", message: "the server is shutting down".into() });
        }
    }

    /// Free a conversation's KV cache.
    pub fn close(&self, conv: u64) {
        let _ = self.tx.send(Cmd::Close(conv));
    }

    /// Refuse new jobs, let running ones finish for up to `grace`, cancel the rest, then
    /// end the engine thread.
    pub fn shutdown(&self, grace: Duration) {
        let _ = self.tx.send(Cmd::Shutdown(grace));
    }
}

struct Active {
    gen: Generation<Engine>,
    slot: Slot,
    cancel: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
    submitted: Instant,
    prefilling: bool,
    last_token: Option<Instant>,
    /// Since when its channel has been full.
    blocked_since: Option<Instant>,
}

struct Worker {
    base: Engine,
    limits: Limits,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicUsize>,
    /// Idle conversation caches.
    convs: HashMap<u64, Engine>,
    /// Idle pool caches.
    pool: Vec<Engine>,
    waiting: VecDeque<(Job, Instant)>,
    active: VecDeque<Active>,
    /// Conversations closed while a job of theirs was running.
    closed: Vec<u64>,
    deadline: Option<Instant>,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
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
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                for a in &self.active {
                    a.cancel.store(true, Ordering::SeqCst);
                }
            }
            self.admit();
            self.reap();
            if !self.step() {
                // Every job waits on its client: nothing to compute.
                std::thread::sleep(Duration::from_micros(500));
            }
            self.metrics.queue_depth.set(self.waiting.len() as i64);
            self.metrics.active_generations.set(self.active.len() as i64);
        }
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Submit(job, at) => {
                if self.deadline.is_some() {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.try_send(Event::Error { code: "shutting_down", message: "the server is shutting down".into() });
                } else {
                    self.waiting.push_back((job, at));
                }
            }
            Cmd::Close(id) => {
                if self.convs.remove(&id).is_none() && self.active.iter().any(|a| a.slot == Slot::Conv(id)) {
                    self.closed.push(id);
                }
            }
            Cmd::Shutdown(grace) => {
                self.deadline = Some(Instant::now() + grace);
                for (job, _) in self.waiting.drain(..) {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = job.events.try_send(Event::Error { code: "shutting_down", message: "the server is shutting down".into() });
                }
            }
        }
    }

    /// Move waiting jobs into the running set, oldest first, while there is room.
    fn admit(&mut self) {
        let mut i = 0;
        while self.active.len() < self.limits.parallel && i < self.waiting.len() {
            // A conversation runs one job at a time; a later one waits for it.
            let slot = self.waiting[i].0.slot;
            if slot != Slot::Pool && self.active.iter().any(|a| a.slot == slot) {
                i += 1;
                continue;
            }
            let (job, submitted) = self.waiting.remove(i).expect("index in range");
            self.queued.fetch_sub(1, Ordering::SeqCst);
            if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
                continue;
            }
            let mut engine = match self.take(slot, &job.req.prompt) {
                Ok(e) => e,
                Err(e) => {
                    let _ = job.events.try_send(Event::Error { code: "internal", message: format!("{e:#}") });
                    continue;
                }
            };
            if let Err(e) = engine.prepare(&job.req) {
                let code = if e.to_string().contains("context") { "context_full" } else { "invalid_request" };
                let _ = job.events.try_send(Event::Error { code, message: format!("{e:#}") });
                self.put(slot, engine);
                continue;
            }
            let gen = Generation::new(engine, job.req, Some(job.cancel.clone()));
            self.active.push_back(Active {
                gen,
                slot,
                cancel: job.cancel,
                events: job.events,
                submitted,
                prefilling: true,
                last_token: None,
                blocked_since: None,
            });
        }
    }

    /// Finish cancelled jobs and jobs whose client went away at once, without model work,
    /// so a cancel takes effect within the step that is running when it arrives.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            if a.events.is_closed() {
                a.cancel.store(true, Ordering::SeqCst);
            }
            if a.cancel.load(Ordering::SeqCst) {
                // Cancelled: finishing only flushes held-back text, no model work.
                let a = self.active.remove(i).expect("index in range");
                self.finish(a);
            } else {
                i += 1;
            }
        }
    }

    /// One model step for the job at the front, which then goes to the back. Where that
    /// step is a plain decode step, every other job at the same point joins it in one
    /// batched pass. Returns false when no job could step.
    fn step(&mut self) -> bool {
        for _ in 0..self.active.len() {
            let mut a = self.active.pop_front().expect("non-empty");
            if a.events.capacity() < STEP_ROOM {
                let since = *a.blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > CLIENT_STALL {
                    a.cancel.store(true, Ordering::SeqCst);
                }
                self.active.push_back(a);
                continue;
            }
            a.blocked_since = None;
            if !a.prefilling && a.gen.batch_token().is_some() {
                let mut batch = vec![a];
                let mut i = 0;
                while i < self.active.len() {
                    let b = &self.active[i];
                    if !b.prefilling && b.events.capacity() >= STEP_ROOM && b.gen.batch_token().is_some() {
                        batch.push(self.active.remove(i).expect("index in range"));
                    } else {
                        i += 1;
                    }
                }
                if batch.len() > 1 {
                    self.step_batch(batch);
                    return true;
                }
                a = batch.pop().expect("one job");
            }
            if a.prefilling {
                match a.gen.prefill_chunk(self.limits.prefill_chunk) {
                    Ok(more) => a.prefilling = more,
                    Err(e) => {
                        self.fail(a, e);
                        return true;
                    }
                }
                if a.prefilling {
                    self.active.push_back(a);
                    return true;
                }
            }
            let step = a.gen.next();
            self.deliver(a, step);
            return true;
        }
        false
    }

    /// One decode step of several generations in one forward pass.
    fn step_batch(&mut self, mut batch: Vec<Active>) {
        let (tokens, pos): (Vec<u32>, Vec<usize>) = batch.iter().map(|a| a.gen.batch_token().expect("checked")).unzip();
        self.metrics.batch_size.observe(batch.len() as f64);
        // Each row's largest logits where every sampler of the batch needs no more: a GPU
        // backend then reads back a few pairs a row, not the vocabulary.
        let k = batch.iter().map(|a| a.gen.batch_candidates()).collect::<Option<Vec<usize>>>().and_then(|ks| ks.into_iter().max());
        let result = {
            let mut fwds: Vec<&mut dyn Forward> = batch.iter_mut().map(forward_of).collect();
            let (lead, rest) = fwds.split_first_mut().expect("non-empty batch");
            match k {
                Some(k) => lead.forward_multi_top(rest, &tokens, &pos, k).map(BatchRows::Top),
                None => lead.forward_multi(rest, &tokens, &pos).map(BatchRows::Dense),
            }
        };
        match result {
            Ok(BatchRows::Dense(logits)) => {
                let v = logits.len() / batch.len();
                for (mut a, row) in batch.into_iter().zip(logits.chunks_exact(v)) {
                    let step = a.gen.next_with_logits(row.to_vec());
                    self.deliver(a, step);
                }
            }
            Ok(BatchRows::Top(top)) => {
                for (mut a, row) in batch.into_iter().zip(top) {
                    let step = a.gen.next_with_top(row);
                    self.deliver(a, step);
                }
            }
            Err(e) => {
                for mut a in batch {
                    a.gen.fail_batched();
                    self.fail(a, anyhow::anyhow!("{e:#}"));
                }
            }
        }
    }

    /// Send a step's output and put the job back in line, or finish it.
    fn deliver(&mut self, mut a: Active, step: Option<anyhow::Result<Step>>) {
        match step {
            Some(Ok(step)) => {
                let now = Instant::now();
                if step.token.is_some() {
                    match a.last_token {
                        None => self.metrics.ttft.observe((now - a.submitted).as_secs_f64()),
                        Some(t) => self.metrics.inter_token.observe((now - t).as_secs_f64()),
                    }
                    a.last_token = Some(now);
                    self.metrics.completion_tokens.inc();
                }
                let tokens = step.token.into_iter().collect();
                let _ = a.events.try_send(Event::Delta { text: step.text, tokens });
                if a.gen.is_finished() {
                    self.finish(a);
                } else {
                    self.active.push_back(a);
                }
            }
            Some(Err(e)) => self.fail(a, e),
            None => self.finish(a),
        }
    }

    fn fail(&mut self, a: Active, e: anyhow::Error) {
        let _ = a.events.try_send(Event::Error { code: "internal", message: format!("{e:#}") });
        self.put(a.slot, a.gen.into_engine());
    }

    fn finish(&mut self, mut a: Active) {
        while let Some(Ok(s)) = a.gen.next() {
            if !s.text.is_empty() {
                let _ = a.events.try_send(Event::Delta { text: s.text, tokens: s.token.into_iter().collect() });
            }
        }
        let o = a.gen.outcome();
        let t = &o.timings;
        let m = &self.metrics;
        m.prompt_tokens.inc_by(o.prompt_tokens.len() as u64);
        m.cached_tokens.inc_by(t.cached_tokens as u64);
        m.drafted_tokens.inc_by(t.drafted as u64);
        m.accepted_tokens.inc_by(t.accepted as u64);
        m.requests.get_or_create(&super::metrics::Finish { reason: o.finish_reason.as_str() }).inc();
        if t.decode_tok_s > 0.0 {
            m.decode_tok_s.observe(t.decode_tok_s);
        }
        let _ = a.events.try_send(Event::Done(Box::new(o)));
        self.put(a.slot, a.gen.into_engine());
    }

    fn take(&mut self, slot: Slot, prompt: &[u32]) -> anyhow::Result<Engine> {
        let found = match slot {
            Slot::Conv(id) => self.convs.remove(&id),
            Slot::Pool => {
                let common = |e: &Engine| e.cached().iter().zip(prompt).take_while(|(a, b)| a == b).count();
                let best = (0..self.pool.len()).max_by_key(|&i| common(&self.pool[i]));
                best.map(|i| self.pool.swap_remove(i))
            }
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
                    self.closed.swap_remove(i);
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

fn forward_of(a: &mut Active) -> &mut dyn Forward {
    a.gen.engine_mut().fwd.as_mut()
}

/// What a batched decode step hands back: every row's logits, or each row's largest.
enum BatchRows {
    Dense(Vec<f32>),
    Top(Vec<Vec<(u32, f32)>>),
}
