//! The public scoreboard, computed once a second per (event, bracket) whoever asks: the
//! projector's GET and every SSE stream share one computation and one serialised copy, so
//! a crowd of phones costs a cache lookup each, not a leaderboard query each. SSE streams
//! are capped in all and per client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::scores::PublicBoard;
use crate::error::Error;

/// How long a computed board is served before it is computed again.
pub const BOARD_FRESH: Duration = Duration::from_secs(1);
/// Scoreboard streams open at once, in all.
pub const MAX_STREAMS: usize = 3_000;
/// Scoreboard streams one client (an address, an IPv6 /64) holds at once.
pub const MAX_STREAMS_PER_CLIENT: usize = 16;

/// One computed board: its JSON and a version that changes only when the board does.
#[derive(Debug)]
pub struct Computed {
    pub board: PublicBoard,
    pub json: Arc<str>,
    pub version: u64,
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    computed: Arc<Computed>,
}

type Key = (i64, Option<String>);

#[derive(Debug, Default)]
pub struct Boards {
    cache: Mutex<HashMap<Key, Entry>>,
    /// one computation per key at a time; the others wait for it and take its result
    computing: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    streams: Mutex<HashMap<String, usize>>,
    total: std::sync::atomic::AtomicUsize,
    versions: std::sync::atomic::AtomicU64,
}

impl Boards {
    fn fresh(&self, key: &Key) -> Option<Arc<Computed>> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(key)
            .filter(|e| e.at.elapsed() < BOARD_FRESH)
            .map(|e| e.computed.clone())
    }

    /// The board for `key`, computed by `compute` at most once per [`BOARD_FRESH`].
    pub async fn get<F, Fut>(
        &self,
        event_id: i64,
        bracket: Option<String>,
        compute: F,
    ) -> Result<Arc<Computed>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<PublicBoard, Error>>,
    {
        let key = (event_id, bracket);
        if let Some(hit) = self.fresh(&key) {
            return Ok(hit);
        }
        let lock = {
            let mut computing = self
                .computing
                .lock()
                .map_err(|_| Error::Internal("board lock poisoned".into()))?;
            computing.entry(key.clone()).or_default().clone()
        };
        let _turn = lock.lock().await;
        if let Some(hit) = self.fresh(&key) {
            return Ok(hit);
        }
        let board = compute().await?;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Internal("board cache poisoned".into()))?;
        let previous = cache.get(&key).map(|e| e.computed.clone());
        let computed = match previous {
            Some(previous) if previous.board == board => previous,
            _ => {
                let json: Arc<str> = serde_json::to_string(&board)
                    .map_err(|e| Error::Internal(e.to_string()))?
                    .into();
                let version = self
                    .versions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                Arc::new(Computed {
                    board,
                    json,
                    version,
                })
            }
        };
        // Boards nobody asked for in a minute are forgotten.
        cache.retain(|_, e| e.at.elapsed() < Duration::from_secs(60));
        cache.insert(
            key,
            Entry {
                at: Instant::now(),
                computed: computed.clone(),
            },
        );
        Ok(computed)
    }

    /// The event changed state (a freeze, its end): its boards are computed afresh.
    pub fn forget(&self, event_id: i64) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|(event, _), _| *event != event_id);
        }
    }

    /// A place for one more stream from `client`, or a refusal naming the cap.
    pub fn open_stream(self: &Arc<Self>, client: &str) -> Result<StreamSlot, Error> {
        use std::sync::atomic::Ordering;
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| Error::Internal("stream counts poisoned".into()))?;
        let mine = streams.get(client).copied().unwrap_or(0);
        if mine >= MAX_STREAMS_PER_CLIENT {
            return Err(Error::RateLimited {
                retry_after_secs: 10,
            });
        }
        if self.total.load(Ordering::Relaxed) >= MAX_STREAMS {
            return Err(Error::Busy {
                detail: format!("{MAX_STREAMS} scoreboard streams are open; try again shortly"),
                retry_after_secs: 10,
            });
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        streams.insert(client.to_owned(), mine + 1);
        Ok(StreamSlot {
            boards: self.clone(),
            client: client.to_owned(),
        })
    }

    /// Streams open now.
    pub fn streams_open(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One open scoreboard stream; given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    boards: Arc<Boards>,
    client: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.boards
            .total
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut streams) = self.boards.streams.lock()
            && let Some(count) = streams.get_mut(&self.client)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                streams.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(name: &str) -> PublicBoard {
        PublicBoard {
            event: name.into(),
            state: "live".into(),
            frozen_at: None,
            board: crate::scores::Leaderboard {
                event_id: 1,
                dimensions: Vec::new(),
                bracket: None,
                as_of_ms: None,
                rows: Vec::new(),
            },
        }
    }

    #[tokio::test]
    async fn a_crowd_shares_one_computation_per_second() {
        let boards = Boards::default();
        let computed = std::sync::atomic::AtomicUsize::new(0);
        let mut versions = Vec::new();
        for _ in 0..500 {
            let got = boards
                .get(1, None, || async {
                    computed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(board("Hack"))
                })
                .await
                .expect("board");
            versions.push(got.version);
        }
        assert_eq!(
            computed.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "500 asks, one computation"
        );
        assert!(versions.iter().all(|v| *v == versions[0]));
        let other = boards
            .get(1, Some("students".into()), || async { Ok(board("Hack")) })
            .await
            .expect("board");
        assert_ne!(other.version, versions[0], "each bracket has its own board");
    }

    #[test]
    fn streams_are_capped_per_client_and_given_back() {
        let boards = Arc::new(Boards::default());
        let slots: Vec<StreamSlot> = (0..MAX_STREAMS_PER_CLIENT)
            .map(|_| boards.open_stream("10.0.0.1").expect("slot"))
            .collect();
        assert!(matches!(
            boards.open_stream("10.0.0.1"),
            Err(Error::RateLimited { .. })
        ));
        assert!(
            boards.open_stream("10.0.0.2").is_ok(),
            "another client still gets one"
        );
        drop(slots);
        assert_eq!(boards.streams_open(), 0);
        assert!(boards.open_stream("10.0.0.1").is_ok());
    }
}
