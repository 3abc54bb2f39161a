//! Admission webhooks: `/mutate` injects the nano-agent sidecar into pods, `/validate` checks
//! AgentGateways. The decision is the pure [`inject::inject`]; the HTTP and TLS layers live in
//! [`server`].

pub mod inject;

pub use inject::{
    Decision, HubCaSource, InjectedRecord, Injection, InjectionConfig, InjectorSettings, KeyRef,
    NativeSidecarMode, SidecarResources, SkipReason, inject,
};
