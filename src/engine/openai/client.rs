//! HTTP to an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server): JSON in and out, the
//! API key as a bearer token, and faults handled as the OpenAI clients do. A 429, a 5xx, a
//! timeout or a dropped connection is retried with exponential backoff and full jitter, at most
//! `retries` times; any other 4xx (a wrong model name, a prompt too long) stops at once with the
//! server's own message. Errors name the URL, the status and the last line of the body, never
//! the key.

use anyhow::{anyhow, Result};
use serde_json::Value;
use std::time::Duration;

/// The first backoff; each retry doubles it, up to `BACKOFF_CAP`.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(8);

/// One server, with the retry policy of this run.
pub struct Client {
    http: reqwest::Client,
    /// Ends in `/v1`.
    pub base: String,
    key: Option<String>,
    pub retries: u32,
    timeout: Duration,
}

/// What one attempt came to, when it did not succeed.
enum Failure {
    /// Worth another attempt: 429, 5xx, a timeout or a connection error.
    Transient(String),
    /// The server refused the request; retrying cannot help.
    Refused { status: u16, message: String },
}

/// A request the server refused with a 4xx other than 429: its status and message.
#[derive(Debug)]
pub struct Refusal {
    pub url: String,
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: the server refused the request (status {}): {}", self.url, self.status, self.message)
    }
}

impl std::error::Error for Refusal {}

/// `http://host:8000`, `http://host:8000/` and `http://host:8000/v1` all name the same API root.
pub fn api_root(base_url: &str) -> String {
    let trimmed = base_url.trim().trim_end_matches('/');
    if trimmed.ends_with("/v1") { trimmed.to_string() } else { format!("{trimmed}/v1") }
}

impl Client {
    /// `key` is sent as a bearer token when given.
    pub fn new(base_url: &str, key: Option<String>, retries: u32, timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder().build().map_err(|e| anyhow!("HTTP client: {e}"))?;
        Ok(Client { http, base: api_root(base_url), key, retries, timeout })
    }

    /// GET `path` (under the API root), retried as any request.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(path, None, self.retries).await
    }

    /// POST `body` to `path`, retried as any request.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(path, Some(body), self.retries).await
    }

    /// POST with another bound on retries.
    pub async fn post_with_retries(&self, path: &str, body: &Value, retries: u32) -> Result<Value> {
        self.call(path, Some(body), retries).await
    }

    async fn call(&self, path: &str, body: Option<&Value>, retries: u32) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let payload = body.map(serde_json::to_vec).transpose()?;
        let mut attempt = 0u32;
        loop {
            match self.attempt(&url, payload.as_deref()).await {
                Ok(value) => return Ok(value),
                Err(Failure::Refused { status, message }) => return Err(Refusal { url, status, message }.into()),
                Err(Failure::Transient(why)) if attempt >= retries => {
                    return Err(anyhow!("{url}: the server did not answer after {} attempt(s) (--request-retries {retries}): {why}", attempt + 1));
                }
                Err(Failure::Transient(_)) => {
                    tokio::time::sleep(backoff(attempt, &url)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, url: &str, payload: Option<&[u8]>) -> Result<Value, Failure> {
        let mut request = match payload {
            Some(bytes) => self.http.post(url).header("content-type", "application/json").body(bytes.to_vec()),
            None => self.http.get(url),
        };
        request = request.timeout(self.timeout);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| Failure::Transient(describe(&e)))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| Failure::Transient(format!("status {status}, body cut off: {}", describe(&e))))?;
        let text = String::from_utf8_lossy(&bytes);
        if status == 429 || status >= 500 {
            return Err(Failure::Transient(format!("status {status}: {}", server_message(&text))));
        }
        if status >= 400 {
            return Err(Failure::Refused { status, message: server_message(&text) });
        }
        serde_json::from_slice(&bytes).map_err(|_| Failure::Refused { status, message: format!("the answer is not JSON: {}", last_line(&text)) })
    }
}

/// reqwest's error with its causes (the cause says "connection refused" or "timed out").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `error.message` (OpenAI, vLLM), `detail` (FastAPI) or the body's last line.
fn server_message(body: &str) -> String {
    if let Ok(json) = serde_json::from_str::<Value>(body) {
        let message = json["error"]["message"].as_str().or_else(|| json["error"].as_str()).or_else(|| json["message"].as_str());
        if let Some(message) = message {
            return message.to_string();
        }
        if !json["detail"].is_null() {
            return json["detail"].to_string();
        }
    }
    last_line(body)
}

fn last_line(body: &str) -> String {
    let line = body.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(empty body)").trim();
    line.chars().take(500).collect()
}

/// Full jitter (AWS's "exponential backoff and jitter"): uniform in [0, min(cap, base * 2^n)].
fn backoff(attempt: u32, salt: &str) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_CAP);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos() as u64;
    let salt = salt.bytes().fold(attempt as u64, |h, b| crate::seed::mix(h ^ b as u64));
    ceiling.mul_f64(crate::seed::unit(crate::seed::mix(nanos ^ salt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_root_ends_in_v1_however_the_url_is_written() {
        for url in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"] {
            assert_eq!(api_root(url), "http://127.0.0.1:8000/v1", "{url}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_below_it() {
        // The ceiling of each attempt's wait: 250 ms doubling, capped at 8 s.
        let ceilings_ms = [250, 500, 1000, 2000, 4000, 8000, 8000, 8000];
        for (attempt, ceiling) in ceilings_ms.into_iter().enumerate() {
            let ceiling = Duration::from_millis(ceiling);
            let waits: Vec<Duration> = (0..64).map(|i| backoff(attempt as u32, &i.to_string())).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "attempt {attempt}: {waits:?}");
            // Jittered over the whole range: some wait above half the ceiling (so above the
            // attempt before's ceiling while doubling), and not all alike.
            assert!(waits.iter().any(|w| *w > ceiling / 2) && waits.iter().any(|w| *w != waits[0]), "attempt {attempt}: {waits:?}");
        }
    }

    #[test]
    fn the_servers_message_is_read_from_each_servers_error_shape() {
        assert_eq!(server_message(r#"{"error": {"message": "model `x` not found", "type": "NotFoundError"}}"#), "model `x` not found");
        assert_eq!(server_message(r#"{"detail": "Not Found"}"#), "\"Not Found\"");
        assert_eq!(server_message("<html>\n<body>bad gateway</body>\n\n"), "<body>bad gateway</body>");
    }
}
