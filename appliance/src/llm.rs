//! The LLM gateway: every agent's call to a language model goes through here.
//!
//! - It speaks the OpenAI chat-completions API (`POST {base}/v1/chat/completions`), which
//!   local model servers (llama.cpp, vLLM, Ollama) and cloud services share.
//! - Endpoints are tried in order (failover); each has a circuit breaker: after
//!   [`BREAKER_FAILURES`] failures in a row it is skipped for [`BREAKER_OPEN`], then one
//!   trial call decides.
//! - Per-team token budgets are enforced **before** a call: the tokens already used plus
//!   the prompt's estimate plus the reply's cap must fit, and concurrent calls reserve
//!   their worst case, so a team never overspends. Each call's use is recorded
//!   (append-only) for billing.
//! - Per-team rate limit: a token bucket of [`LlmSettings::requests_per_minute`].
//! - Endpoints off the venue's network are refused unless policy allows them
//!   (`--llm-allow-remote`): team data stays in the venue by default.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::store::Db;

/// Consecutive failures that open an endpoint's breaker.
pub const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker skips its endpoint.
pub const BREAKER_OPEN: Duration = Duration::from_secs(30);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmEndpoint {
    /// base URL, e.g. `http://127.0.0.1:8080` (the path `/v1/chat/completions` is added)
    pub url: String,
    pub model: String,
    /// the environment variable holding the API key, if the endpoint wants one
    pub api_key_env: Option<String>,
}

#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// tried in order; empty: no model, agents use their rules
    pub endpoints: Vec<LlmEndpoint>,
    /// tokens (prompt + reply) each team may use in all
    pub team_token_budget: u64,
    pub requests_per_minute: u32,
    /// what 1,000 tokens cost in the billing ledger (cents)
    pub cents_per_1k_tokens: u32,
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            team_token_budget: 50_000,
            requests_per_minute: 6,
            cents_per_1k_tokens: 0,
        }
    }
}

/// Checks that each endpoint is a URL on this venue's network (loopback or a private
/// address) unless remote endpoints are allowed.
pub fn check_policy(endpoints: &[LlmEndpoint], allow_remote: bool) -> Result<(), String> {
    for endpoint in endpoints {
        let url = reqwest::Url::parse(&endpoint.url)
            .map_err(|e| format!("LLM endpoint {:?} is not a URL: {e}", endpoint.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "LLM endpoint {:?} must be http:// or https://",
                endpoint.url
            ));
        }
        if endpoint.model.trim().is_empty() {
            return Err(format!(
                "LLM endpoint {:?} needs a model name",
                endpoint.url
            ));
        }
        let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
        let local = match host.parse::<IpAddr>() {
            Ok(ip) => is_local(ip),
            Err(_) => host == "localhost" || host.ends_with(".local") || host.ends_with(".lan"),
        };
        if !local && !allow_remote {
            return Err(format!(
                "LLM endpoint {} is outside the venue's network; pass --llm-allow-remote to let team data go there",
                endpoint.url
            ));
        }
    }
    Ok(())
}

fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChatReply {
    pub content: String,
    pub model: String,
    pub endpoint: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("no language model is configured")]
    NotConfigured,
    #[error("the team's AI budget is spent: {used} of {budget} tokens used")]
    BudgetExceeded { used: u64, budget: u64 },
    #[error("too many AI requests; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("no language model answered: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(String),
}

/// Who pays for a call: a team (budgeted) or the platform (commentary; recorded only).
#[derive(Debug, Clone, Copy)]
pub struct Payer {
    pub event_id: i64,
    pub team_id: Option<i64>,
    /// the queue job the call answers: its use is recorded and billed once, with the reply,
    /// however often the job is retried
    pub job_id: Option<i64>,
}

/// A reply already recorded for `job_id` (an earlier attempt of the job got it).
pub fn recorded_reply(
    conn: &rusqlite::Connection,
    job_id: i64,
) -> Result<Option<String>, rusqlite::Error> {
    use rusqlite::OptionalExtension as _;
    conn.query_row(
        "SELECT reply FROM llm_usage WHERE job_id = ?1",
        [job_id],
        |r| r.get::<_, Option<String>>(0),
    )
    .optional()
    .map(Option::flatten)
}

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

#[derive(Debug, Deserialize)]
struct CompletionResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: ChatMessage,
}

#[derive(Debug, Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// A rough token count (4 characters a token), used before a call and when a server
/// reports no usage.
pub fn estimate_tokens(messages: &[ChatMessage]) -> u64 {
    let chars: usize = messages
        .iter()
        .map(|m| m.content.chars().count() + m.role.len() + 4)
        .sum();
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX)
}

pub struct Gateway {
    settings: LlmSettings,
    http: reqwest::Client,
    breakers: Vec<Mutex<Breaker>>,
    /// tokens reserved by calls in flight, per team; held while usage is read and
    /// recorded, so a check and a reservation are one step
    reserved: tokio::sync::Mutex<HashMap<i64, u64>>,
    /// per team: (tokens left in the bucket, when it was last filled)
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("endpoints", &self.settings.endpoints.len())
            .finish()
    }
}

impl Gateway {
    pub fn new(settings: LlmSettings) -> Self {
        let breakers = settings
            .endpoints
            .iter()
            .map(|_| Mutex::new(Breaker::default()))
            .collect();
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            settings,
            http,
            breakers,
            reserved: tokio::sync::Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn configured(&self) -> bool {
        !self.settings.endpoints.is_empty()
    }

    pub fn team_budget(&self) -> u64 {
        self.settings.team_token_budget
    }

    fn take_rate_token(&self, team_id: i64) -> Result<(), LlmError> {
        let per_minute = f64::from(self.settings.requests_per_minute.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| LlmError::Storage("rate limiter poisoned".into()))?;
        let now = Instant::now();
        let (tokens, last) = buckets.entry(team_id).or_insert((per_minute, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * per_minute / 60.0).min(per_minute);
        *last = now;
        if *tokens < 1.0 {
            let wait = ((1.0 - *tokens) * 60.0 / per_minute).ceil() as u64;
            return Err(LlmError::RateLimited {
                retry_after_secs: wait.max(1),
            });
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Tokens the team has used (recorded calls).
    pub async fn used(&self, db: &Db, team_id: i64) -> Result<u64, LlmError> {
        db.read(move |conn| {
            conn.query_row("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM llm_usage WHERE team_id = ?1", [team_id], |r| r.get::<_, i64>(0))
                .map_err(crate::store::StoreError::from)
        })
        .await
        .map(|n| u64::try_from(n).unwrap_or(0))
        .map_err(|e| LlmError::Storage(format!("{e:?}")))
    }

    /// One chat completion for `agent`, paid by `payer`, with at most `max_tokens` of reply.
    pub async fn chat(
        &self,
        db: &Db,
        payer: Payer,
        agent: &str,
        messages: Vec<ChatMessage>,
        max_tokens: u64,
    ) -> Result<ChatReply, LlmError> {
        if !self.configured() {
            return Err(LlmError::NotConfigured);
        }
        let prompt_estimate = estimate_tokens(&messages);
        let mut max_tokens = max_tokens.max(1);
        let reservation = match payer.team_id {
            Some(team_id) => {
                let mut reserved = self.reserved.lock().await;
                let used = self.used(db, team_id).await?;
                let budget = self.settings.team_token_budget;
                let in_flight = reserved.get(&team_id).copied().unwrap_or(0);
                let left = budget.saturating_sub(used + in_flight + prompt_estimate);
                // Too little left for a useful answer: refuse before calling.
                if left < 16 {
                    return Err(LlmError::BudgetExceeded {
                        used: used + in_flight,
                        budget,
                    });
                }
                self.take_rate_token(team_id)?;
                max_tokens = max_tokens.min(left);
                let worst = prompt_estimate + max_tokens;
                *reserved.entry(team_id).or_default() += worst;
                Some((team_id, worst))
            }
            None => None,
        };
        let result = self.call_endpoints(&messages, max_tokens).await;
        // Record the use, then release the reservation, under the same lock as the check.
        let mut reserved = self.reserved.lock().await;
        let recorded = match &result {
            Ok(reply) => {
                let mut record = reply.clone();
                if record.prompt_tokens == 0 && record.completion_tokens == 0 {
                    record.prompt_tokens = prompt_estimate;
                    record.completion_tokens = estimate_tokens(&[ChatMessage {
                        role: String::new(),
                        content: record.content.clone(),
                    }]);
                }
                self.record(db, payer, agent, &record)
                    .await
                    .map(|()| record)
            }
            Err(_) => Err(LlmError::Unavailable(String::new())),
        };
        if let Some((team_id, worst)) = reservation {
            let entry = reserved.entry(team_id).or_default();
            *entry = entry.saturating_sub(worst);
        }
        drop(reserved);
        result?;
        recorded
    }

    async fn record(
        &self,
        db: &Db,
        payer: Payer,
        agent: &str,
        reply: &ChatReply,
    ) -> Result<(), LlmError> {
        let record = reply.clone();
        let agent = agent.to_owned();
        let rate = self.settings.cents_per_1k_tokens;
        let now = crate::clock::now_ms();
        db.writer()
            .write(move |conn| {
                if let Some(job_id) = payer.job_id {
                    let seen: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM llm_usage WHERE job_id = ?1)", [job_id], |r| r.get(0))?;
                    if seen {
                        return Ok(0);
                    }
                }
                // The use is billed in the same transaction that records it.
                let tokens = record.prompt_tokens.saturating_add(record.completion_tokens);
                crate::billing::append(
                    conn,
                    &crate::billing::NewEntry {
                        event_id: payer.event_id,
                        team_id: payer.team_id,
                        kind: "llm_tokens",
                        quantity: tokens as f64,
                        unit: "tokens",
                        amount_cents: -((tokens as f64 * f64::from(rate) / 1000.0).round() as i64),
                        reference: payer.job_id.map(|id| format!("llm:job:{id}")),
                        note: format!("{agent} via {} ({})", record.endpoint, record.model),
                        actor: "system:llm",
                    },
                    now,
                )?;
                conn.execute(
                    "INSERT INTO llm_usage (event_id, team_id, agent, endpoint, model, prompt_tokens, completion_tokens, created_ms, job_id, reply)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        payer.event_id,
                        payer.team_id,
                        agent,
                        record.endpoint,
                        record.model,
                        i64::try_from(record.prompt_tokens).unwrap_or(i64::MAX),
                        i64::try_from(record.completion_tokens).unwrap_or(i64::MAX),
                        now,
                        payer.job_id,
                        payer.job_id.map(|_| record.content.as_str())
                    ],
                )
            })
            .await
            .map(|_| ())
            .map_err(|e| LlmError::Storage(format!("{e:?}")))
    }

    async fn call_endpoints(
        &self,
        messages: &[ChatMessage],
        max_tokens: u64,
    ) -> Result<ChatReply, LlmError> {
        let mut errors = Vec::new();
        for (endpoint, breaker) in self.settings.endpoints.iter().zip(&self.breakers) {
            let open = breaker
                .lock()
                .ok()
                .and_then(|b| b.open_until)
                .is_some_and(|until| Instant::now() < until);
            if open {
                errors.push(format!(
                    "{}: circuit open after repeated failures",
                    endpoint.url
                ));
                continue;
            }
            match self.call(endpoint, messages, max_tokens).await {
                Ok(reply) => {
                    if let Ok(mut b) = breaker.lock() {
                        *b = Breaker::default();
                    }
                    return Ok(reply);
                }
                Err(error) => {
                    tracing::warn!(endpoint = %endpoint.url, %error, "LLM endpoint failed; trying the next");
                    if let Ok(mut b) = breaker.lock() {
                        b.failures += 1;
                        if b.failures >= BREAKER_FAILURES {
                            b.open_until = Some(Instant::now() + BREAKER_OPEN);
                            b.failures = BREAKER_FAILURES - 1; // after the pause, one failure reopens it
                        }
                    }
                    errors.push(format!("{}: {error}", endpoint.url));
                }
            }
        }
        Err(LlmError::Unavailable(errors.join("; ")))
    }

    async fn call(
        &self,
        endpoint: &LlmEndpoint,
        messages: &[ChatMessage],
        max_tokens: u64,
    ) -> Result<ChatReply, String> {
        let url = format!("{}/v1/chat/completions", endpoint.url.trim_end_matches('/'));
        let mut request = self.http.post(&url).json(&serde_json::json!({
            "model": endpoint.model,
            "messages": messages,
            "max_tokens": max_tokens,
        }));
        if let Some(key) = endpoint
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
        {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let body: CompletionResponse = response
            .json()
            .await
            .map_err(|e| format!("not a chat completion: {e}"))?;
        let content = body
            .choices
            .into_iter()
            .next()
            .map(|c| c.message.content)
            .ok_or("the reply has no choices")?;
        let usage = body.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        });
        Ok(ChatReply {
            content,
            model: body.model.unwrap_or_else(|| endpoint.model.clone()),
            endpoint: endpoint.url.clone(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> LlmEndpoint {
        LlmEndpoint {
            url: url.into(),
            model: "m".into(),
            api_key_env: None,
        }
    }

    #[test]
    fn endpoints_off_the_venue_network_need_policy() {
        for local in [
            "http://127.0.0.1:8080",
            "http://10.1.2.3",
            "http://192.168.1.5:11434",
            "http://localhost:8000",
            "http://[::1]:9",
        ] {
            assert!(check_policy(&[endpoint(local)], false).is_ok(), "{local}");
        }
        let cloud = endpoint("https://api.example.com");
        assert!(
            check_policy(std::slice::from_ref(&cloud), false)
                .is_err_and(|e| e.contains("--llm-allow-remote"))
        );
        assert!(check_policy(&[cloud], true).is_ok());
        assert!(check_policy(&[endpoint("ftp://127.0.0.1")], true).is_err());
        assert!(
            check_policy(
                &[LlmEndpoint {
                    model: " ".into(),
                    ..endpoint("http://127.0.0.1")
                }],
                true
            )
            .is_err()
        );
    }

    #[test]
    fn token_estimates_round_up() {
        assert_eq!(
            estimate_tokens(&[ChatMessage::user("abcd")]),
            3,
            "4 + 'user' + 4 = 12 characters"
        );
        assert_eq!(estimate_tokens(&[]), 0);
    }
}
