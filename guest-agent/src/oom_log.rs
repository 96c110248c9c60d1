//! The OOM kills the agent saw, numbered from 1, for the host's long poll
//! (GetOomEvent: the first kill after N). A call that timed out, or whose connection
//! broke, loses nothing: the host asks again after the last kill it received.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::lock;

/// How many kills are kept; a host further behind misses the oldest.
const KEPT: usize = 1024;

pub struct OomLog {
    /// The latest kills, oldest first, with their numbers.
    kills: Mutex<VecDeque<(u64, String)>>,
    /// The number of the latest kill (0 before the first).
    latest: watch::Sender<u64>,
}

impl Default for OomLog {
    fn default() -> Self {
        OomLog {
            kills: Mutex::new(VecDeque::new()),
            latest: watch::Sender::new(0),
        }
    }
}

impl OomLog {
    /// Records an OOM kill in container `container_id`.
    pub fn push(&self, container_id: String) {
        let mut kills = lock(&self.kills);
        let seq = *self.latest.borrow() + 1;
        kills.push_back((seq, container_id));
        if kills.len() > KEPT {
            kills.pop_front();
        }
        self.latest.send_replace(seq);
    }

    /// The first kill numbered after `after` and its number, once there is one.
    pub async fn next_after(&self, after: u64) -> (u64, String) {
        let mut latest = self.latest.subscribe();
        // The sender is ours, so it outlives the wait.
        let _ = latest.wait_for(|&seq| seq > after).await;
        let kills = lock(&self.kills);
        // The latest kill is always kept, and it is after `after`.
        let (seq, id) = kills
            .iter()
            .find(|(seq, _)| *seq > after)
            .or(kills.back())
            .cloned()
            .unwrap_or_default();
        if seq > after + 1 {
            log::warn!(
                "OOM kills {} to {} were dropped before the host read them",
                after + 1,
                seq - 1
            );
        }
        (seq, id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn kills_are_read_in_order_again_and_after_a_wait() {
        let log = std::sync::Arc::new(OomLog::default());
        log.push("a".into());
        log.push("b".into());
        assert_eq!(log.next_after(0).await, (1, "a".into()));
        assert_eq!(log.next_after(0).await, (1, "a".into()), "asked again");
        assert_eq!(log.next_after(1).await, (2, "b".into()));

        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.next_after(2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no kill after 2 yet");
        log.push("c".into());
        assert_eq!(waiting.await.unwrap(), (3, "c".into()));
    }

    #[tokio::test]
    async fn a_host_far_behind_gets_the_oldest_kept() {
        let log = OomLog::default();
        for i in 0..KEPT + 10 {
            log.push(format!("c{i}"));
        }
        assert_eq!(log.next_after(0).await, (11, "c10".into()));
        let last = (KEPT + 10) as u64;
        assert_eq!(
            log.next_after(last - 1).await,
            (last, format!("c{}", last - 1))
        );
    }
}
