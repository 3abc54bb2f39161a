//! Rules of a gateway that more than one part of the operator follows, each in one place and
//! free of I/O: [`validated`], the validated gateway everything downstream reads, [`image`],
//! which sidecar image the operator lets it have, and what it is derived into — [`sidecar_config`] (the sidecar's file), [`injection`] (the injector's
//! view), [`refs`] (the Secrets it references); [`membership`], which pods belong to it.

pub mod image;
pub mod injection;
pub mod membership;
pub mod refs;
pub mod sidecar_config;
pub mod validated;

pub use image::SidecarImages;
pub use injection::InjectionSettings;
pub use validated::ValidatedGateway;
