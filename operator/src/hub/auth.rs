//! Agent authentication: the AgentHello credentials are the pod's projected service-account
//! token (audience `nanogate-hub`); a TokenReview proves it, and the pod it is bound to must be
//! the one the agent claims to be and must be injected for an existing gateway. [`Bounded`]
//! puts a timeout, a concurrency limit and a cache of accepted tokens around it, so a slow API
//! server or a reconnect storm cannot pile up TokenReviews.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};

use super::index::AgentIdentity;
use crate::crd::AgentGateway;
use crate::names::{GATEWAY_ANNOTATION, HUB_TOKEN_AUDIENCE, INJECTED_GATEWAY_LABEL};

/// Why an agent was refused. Said in the audit log, never to the agent (it only hears
/// "authentication failed").
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denial {
    #[error("token rejected by the API server: {0}")]
    TokenRejected(String),
    #[error("token is not for audience {HUB_TOKEN_AUDIENCE}")]
    WrongAudience,
    #[error("token is not bound to a pod")]
    NotPodBound,
    #[error("token is bound to pod uid {bound}, agent claims {claimed}")]
    PodMismatch { bound: String, claimed: String },
    #[error("pod {0} not found")]
    PodGone(String),
    #[error("pod {0} is not injected for a gateway")]
    NotInjected(String),
    #[error("gateway {0} does not exist")]
    NoGateway(String),
    #[error("could not check the token: {0}")]
    Unavailable(String),
}

/// Decides who an AgentHello comes from.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> impl Future<Output = Result<AgentIdentity, Denial>> + Send;

    /// Forgets what is remembered of `agent_id`'s credentials: its next authentication is a
    /// full one (its pod or gateway may be gone). Nothing to forget by default.
    fn forget(&self, _agent_id: &str) {}
}

/// The production authenticator (TokenReview + pod + gateway lookups).
pub struct TokenReviewAuthenticator {
    client: Client,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> Result<AgentIdentity, Denial> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(credentials.to_string()),
                audiences: Some(vec![HUB_TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denial::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Denial::TokenRejected(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == HUB_TOKEN_AUDIENCE)
        {
            return Err(Denial::WrongAudience);
        }
        let user = status.user.unwrap_or_default();
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        let (Some(pod), Some(bound_uid)) = (first(POD_NAME_EXTRA), first(POD_UID_EXTRA)) else {
            return Err(Denial::NotPodBound);
        };
        if bound_uid != agent_id {
            return Err(Denial::PodMismatch {
                bound: bound_uid,
                claimed: agent_id.to_string(),
            });
        }
        // username: system:serviceaccount:<namespace>:<name>
        let namespace = user
            .username
            .as_deref()
            .and_then(|u| u.strip_prefix("system:serviceaccount:"))
            .and_then(|rest| rest.split(':').next())
            .ok_or(Denial::NotPodBound)?
            .to_string();
        let pod_object = Api::<Pod>::namespaced(self.client.clone(), &namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| Denial::Unavailable(e.to_string()))?
            .filter(|p| p.metadata.uid.as_deref() == Some(agent_id))
            .ok_or_else(|| Denial::PodGone(format!("{namespace}/{pod}")))?;
        let gateway = pod_object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INJECTED_GATEWAY_LABEL))
            .or_else(|| {
                pod_object
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(GATEWAY_ANNOTATION))
            })
            .cloned()
            .ok_or_else(|| Denial::NotInjected(format!("{namespace}/{pod}")))?;
        Api::<AgentGateway>::namespaced(self.client.clone(), &namespace)
            .get_opt(&gateway)
            .await
            .map_err(|e| Denial::Unavailable(e.to_string()))?
            .ok_or_else(|| Denial::NoGateway(format!("{namespace}/{gateway}")))?;
        Ok(AgentIdentity {
            agent_id: agent_id.to_string(),
            namespace,
            pod,
            gateway,
        })
    }
}

/// Limits of [`Bounded`]; defaults beside each field.
#[derive(Clone, Debug)]
pub struct AuthLimits {
    /// One authentication (TokenReview and lookups) gets this long (5 s); waiting for a turn
    /// is bounded by the hub's handshake timeout.
    pub timeout: Duration,
    /// Authentications in flight at most (16).
    pub concurrency: usize,
    /// An accepted token is trusted again without a TokenReview until it expires (its JWT
    /// `exp`), but for this long at most (5 min).
    pub cache_ttl: Duration,
    /// Accepted tokens remembered at most (one per agent; 50000).
    pub cache_entries: usize,
}

impl Default for AuthLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            concurrency: 16,
            cache_ttl: Duration::from_secs(300),
            cache_entries: 50_000,
        }
    }
}

/// An accepted token of one agent, kept as its SHA-256: a bearer token is not held in memory
/// longer than its review, and at 10,000 agents the digests take 0.3 MiB, the tokens 10 MiB.
struct Accepted {
    token: TokenDigest,
    identity: AgentIdentity,
    until: Instant,
}

#[derive(PartialEq, Eq)]
struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }
}

/// Wraps an [`Authenticator`] with a timeout, bounded concurrency and a cache of accepted
/// tokens (per agent id, until the token's expiry or the cache TTL).
pub struct Bounded<A> {
    inner: A,
    limits: AuthLimits,
    turns: Semaphore,
    accepted: Mutex<HashMap<String, Accepted>>,
}

impl<A: Authenticator> Bounded<A> {
    pub fn new(inner: A, limits: AuthLimits) -> Self {
        Self {
            inner,
            turns: Semaphore::new(limits.concurrency.clamp(1, Semaphore::MAX_PERMITS)),
            limits,
            accepted: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped authenticator.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Accepted>> {
        self.accepted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, agent_id: &str, token: &TokenDigest, now: Instant) -> Option<AgentIdentity> {
        let cache = self.lock();
        let hit = cache.get(agent_id)?;
        (hit.token == *token && now < hit.until).then(|| hit.identity.clone())
    }

    fn remember(
        &self,
        agent_id: &str,
        token: &str,
        digest: TokenDigest,
        identity: &AgentIdentity,
        now: Instant,
    ) {
        let mut lifetime = self.limits.cache_ttl;
        if let Some(left) = token_lifetime(token) {
            lifetime = lifetime.min(left);
        }
        if lifetime.is_zero() {
            return;
        }
        let mut cache = self.lock();
        if cache.len() >= self.limits.cache_entries {
            cache.retain(|_, a| now < a.until);
        }
        // Still full of live entries: this one is simply not cached.
        if cache.len() < self.limits.cache_entries || cache.contains_key(agent_id) {
            cache.insert(
                agent_id.to_string(),
                Accepted {
                    token: digest,
                    identity: identity.clone(),
                    until: now + lifetime,
                },
            );
        }
    }
}

impl<A: Authenticator> Authenticator for Bounded<A> {
    fn forget(&self, agent_id: &str) {
        self.lock().remove(agent_id);
        self.inner.forget(agent_id);
    }

    async fn authenticate(
        &self,
        agent_id: &str,
        credentials: &str,
    ) -> Result<AgentIdentity, Denial> {
        // Hashed once, before the cache's lock is taken.
        let digest = TokenDigest::of(credentials);
        if let Some(identity) = self.cached(agent_id, &digest, Instant::now()) {
            return Ok(identity);
        }
        // Waiting for a turn is bounded by the connection's handshake deadline; the timeout
        // starts with the call, so calls that hang free their turns for the next ones.
        let _turn = self
            .turns
            .acquire()
            .await
            .map_err(|_| Denial::Unavailable("authentication is shutting down".into()))?;
        let checked = tokio::time::timeout(
            self.limits.timeout,
            self.inner.authenticate(agent_id, credentials),
        )
        .await
        .map_err(|_| {
            Denial::Unavailable(format!(
                "no answer within {:?} (TokenReview too slow)",
                self.limits.timeout
            ))
        })?;
        if let Ok(identity) = &checked {
            self.remember(agent_id, credentials, digest, identity, Instant::now());
        }
        checked
    }
}

/// How long a JWT is still valid by its `exp` claim (zero once expired); `None` when the token
/// is no JWT or has no `exp`. Read only after the token was accepted, to bound the cache.
pub(super) fn token_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!(
            "{}.{}.signature",
            part(&serde_json::json!({"alg": "RS256"})),
            part(&claims)
        )
    }

    #[test]
    fn token_lifetime_comes_from_exp() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let left = token_lifetime(&jwt(serde_json::json!({"exp": now + 600})));
        assert!(
            left.is_some_and(|l| l > Duration::from_secs(590)),
            "{left:?}"
        );
        assert_eq!(
            token_lifetime(&jwt(serde_json::json!({"exp": now - 1}))),
            Some(Duration::ZERO)
        );
        assert_eq!(token_lifetime(&jwt(serde_json::json!({"sub": "x"}))), None);
        assert_eq!(token_lifetime("not-a-jwt"), None);
        assert_eq!(token_lifetime("a.%%%.c"), None);
    }
}
