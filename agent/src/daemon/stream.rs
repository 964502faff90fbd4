//! The one stream of finding changes: every evaluation becomes a [`FindingsDelta`] that the
//! loop hands to each consumer (status, metrics, Node condition/Events; alerts and repair
//! next) without ever waiting for one.
//!
//! Each consumer runs on its own thread with its own small runtime, behind a bounded queue:
//! a consumer that is slow, stuck on the network or even blocking its thread delays only
//! itself. When its queue is full the oldest delta is dropped and the consumer is told how
//! many it missed; every delta carries the whole open set, so it can always catch up.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::{
    checks::PeerVerdicts,
    model::Finding,
    serve::status::{DatastoreStatus, DeviceStatus},
};

/// What one evaluation changed, and the state it left.
#[derive(Debug, Clone)]
pub struct FindingsDelta {
    /// Findings that were not open before: positions in `open` ([`FindingsDelta::opened`]).
    pub opened: Vec<usize>,
    /// Findings still open whose content changed (evidence, message, remedies): positions
    /// in `open`.
    pub changed: Vec<usize>,
    /// Findings no longer open, as last seen.
    pub cleared: Vec<Arc<Finding>>,
    /// Every open finding now (each with its `since`).
    pub open: Arc<Vec<Arc<Finding>>>,
    /// Per remote node, from the same findings.
    pub peers: Arc<PeerVerdicts>,
    /// The daemon has a complete picture (first full sync done, datastore loaded or given up).
    pub in_sync: bool,
    pub at: SystemTime,
    pub routes_checked: usize,
    pub duration: Duration,
    /// What the evaluation looked at, for views: the watched devices and the datastore.
    pub devices: Vec<DeviceStatus>,
    pub datastore: Option<DatastoreStatus>,
    /// The node this agent judges from: the configured name, or the one found by address.
    pub local_node: Option<String>,
}

impl FindingsDelta {
    /// Nothing opened, changed or cleared.
    pub fn is_quiet(&self) -> bool {
        self.opened.is_empty() && self.changed.is_empty() && self.cleared.is_empty()
    }

    /// The findings that were not open before.
    pub fn opened(&self) -> impl Iterator<Item = &Finding> {
        self.opened
            .iter()
            .filter_map(|&i| self.open.get(i))
            .map(|f| &**f)
    }
}

/// A receiver of the stream. `consume` and `tick` run on the consumer's own thread.
pub trait Consumer: Send + 'static {
    /// For logs and thread names.
    const NAME: &'static str;
    /// How often [`Consumer::tick`] runs; `None`: never.
    const TICK: Option<Duration> = None;

    /// One delta; `missed` deltas before it were dropped because this consumer fell behind.
    fn consume(
        &mut self,
        delta: Arc<FindingsDelta>,
        missed: u64,
    ) -> impl Future<Output = ()> + Send;

    /// Periodic work between deltas (re-sending a condition, retrying a delivery).
    fn tick(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Queue depth per consumer: a short burst of evaluations. Each delta holds the whole open
/// set (at 5,000 peers, thousands of findings), and every one carries all a consumer needs,
/// so a deep queue would only hold memory.
pub const QUEUE: usize = 8;

#[derive(Default)]
struct Slot {
    items: VecDeque<Arc<FindingsDelta>>,
    /// Dropped since the consumer last took one.
    missed: u64,
    closed: bool,
}

struct Queue {
    slot: Mutex<Slot>,
    notify: Notify,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Never waits: a full queue drops its oldest delta.
    fn push(&self, delta: Arc<FindingsDelta>) -> bool {
        let mut slot = self.lock();
        let dropped = slot.items.len() >= self.capacity;
        if dropped {
            slot.items.pop_front();
            slot.missed += 1;
        }
        slot.items.push_back(delta);
        drop(slot);
        self.notify.notify_one();
        dropped
    }

    fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// The next delta and how many were dropped before it; `None` once closed and drained.
    async fn pop(&self) -> Option<(Arc<FindingsDelta>, u64)> {
        loop {
            {
                let mut slot = self.lock();
                if let Some(d) = slot.items.pop_front() {
                    return Some((d, std::mem::take(&mut slot.missed)));
                }
                if slot.closed {
                    return None;
                }
            }
            // A notification sent before this wait is kept as a permit: nothing is lost.
            self.notify.notified().await;
        }
    }
}

struct Sink {
    name: &'static str,
    queue: Arc<Queue>,
}

/// The loop's side of the stream.
#[derive(Default)]
pub struct Fanout {
    sinks: Vec<Sink>,
}

impl Fanout {
    /// Starts `consumer` on its own thread.
    pub fn spawn<C: Consumer>(&mut self, consumer: C) {
        self.spawn_with_capacity(consumer, QUEUE);
    }

    pub fn spawn_with_capacity<C: Consumer>(&mut self, mut consumer: C, capacity: usize) {
        let queue = Arc::new(Queue {
            slot: Mutex::default(),
            notify: Notify::new(),
            capacity: capacity.max(1),
        });
        let theirs = queue.clone();
        let started = std::thread::Builder::new()
            .name(format!("consumer-{}", C::NAME))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        warn!(consumer = C::NAME, error = %e, "cannot start the consumer's runtime");
                        return;
                    }
                };
                rt.block_on(run(&mut consumer, &theirs));
                debug!(consumer = C::NAME, "consumer stopped");
            });
        if let Err(e) = started {
            warn!(consumer = C::NAME, error = %e, "cannot start a consumer thread");
            return;
        }
        self.sinks.push(Sink {
            name: C::NAME,
            queue,
        });
    }

    /// Hands `delta` to every consumer; returns at once whatever they are doing.
    pub fn publish(&self, delta: FindingsDelta) {
        let delta = Arc::new(delta);
        for sink in &self.sinks {
            if sink.queue.push(delta.clone()) {
                debug!(
                    consumer = sink.name,
                    "consumer behind; its oldest delta was dropped"
                );
            }
        }
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        for sink in &self.sinks {
            sink.queue.close();
        }
    }
}

async fn run<C: Consumer>(consumer: &mut C, queue: &Queue) {
    let mut tick = C::TICK.map(|every| {
        let mut i = tokio::time::interval(every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let next = tokio::select! {
            next = queue.pop() => next,
            _ = async { tick.as_mut().unwrap().tick().await }, if tick.is_some() => {
                consumer.tick().await;
                continue;
            }
        };
        match next {
            Some((delta, missed)) => consumer.consume(delta, missed).await,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Records what it got; `gate` keeps it stuck until opened.
    struct Recorder {
        seen: Arc<Mutex<Vec<(usize, u64)>>>,
        entered: Arc<std::sync::atomic::AtomicBool>,
        gate: Arc<std::sync::Barrier>,
        blocked_once: bool,
    }

    impl Consumer for Recorder {
        const NAME: &'static str = "recorder";
        async fn consume(&mut self, delta: Arc<FindingsDelta>, missed: u64) {
            if !self.blocked_once {
                // Blocks its whole thread, not just this task.
                self.blocked_once = true;
                self.entered.store(true, Ordering::SeqCst);
                self.gate.wait();
            }
            self.seen
                .lock()
                .unwrap()
                .push((delta.routes_checked, missed));
        }
    }

    struct Counter(Arc<AtomicU64>);

    impl Consumer for Counter {
        const NAME: &'static str = "counter";
        async fn consume(&mut self, _: Arc<FindingsDelta>, _: u64) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn delta(n: usize) -> FindingsDelta {
        FindingsDelta {
            opened: vec![],
            changed: vec![],
            cleared: vec![],
            open: Arc::default(),
            peers: Arc::default(),
            in_sync: true,
            at: SystemTime::UNIX_EPOCH,
            routes_checked: n,
            duration: Duration::ZERO,
            devices: vec![],
            datastore: None,
            local_node: None,
        }
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !cond() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_blocked_consumer_delays_neither_the_loop_nor_the_others_and_catches_up() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(std::sync::Barrier::new(2));
        let count = Arc::new(AtomicU64::new(0));
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut fanout = Fanout::default();
        fanout.spawn_with_capacity(
            Recorder {
                seen: seen.clone(),
                entered: entered.clone(),
                gate: gate.clone(),
                blocked_once: false,
            },
            4,
        );
        // Room for the whole burst: it must see every delta while the other one is stuck.
        fanout.spawn_with_capacity(Counter(count.clone()), 64);

        // The recorder takes delta 0 and blocks its thread; the loop goes on publishing.
        fanout.publish(delta(0));
        wait_until("recorder took the first delta", || {
            entered.load(Ordering::SeqCst)
        });
        let started = std::time::Instant::now();
        for n in 1..=50 {
            fanout.publish(delta(n));
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "publishing waited for a blocked consumer: {:?}",
            started.elapsed()
        );
        wait_until("the other consumer got everything", || {
            count.load(Ordering::SeqCst) == 51
        });
        assert!(seen.lock().unwrap().is_empty(), "recorder is still blocked");

        // Unblocked: it gets delta 0, then the newest four, told how many it missed.
        gate.wait();
        wait_until("recorder caught up", || seen.lock().unwrap().len() == 5);
        let got = seen.lock().unwrap().clone();
        assert_eq!(got[0], (0, 0));
        assert_eq!(got[1], (47, 46), "{got:?}");
        assert_eq!(
            got[1..].iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![47, 48, 49, 50]
        );
        assert!(got[2..].iter().all(|(_, missed)| *missed == 0));
    }

    struct Ticker(Arc<AtomicU64>);

    impl Consumer for Ticker {
        const NAME: &'static str = "ticker";
        const TICK: Option<Duration> = Some(Duration::from_millis(10));
        async fn consume(&mut self, _: Arc<FindingsDelta>, _: u64) {}
        async fn tick(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn ticks_run_between_deltas() {
        let ticks = Arc::new(AtomicU64::new(0));
        let mut fanout = Fanout::default();
        fanout.spawn(Ticker(ticks.clone()));
        wait_until("ticked", || ticks.load(Ordering::SeqCst) >= 3);
    }
}
