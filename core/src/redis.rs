//! The Redis plumbing both Redis stores share (buckets in the limiter, counters in the
//! worker): one lazily connecting, self-reconnecting multiplexed connection, and calls
//! under a deadline.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Why a Redis call gave no answer; each store maps it into its own error type.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    #[error("redis call timed out")]
    Timeout,
    #[error("redis unavailable: {0}")]
    Failed(String),
}

/// A multiplexed connection to `url` whose responses time out after `timeout`. It
/// connects lazily and reconnects by itself, so it can be made while Redis is down.
pub fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, RedisCallError> {
    let client = redis::Client::open(url).map_err(|e| RedisCallError::Failed(e.to_string()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| RedisCallError::Failed(e.to_string()))
}

/// Runs a Redis call under a deadline.
pub async fn with_deadline<T>(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisCallError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(RedisCallError::Timeout),
        Ok(Err(e)) if e.is_timeout() => Err(RedisCallError::Timeout),
        Ok(Err(e)) => Err(RedisCallError::Failed(e.to_string())),
        Ok(Ok(v)) => Ok(v),
    }
}
