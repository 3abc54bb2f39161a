//! Webhook certificates without cert-manager.
//!
//! At start the operator calls [`ensure_certificates`]: it loads the CA and serving certificate
//! from one Secret, or creates them (self-signed CA, serving certificate for the webhook
//! Service's DNS names). It then patches `caBundle` into the named webhook configurations
//! ([`patch_ca_bundles`]) and serves with [`CertResolver`]. [`run_rotation`]
//! renews the serving certificate at two thirds of its validity (or when the wanted SANs
//! change), swaps it into the live resolver, and keeps `caBundle` current (a Helm upgrade that
//! resets it is repaired within one check interval). Nothing generated lives in the Helm
//! release, so GitOps tools see no drift.
//!
//! Several replicas cooperate through the Secret: creation races end in `409 AlreadyExists`
//! and renewal races in `409 Conflict`; the loser reloads the winner's Secret. Every serving
//! certificate is signed by the same CA, so whichever one a replica serves is trusted.
//!
//! Validity dates are recorded in Secret annotations (unix seconds) because we issue the
//! certificates ourselves and need no X.509 parser to read them back.
//!
//! Files: [`bundle`] (issuing the CA and serving certificate, their Secret, the `caBundle`
//! patch — pure), [`rotation`] (start-up and renewal against the API server), [`resolver`]
//! (the rustls certificate that can be swapped while serving, used by the webhook and the hub),
//! [`cert_dir`] (a certificate mounted from a Secret, for `--webhook-cert-dir`).

pub mod bundle;
pub mod cert_dir;
pub mod resolver;
pub mod rotation;

pub use bundle::*;
pub use cert_dir::{CertFiles, follow_cert_dir};
pub use resolver::{CertResolver, TlsError, client_config, tls_config};
pub use rotation::*;
