//! The pool's one HTTP/2 connection: when it was made and last used, and the task that drives it
//! and retires it once it is idle past `pool_idle_timeout` or older than
//! `pool_max_connection_age` (it then closes as soon as the requests still on it end).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;

use super::{PoolSettings, RequestBody};

pub struct Multiplexed {
    pub sender: http2::SendRequest<RequestBody>,
    pub use_times: Arc<UseTimes>,
    /// Calls on it right now (busy while above zero).
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
}

/// When an HTTP/2 connection was made and last used, read by its driver task.
pub struct UseTimes {
    pub born: Instant,
    /// Milliseconds from `born` to the last use.
    pub last_used_ms: AtomicU64,
}

impl UseTimes {
    pub fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the connection stops taking requests, unless it is used before then.
    pub fn retires_at(&self, settings: &PoolSettings) -> Instant {
        let last_used = self.born + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        (last_used + settings.idle_timeout).min(self.born + settings.max_connection_age)
    }
}

/// Drives an HTTP/2 connection; once it is due to retire (idle, or too old), takes it out of the
/// pool, so it closes as soon as the requests still on it end.
pub async fn drive_http2<T>(
    connection: http2::Connection<T, RequestBody, TokioExecutor>,
    use_times: Arc<UseTimes>,
    slot: Arc<Mutex<Option<Multiplexed>>>,
    settings: PoolSettings,
) where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::pin!(connection);
    loop {
        let retires_at = use_times.retires_at(&settings);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(retires_at.into()) => {
                if Instant::now() >= use_times.retires_at(&settings) {
                    break;
                }
            }
        }
    }
    {
        let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(&current.use_times, &use_times))
        {
            *slot = None;
        }
    }
    if let Err(error) = connection.await {
        tracing::debug!(%error, "upstream HTTP/2 connection ended");
    }
}
