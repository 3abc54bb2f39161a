//! `http` upstream: the Tendrl platform API.
//!
//! - `POST {url}/entities/messages` — batch (JSON array); any 2xx delivers it.
//! - `POST {url}/entities/message` — one message (`wait:true`); the body is relayed.
//! - `GET {url}/entities/check_messages?limit=N` — 204 when empty, 200 `{"messages":[…]}`.
//!
//! Redirects are never followed (a POST followed by a body-less GET once acked batches that
//! never reached the platform): a 3xx is an error like any other. [`classify`] turns every
//! answer into `Ok` (delivered) or an [`UpstreamError`]; delivery acts on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};

use super::api_key::ApiKey;
use super::{Upstream, UpstreamError};
use crate::config::Config;
use crate::metrics::Metrics;

pub struct HttpUpstream {
    client: reqwest::Client,
    base: String,
    /// Read per request: a rotated key is used from the next request on.
    key: Arc<ApiKey>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key is deliberately left out.
        f.debug_struct("HttpUpstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl HttpUpstream {
    pub fn new(config: &Config, key: Arc<ApiKey>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(super::tls::client_config(config)?)
            .timeout(config.upstream_timeout)
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(60))
            // Never follow: a followed POST becomes a GET without the batch (issue 15).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nano-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            client,
            base: config.app_url.trim_end_matches('/').to_owned(),
            key,
            metrics,
        })
    }

    pub(super) fn key(&self) -> &Arc<ApiKey> {
        &self.key
    }

    async fn request(
        &self,
        endpoint: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let key = self.key.current();
        let req = if key.secret.is_empty() {
            req
        } else {
            req.bearer_auth(&key.secret)
        };
        let start = Instant::now();
        let res = req.send().await;
        let res = match res {
            Ok(r) => {
                let status = r.status();
                // Only a failure needs its headers (Location, Retry-After): no copy per 2xx.
                let headers = if status.is_success() {
                    HeaderMap::new()
                } else {
                    r.headers().clone()
                };
                match r.bytes().await {
                    Ok(body) => Ok((status, headers, body)),
                    Err(e) => Err(network(e)),
                }
            }
            Err(e) => Err(network(e)),
        };
        self.metrics
            .upstream_duration
            .with_label_values(&[endpoint])
            .observe(start.elapsed().as_secs_f64());
        let (status, headers, body) = res?;
        let outcome = classify(endpoint, status, &headers, &body);
        if let Err(UpstreamError::Unauthorized { .. }) = &outcome {
            // Refused: the Secret may have been rotated since the last periodic read.
            self.key.recheck_soon();
        }
        outcome?;
        Ok((status, body))
    }
}

/// At most this much of a refusal's body is kept (logs, dead-letter lines, replies).
const MAX_REPLY_BYTES: usize = 1024;

/// What the platform's answer means (issue 15):
///
/// - 2xx: delivered (`Ok`); the body is the caller's business (a batch ignores it).
/// - 3xx: [`UpstreamError::Redirected`] with its `Location` — never followed, retried.
/// - 401, 403: [`UpstreamError::Unauthorized`] — retried, the spool is held.
/// - 408, 429, 5xx (and anything else unexpected): [`UpstreamError::Retryable`], with
///   `Retry-After`.
/// - 413: [`UpstreamError::TooLarge`] — delivery splits the batch.
/// - any other 4xx: [`UpstreamError::Rejected`] — delivery splits the batch; a single
///   message is dead-lettered.
fn classify(
    endpoint: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), UpstreamError> {
    let code = status.as_u16();
    if status.is_success() {
        return Ok(());
    }
    if status.is_redirection() {
        let location = headers
            .get(LOCATION)
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(256)
                    .collect()
            })
            .unwrap_or_else(|| "(none)".to_owned());
        return Err(UpstreamError::Redirected {
            status: code,
            endpoint,
            location,
        });
    }
    match code {
        401 | 403 => Err(UpstreamError::Unauthorized {
            status: code,
            endpoint,
        }),
        408 | 429 => Err(retry(endpoint, code, headers)),
        // The endpoint itself is wrong (a mistyped --app-url, a proxy in front of the
        // platform): no message is at fault, so the spool is held and retried, never
        // dead-lettered message by message.
        404 | 405 | 410 => Err(UpstreamError::Retryable {
            reason: format!(
                "HTTP {code} from {endpoint}: the platform has no such endpoint; check the \
                 gateway's upstream URL (--app-url)"
            ),
            retry_after: retry_after(headers),
        }),
        413 => Err(UpstreamError::TooLarge {
            body: reply_text(body),
        }),
        400..=499 => Err(UpstreamError::Rejected {
            status: code,
            body: reply_text(body),
        }),
        _ => Err(retry(endpoint, code, headers)),
    }
}

fn retry(endpoint: &str, code: u16, headers: &HeaderMap) -> UpstreamError {
    UpstreamError::Retryable {
        reason: format!("HTTP {code} from {endpoint}"),
        retry_after: retry_after(headers),
    }
}

/// The start of a reply body as text, for logs and the dead-letter file.
fn reply_text(body: &[u8]) -> String {
    let head = body.get(..MAX_REPLY_BYTES).unwrap_or(body);
    String::from_utf8_lossy(head).into_owned()
}

fn network(e: reqwest::Error) -> UpstreamError {
    // reqwest errors carry the URL but never headers, so the key cannot leak through them.
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "network error"
    };
    let mut reason = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    UpstreamError::Retryable {
        reason,
        retry_after: None,
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

impl Upstream for HttpUpstream {
    async fn send_batch(&self, body: Bytes, _count: u64) -> Result<(), UpstreamError> {
        let req = self
            .client
            .post(format!("{}/entities/messages", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        self.request("messages", req).await.map(|_| ())
    }

    async fn send_one(&self, body: Bytes) -> Result<Bytes, UpstreamError> {
        let req = self
            .client
            .post(format!("{}/entities/message", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        self.request("message", req).await.map(|(_, b)| b)
    }

    async fn check_messages(&self, limit: u32) -> Result<Vec<serde_json::Value>, UpstreamError> {
        let req = self.client.get(format!(
            "{}/entities/check_messages?limit={limit}",
            self.base
        ));
        let (status, body) = self.request("check_messages", req).await?;
        if status == StatusCode::NO_CONTENT || body.iter().all(u8::is_ascii_whitespace) {
            return Ok(vec![]);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::Retryable {
                reason: format!("check_messages returned invalid JSON: {e}"),
                retry_after: None,
            })?;
        Ok(match v {
            serde_json::Value::Object(mut o) => match o.remove("messages") {
                Some(serde_json::Value::Array(a)) => a,
                _ => vec![],
            },
            serde_json::Value::Array(a) => a,
            _ => vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: u16) -> &'static str {
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, "/ok".parse().unwrap());
        match classify(
            "messages",
            StatusCode::from_u16(code).unwrap(),
            &headers,
            b"{}",
        ) {
            Ok(()) => "ok",
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn classification_follows_issue_15() {
        for code in [200, 201, 202, 204] {
            assert_eq!(class(code), "ok", "{code}");
        }
        // A missing endpoint is a configuration error: held and retried, not dead-lettered.
        for code in [500, 502, 503, 504, 429, 408, 404, 405, 410] {
            assert_eq!(class(code), "retryable", "{code}");
        }
        for code in [300, 301, 302, 303, 307, 308] {
            assert_eq!(class(code), "redirect", "{code}");
        }
        for code in [401, 403] {
            assert_eq!(class(code), "unauthorized", "{code}");
        }
        assert_eq!(class(413), "too_large");
        for code in [400, 409, 422] {
            assert_eq!(class(code), "rejected", "{code}");
        }
    }

    #[test]
    fn redirect_names_its_location_and_refusals_keep_a_bounded_body() {
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, "https://elsewhere.example/ok".parse().unwrap());
        let e = classify("messages", StatusCode::FOUND, &headers, b"").unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Redirected { status: 302, location, .. } if location == "https://elsewhere.example/ok"),
            "{e:?}"
        );
        let e = classify("messages", StatusCode::FOUND, &HeaderMap::new(), b"").unwrap_err();
        assert!(e.to_string().contains("(none)"), "{e}");
        let big = vec![b'x'; 10_000];
        match classify("messages", StatusCode::BAD_REQUEST, &HeaderMap::new(), &big) {
            Err(UpstreamError::Rejected { status: 400, body }) => {
                assert_eq!(body.len(), MAX_REPLY_BYTES)
            }
            other => panic!("{other:?}"),
        }
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "1000000000".parse().unwrap());
        match classify("messages", StatusCode::TOO_MANY_REQUESTS, &headers, b"") {
            Err(UpstreamError::Retryable { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(1_000_000_000)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
