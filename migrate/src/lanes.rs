//! The control stream's two lanes: pre-copies never hold up a switchover.
//!
//! One gRPC stream carries everything between an agent and the controller:
//! revisions, acks, reports, migration commands and events — and pre-copies,
//! each a port's whole state (up to the snapshot's bound, in chunks of
//! [`CHUNK`](crate::snapshot::CHUNK)). Sent in the order they were made, a
//! burst of pre-copies (a host evacuated: eight ports at once, thirty-two in
//! a chassis) would queue every other migration's switchover — a few hundred
//! bytes that a VM's blackout waits for — behind megabytes of state.
//!
//! So a stream has two lanes. **Urgent** (everything but pre-copies) is
//! always taken first; **bulk** (a pre-copy's chunks) only when urgent is
//! empty. Order within one migration is kept: an urgent message of
//! migration M takes M's bulk still queued ahead of it along (a handover is
//! a delta of M's pre-copy, which must arrive first), and only M's.
//!
//! What the transport has taken is beyond reach: tonic takes one message at
//! a time from the stream while it has room, so an urgent message waits for
//! at most one chunk in flight.
//!
//! The stream ends once every [`Lanes`] is dropped and both lanes are
//! empty; a dropped [`LaneStream`] (the peer went away) makes every send
//! fail with [`Closed`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;

/// The sending side (cloned by everyone who sends on the stream).
#[derive(Debug)]
pub struct Lanes<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side: what the transport sends, urgent first.
#[derive(Debug)]
pub struct LaneStream<T> {
    shared: Arc<Shared<T>>,
}

/// The stream's reader is gone: nothing sent arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the stream is closed")]
pub struct Closed;

/// A new stream's two ends.
pub fn lanes<T>() -> (Lanes<T>, LaneStream<T>) {
    let shared = Arc::new(Shared {
        q: Mutex::new(Queues {
            urgent: VecDeque::new(),
            bulk: VecDeque::new(),
            reader: None,
            senders: 1,
            closed: false,
        }),
        room: Notify::new(),
    });
    (
        Lanes {
            shared: shared.clone(),
        },
        LaneStream { shared },
    )
}

impl<T> Lanes<T> {
    /// Queue `m` ahead of all bulk — after the bulk of migration `key`, if
    /// it is a migration's.
    ///
    /// # Errors
    /// The reader is gone.
    pub fn urgent(&self, key: Option<u64>, m: T) -> Result<(), Closed> {
        let mut q = self.shared.lock();
        if q.closed {
            return Err(Closed);
        }
        if let Some(k) = key {
            if q.bulk.iter().any(|(b, _)| *b == k) {
                let (mine, others) = std::mem::take(&mut q.bulk)
                    .into_iter()
                    .partition::<VecDeque<_>, _>(|(b, _)| *b == k);
                q.bulk = others;
                q.urgent.extend(mine.into_iter().map(|(_, m)| m));
            }
        }
        q.urgent.push_back(m);
        q.wake();
        Ok(())
    }

    /// Queue `m`, part of migration `key`'s pre-copy, behind everything
    /// urgent.
    ///
    /// # Errors
    /// The reader is gone.
    pub fn bulk(&self, key: u64, m: T) -> Result<(), Closed> {
        let mut q = self.shared.lock();
        if q.closed {
            return Err(Closed);
        }
        q.bulk.push_back((key, m));
        q.wake();
        Ok(())
    }

    /// Wait until fewer than `depth` urgent messages wait (or the reader is
    /// gone): back-pressure for a sender that can wait, such as a feed of
    /// revisions to a slow agent.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is taken.
    pub async fn room(&self, depth: usize) {
        loop {
            let notified = self.shared.room.notified();
            {
                let q = self.shared.lock();
                if q.closed || q.urgent.len() < depth {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Messages waiting, urgent and bulk.
    pub fn queued(&self) -> (usize, usize) {
        let q = self.shared.lock();
        (q.urgent.len(), q.bulk.len())
    }
}

impl<T> Clone for Lanes<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Lanes {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Lanes<T> {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.senders -= 1;
        if q.senders == 0 {
            q.wake();
        }
    }
}

impl<T> tokio_stream::Stream for LaneStream<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut q = self.shared.lock();
        if let Some(m) = q.urgent.pop_front() {
            drop(q);
            self.shared.room.notify_waiters();
            return Poll::Ready(Some(m));
        }
        if let Some((_, m)) = q.bulk.pop_front() {
            return Poll::Ready(Some(m));
        }
        if q.senders == 0 {
            return Poll::Ready(None);
        }
        q.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for LaneStream<T> {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.closed = true;
        q.urgent.clear();
        q.bulk.clear();
        drop(q);
        self.shared.room.notify_waiters();
    }
}

#[derive(Debug)]
struct Shared<T> {
    q: Mutex<Queues<T>>,
    room: Notify,
}

#[derive(Debug)]
struct Queues<T> {
    urgent: VecDeque<T>,
    bulk: VecDeque<(u64, T)>,
    reader: Option<Waker>,
    senders: usize,
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queues<T>> {
        // A panic while holding it leaves plain queues, still consistent.
        self.q
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T> Queues<T> {
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::Stream;

    fn next<T>(s: &mut LaneStream<T>) -> Poll<Option<T>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(s).poll_next(&mut cx)
    }

    fn drain(s: &mut LaneStream<&'static str>) -> Vec<&'static str> {
        let mut v = Vec::new();
        while let Poll::Ready(Some(m)) = next(s) {
            v.push(m);
        }
        v
    }

    #[test]
    fn a_switchover_overtakes_other_migrations_pre_copies_but_not_its_own() {
        let (tx, mut rx) = lanes();
        tx.bulk(1, "m1 pre-copy 1/2").unwrap();
        tx.bulk(2, "m2 pre-copy 1/1").unwrap();
        tx.bulk(1, "m1 pre-copy 2/2").unwrap();
        tx.urgent(None, "ack").unwrap();
        tx.bulk(3, "m3 pre-copy 1/1").unwrap();
        tx.urgent(Some(3), "m3 handover").unwrap();
        tx.urgent(Some(4), "m4 abort").unwrap();
        assert_eq!(
            drain(&mut rx),
            [
                "ack",
                "m3 pre-copy 1/1",
                "m3 handover",
                "m4 abort",
                "m1 pre-copy 1/2",
                "m2 pre-copy 1/1",
                "m1 pre-copy 2/2",
            ]
        );
        assert_eq!(tx.queued(), (0, 0));
    }

    #[test]
    fn the_stream_ends_when_every_sender_is_gone_and_it_is_drained() {
        let (tx, mut rx) = lanes();
        let tx2 = tx.clone();
        tx.bulk(1, "a").unwrap();
        drop(tx);
        assert_eq!(next(&mut rx), Poll::Ready(Some("a")));
        assert_eq!(next(&mut rx), Poll::Pending, "one sender is left");
        tx2.urgent(None, "b").unwrap();
        drop(tx2);
        assert_eq!(next(&mut rx), Poll::Ready(Some("b")));
        assert_eq!(next(&mut rx), Poll::Ready(None));
    }

    #[test]
    fn sends_fail_once_the_reader_is_gone() {
        let (tx, rx) = lanes::<u8>();
        tx.bulk(1, 1).unwrap();
        drop(rx);
        assert_eq!(tx.urgent(None, 2), Err(Closed));
        assert_eq!(tx.bulk(1, 3), Err(Closed));
        assert_eq!(tx.queued(), (0, 0));
    }

    #[tokio::test]
    async fn room_waits_until_the_reader_takes_urgent_messages() {
        let (tx, mut rx) = lanes();
        for i in 0..3 {
            tx.urgent(None, i).unwrap();
        }
        tx.bulk(9, 9).unwrap();
        let waiting = tx.clone();
        let wait = tokio::spawn(async move { waiting.room(2).await });
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "three wait, the depth is two");
        assert_eq!(next(&mut rx), Poll::Ready(Some(0)));
        assert_eq!(next(&mut rx), Poll::Ready(Some(1)));
        wait.await.unwrap();
        // Bulk does not count: one urgent left.
        tx.room(2).await;
    }
}
