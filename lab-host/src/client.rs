//! HTTPS to the appliance, trusting only its CA, with every call signed by the host key.

use std::time::Duration;

use base64::Engine as _;
use labrack_provisioner::protocol::{self, HOST_AUTH_SCHEME};
use ring::signature::Ed25519KeyPair;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Digest as _;

/// Why a call failed, split by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// the appliance could not be reached or answered 5xx: keep the message and retry
    #[error("appliance unreachable: {0}")]
    Unreachable(String),
    /// the appliance refused the message for good (4xx): retrying cannot help
    #[error("appliance refused the call ({status}): {detail}")]
    Refused { status: u16, detail: String },
}

pub(crate) fn http_client(ca_pem: &[u8], timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(ca_pem)
        .map_err(|e| anyhow::anyhow!("the appliance CA does not parse: {e}"))?;
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

/// Turns a response into `T` or a [`CallError`] carrying the problem's detail.
pub(crate) async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, CallError> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| CallError::Unreachable(e.to_string()))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| CallError::Refused {
            status: status.as_u16(),
            detail: format!("unexpected answer: {e}"),
        });
    }
    let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        Err(CallError::Unreachable(format!("{status}: {detail}")))
    } else {
        Err(CallError::Refused {
            status: status.as_u16(),
            detail,
        })
    }
}

/// A signed client for one enrolled host. Each agent process signs as its own random
/// instance, counting its calls, so no signed call can be replayed and an identity copied
/// to a second machine is noticed.
pub(crate) struct HostClient {
    http: reqwest::Client,
    base: String,
    host_id: i64,
    key: Ed25519KeyPair,
    instance: String,
    counter: std::sync::atomic::AtomicU64,
}

impl HostClient {
    pub(crate) fn new(
        http: reqwest::Client,
        appliance: &str,
        host_id: i64,
        key: Ed25519KeyPair,
    ) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        Self {
            http,
            base: appliance.trim_end_matches('/').to_owned(),
            host_id,
            key,
            instance,
            counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// POSTs `body` as JSON to `path` (e.g. `/api/v1/host/poll`), signed.
    pub(crate) async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CallError::Refused {
            status: 0,
            detail: e.to_string(),
        })?;
        self.call_raw(path, bytes).await
    }

    pub(crate) async fn call_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<T, CallError> {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        let counter = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let message =
            protocol::signing_message("POST", path, timestamp, &self.instance, counter, &digest);
        let signature =
            base64::engine::general_purpose::STANDARD.encode(self.key.sign(&message).as_ref());
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header(
                "authorization",
                format!(
                    "{HOST_AUTH_SCHEME} host={},ts={timestamp},i={},n={counter},sig={signature}",
                    self.host_id, self.instance
                ),
            )
            .body(bytes)
            .send()
            .await
            .map_err(|e| CallError::Unreachable(format!("{e:#}")))?;
        decode(response).await
    }
}
