//! The engine thread and the lifecycle of every request it runs.
//!
//! One thread owns the model and every KV cache ([`worker`]). A connection submits a job and
//! gets a [`Ticket`]: the request's id, a [`Control`] to cancel or steer it, and its
//! [`Events`]. The engine keeps one table of requests keyed by id, each in one [`Phase`]
//! (queued, prefill, decode); cancel and steer are transitions it takes in every phase, and
//! every exit (finished, stopped, failed, refused) goes through one `terminate` that emits
//! exactly one final event: `Done` or `Error`. A drop guard on the reply is the backstop, so
//! even an engine thread that panics ends every request with an `Error`.
//!
//! The final event travels apart from the token stream (a oneshot behind the bounded delta
//! channel), so it always arrives, after every delta, however full the client left its
//! channel.

mod worker;

use crate::generate::{Engine, Outcome, Request};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use super::guard::Hold;

/// Which KV cache a job runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// A conversation's own cache, kept across its turns until [`Scheduler::close`].
    Conv(u64),
    /// Any cache of the shared pool (stateless HTTP requests); the one holding the longest
    /// prefix of the prompt is chosen, so repeated prompts still reuse their KV.
    Pool,
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

/// Why a request stopped before its natural end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Its client asked ([`Control::cancel`]).
    Cancelled,
    /// Its client redirected it ([`Control::steer`]): a successor continues from its text.
    Steered,
    /// Its client went away (the [`Events`] were dropped).
    ClientGone,
    /// Its client read nothing for [`CLIENT_STALL`].
    Stalled,
    /// The server's shutdown grace ran out.
    Shutdown,
}

impl Why {
    /// The label of `/metrics`' `flint_requests_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Why::Cancelled => "cancelled",
            Why::Steered => "steered",
            Why::ClientGone => "client_gone",
            Why::Stalled => "stalled",
            Why::Shutdown => "shutdown",
        }
    }
}

const RUN: u8 = 0;
const CANCEL: u8 = 1;
const STEER: u8 = 2;

/// A request's stop switch, shared by its connection and the engine thread. Setting it is a
/// request; the engine takes the transition before its next step, in whatever phase.
#[derive(Clone, Debug, Default)]
pub struct Control(Arc<AtomicU8>);

impl Control {
    /// Stop, with no successor (it overrides a steer not yet taken).
    pub fn cancel(&self) {
        self.0.store(CANCEL, Ordering::SeqCst);
    }
    /// Stop so that a successor takes over (the partial answer stays in the context); a
    /// cancel already requested stands.
    pub fn steer(&self) {
        let _ = self.0.compare_exchange(RUN, STEER, Ordering::SeqCst, Ordering::SeqCst);
    }
    pub fn requested(&self) -> Option<Why> {
        match self.0.load(Ordering::SeqCst) {
            RUN => None,
            STEER => Some(Why::Steered),
            _ => Some(Why::Cancelled),
        }
    }
}

/// A refusal at submission: the queue is full or the server is shutting down.
#[derive(Debug)]
pub struct Refused {
    pub code: &'static str,
    pub message: String,
}

/// A submitted request: its id, its stop switch, and its events.
pub struct Ticket {
    pub id: u64,
    pub control: Control,
    pub events: Events,
}

/// The final event, kept apart from the bounded delta channel.
enum Final {
    /// With the text held back until the end (a possible stop string's start, a partial
    /// UTF-8 character), handed out as one last delta.
    Done(Box<Outcome>, String),
    Error { code: &'static str, message: String },
}

/// The engine's side of a request's events. Dropped without [`Reply::finish`] (an engine
/// thread that unwinds, a path that forgot), it still sends a final `Error`.
struct Reply {
    data: mpsc::Sender<Event>,
    fin: Option<oneshot::Sender<Final>>,
    /// The client's place in its key's generations at once, given back before the final
    /// event goes, so a client that answers it at once finds its place free.
    hold: Hold,
}

impl Reply {
    fn finish(mut self, f: Final) {
        self.hold = None;
        if let Some(tx) = self.fin.take() {
            let _ = tx.send(f);
        }
        // `data` drops here, after the final event is in place: the receiver drains the
        // deltas, sees the channel close, then reads the final event.
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.hold = None;
        if let Some(tx) = self.fin.take() {
            let _ = tx.send(Final::Error { code: "internal", message: "the engine stopped without ending this generation".into() });
        }
    }
}

/// A request's events, in order: deltas, then exactly one `Done` or `Error`, then `None`.
/// Dropping it tells the engine that the client went away.
pub struct Events {
    data: mpsc::Receiver<Event>,
    fin: Option<oneshot::Receiver<Final>>,
    pending: Option<Event>,
}

impl Events {
    fn pair(hold: Hold) -> (Reply, Events) {
        let (data_tx, data) = mpsc::channel(CHANNEL);
        let (fin_tx, fin) = oneshot::channel();
        (Reply { data: data_tx, fin: Some(fin_tx), hold }, Events { data, fin: Some(fin), pending: None })
    }

    /// An `Events` that holds only a final error (a request refused before the engine).
    pub fn refused(r: Refused) -> Events {
        let (reply, events) = Events::pair(None);
        reply.finish(Final::Error { code: r.code, message: r.message });
        events
    }

    fn finale(&mut self, f: Result<Final, oneshot::error::RecvError>) -> Option<Event> {
        self.fin = None;
        match f {
            Ok(Final::Done(o, tail)) if tail.is_empty() => Some(Event::Done(o)),
            Ok(Final::Done(o, tail)) => {
                self.pending = Some(Event::Done(o));
                Some(Event::Delta { text: tail, tokens: Vec::new() })
            }
            Ok(Final::Error { code, message }) => Some(Event::Error { code, message }),
            Err(_) => Some(Event::Error { code: "internal", message: "the engine dropped the generation".into() }),
        }
    }

    pub async fn recv(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        if let Some(ev) = self.data.recv().await {
            return Some(ev);
        }
        let fin = self.fin.as_mut()?.await;
        self.finale(fin)
    }

    /// As [`Events::recv`], for threads outside the async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        if let Some(ev) = self.data.blocking_recv() {
            return Some(ev);
        }
        let fin = self.fin.take()?.blocking_recv();
        self.finale(fin)
    }

    /// The next event, with the deltas already waiting merged into one (a slow client gets
    /// fewer, larger messages).
    pub async fn recv_merged(&mut self) -> Option<Event> {
        let first = self.recv().await?;
        let Event::Delta { mut text, mut tokens } = first else { return Some(first) };
        while self.pending.is_none() {
            match self.data.try_recv() {
                Ok(Event::Delta { text: t, tokens: k }) => {
                    text.push_str(&t);
                    tokens.extend(k);
                }
                Ok(other) => self.pending = Some(other),
                Err(_) => break,
            }
        }
        Some(Event::Delta { text, tokens })
    }

    /// Deltas waiting in the channel.
    pub fn buffered(&self) -> usize {
        self.data.len()
    }
}

enum Cmd {
    Submit(worker::Job),
    Close(u64),
    Shutdown(Duration),
}

#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Cmd>,
    queued: Arc<AtomicUsize>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    max_queue: usize,
}

impl Scheduler {
    /// Start the engine thread; `base` is forked for every conversation and pool slot.
    pub fn start(base: Engine, limits: Limits, metrics: Arc<super::metrics::Metrics>) -> (Scheduler, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let max_queue = limits.max_queue;
        let worker = worker::Worker::new(base, limits, metrics, queued.clone());
        let handle = std::thread::Builder::new()
            .name("flint-engine".into())
            .spawn(move || worker.run(rx))
            .expect("cannot start the engine thread");
        (Scheduler { tx, queued, next_id: Default::default(), max_queue }, handle)
    }

    /// Queue a request. Refused at once when the queue is full or the server shuts down;
    /// later refusals (the context, the shutdown) arrive as the ticket's final `Error`.
    pub fn submit(&self, slot: Slot, req: Request) -> Result<Ticket, Refused> {
        self.submit_held(slot, req, None)
    }

    /// As [`Scheduler::submit`], holding `hold` (a place in the client's key's limit) until
    /// the request ends, however it ends.
    pub fn submit_held(&self, slot: Slot, req: Request, hold: Hold) -> Result<Ticket, Refused> {
        // Counted here so a burst of submissions cannot overshoot the limit; the engine
        // uncounts a job when it leaves the queue, by admission or by any exit.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused { code: "busy", message: "the server's queue is full; retry later".into() });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let control = Control::default();
        let (reply, events) = Events::pair(hold);
        let job = worker::Job { id, slot, req, control: control.clone(), reply, submitted: Instant::now() };
        if self.tx.send(Cmd::Submit(job)).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused { code: "shutting_down", message: "the server is shutting down".into() });
        }
        Ok(Ticket { id, control, events })
    }

    /// As [`Scheduler::submit`], with a refusal delivered as the events' final `Error`.
    pub fn submit_or_refuse(&self, slot: Slot, req: Request, hold: Hold) -> Ticket {
        self.submit_held(slot, req, hold).unwrap_or_else(|r| Ticket { id: 0, control: Control::default(), events: Events::refused(r) })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Box<Outcome> {
        Box::new(Outcome {
            prompt_tokens: vec![1],
            tokens: vec![2],
            text: "ab".into(),
            finish_reason: crate::generate::FinishReason::Stop,
            timings: Default::default(),
        })
    }

    #[test]
    fn the_final_event_arrives_after_a_full_channel_and_the_tail_before_it() {
        let (reply, mut events) = Events::pair(None);
        for i in 0..CHANNEL {
            reply.data.try_send(Event::Delta { text: i.to_string(), tokens: vec![i as u32] }).unwrap();
        }
        assert!(reply.data.try_send(Event::Delta { text: "x".into(), tokens: vec![] }).is_err(), "the channel is full");
        reply.finish(Final::Done(outcome(), "tail".into()));
        for i in 0..CHANNEL {
            assert!(matches!(events.blocking_recv(), Some(Event::Delta { text, .. }) if text == i.to_string()));
        }
        assert!(matches!(events.blocking_recv(), Some(Event::Delta { text, tokens }) if text == "tail" && tokens.is_empty()));
        assert!(matches!(events.blocking_recv(), Some(Event::Done(_))));
        assert!(events.blocking_recv().is_none(), "exactly one final event");
    }

    #[test]
    fn a_reply_dropped_without_its_final_event_still_ends_the_request() {
        let (reply, mut events) = Events::pair(None);
        reply.data.try_send(Event::Delta { text: "a".into(), tokens: vec![1] }).unwrap();
        drop(reply);
        assert!(matches!(events.blocking_recv(), Some(Event::Delta { .. })));
        assert!(matches!(events.blocking_recv(), Some(Event::Error { code: "internal", .. })));
        assert!(events.blocking_recv().is_none());
    }

    #[test]
    fn merged_deltas_stop_at_the_final_event() {
        let (reply, mut events) = Events::pair(None);
        for t in ["a", "b", "c"] {
            reply.data.try_send(Event::Delta { text: t.into(), tokens: vec![0] }).unwrap();
        }
        reply.finish(Final::Done(outcome(), String::new()));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            assert!(matches!(events.recv_merged().await, Some(Event::Delta { text, tokens }) if text == "abc" && tokens.len() == 3));
            assert!(matches!(events.recv_merged().await, Some(Event::Done(_))));
            assert!(events.recv_merged().await.is_none());
        });
    }

    #[test]
    fn a_control_takes_its_first_request() {
        let c = Control::default();
        assert_eq!(c.requested(), None);
        c.steer();
        assert_eq!(c.requested(), Some(Why::Steered));
        c.cancel();
        assert_eq!(c.requested(), Some(Why::Cancelled), "a cancel overrides a steer");
        let c = Control::default();
        c.cancel();
        c.steer();
        assert_eq!(c.requested(), Some(Why::Cancelled));
    }
}
