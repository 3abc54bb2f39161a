//! Agent authentication: the AgentHello credentials are the pod's projected service-account
//! token (audience `nanogate-hub`); a TokenReview proves it, and the pod it is bound to must be
//! the one the agent claims to be and must be injected for an existing gateway.

use std::future::Future;

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
