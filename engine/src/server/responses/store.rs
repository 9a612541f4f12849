//! Finished responses kept for `previous_response_id`, `GET` and `DELETE`: at most
//! `capacity` of them and none older than `max_age`, the oldest evicted first. Each holds
//! its Response object and the conversation's tokens (prompt and output), so a
//! continuation prefills only its new input where an engine cache still holds the rest.

use crate::tokenizer::Message;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Stored {
    pub response: Value,
    /// The tokens of the prompt and the output, as the engine's cache holds them.
    pub context: Vec<u32>,
    /// The conversation, system turn and output included.
    pub messages: Vec<Message>,
    /// The system turn's text (see [`super::Prepared::system`]).
    pub system: String,
    /// The request, whose settings a steered successor reuses.
    pub create: super::Create,
    at: Instant,
}

impl Stored {
    pub fn new(response: Value, context: Vec<u32>, messages: Vec<Message>, system: String, create: super::Create) -> Stored {
        Stored { response, context, messages, system, create, at: Instant::now() }
    }

    /// Whether the context ends in an answer (not so for `generate: false`, which only
    /// prefilled its input), so that a continuation appends to its tokens.
    pub fn answered(&self) -> bool {
        self.create.generate != Some(false)
    }
}

pub struct Store {
    capacity: usize,
    max_age: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Arc<Stored>>,
    /// Ids, oldest first.
    order: VecDeque<String>,
}

impl Store {
    pub fn new(capacity: usize, max_age: Duration) -> Store {
        Store { capacity, max_age, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves the maps consistent (each
        // operation is a few map edits): keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, id: String, s: Arc<Stored>) {
        if self.capacity == 0 {
            return;
        }
        let mut g = self.lock();
        if g.by_id.insert(id.clone(), s).is_none() {
            g.order.push_back(id);
        }
        while g.order.len() > self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.by_id.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        let mut g = self.lock();
        // Expired entries go, oldest first, whenever the store is read.
        while let Some(old) = g.order.front() {
            if g.by_id.get(old).is_some_and(|s| s.at.elapsed() <= self.max_age) {
                break;
            }
            let old = g.order.pop_front().expect("front exists");
            g.by_id.remove(&old);
        }
        g.by_id.get(id).cloned()
    }

    pub fn delete(&self, id: &str) -> bool {
        let mut g = self.lock();
        if g.by_id.remove(id).is_none() {
            return false;
        }
        g.order.retain(|o| o != id);
        true
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }
}
