//! Which nano-agent image a gateway's pods get ([`SidecarImages`]). The image runs next to every
//! app pod with the gateway's Secrets, so it is the operator's choice, not the gateway
//! editor's: `spec.sidecar.image` may only name the operator's image (`--sidecar-image`) or one
//! its administrator allows (`--allowed-sidecar-images`). The validating webhook, the injector
//! and the reconciler all ask [`SidecarImages::resolve`]. Pure.
//!
//! An allow-list entry ending in `:`, `@` or `/` is a prefix (`registry/repo:` any tag of that
//! repository, `registry/repo@` any digest of it, `registry/org/` any repository below); any
//! other entry matches only that exact reference. So `ghcr.io/acme/nano-agent` does not let in
//! `ghcr.io/acme/nano-agent-evil`.

use crate::crd::{DEFAULT_SIDECAR_IMAGE, FieldError, LEGACY_DEFAULT_SIDECAR_IMAGE};

/// The field the policy checks.
pub const IMAGE_FIELD: &str = "spec.sidecar.image";

/// The operator's sidecar image policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarImages {
    /// Injected when a gateway names no image (or the old CRD default).
    image: String,
    /// Further images a gateway may name: exact references or prefixes (see the module).
    allowed: Vec<String>,
}

impl Default for SidecarImages {
    /// This release's image, nothing else allowed.
    fn default() -> Self {
        Self {
            image: DEFAULT_SIDECAR_IMAGE.into(),
            allowed: Vec::new(),
        }
    }
}

impl SidecarImages {
    /// The operator's image and allow-list; refuses empty entries and entries with spaces
    /// (a typo there would silently allow nothing, or the operator would inject garbage).
    pub fn new(image: &str, allowed: &[String]) -> Result<Self, String> {
        let bad = |s: &str| s.is_empty() || s.chars().any(char::is_whitespace);
        if bad(image) {
            return Err(format!(
                "--sidecar-image ({image:?}) must be a container image reference without spaces"
            ));
        }
        if let Some(entry) = allowed.iter().find(|e| bad(e)) {
            return Err(format!(
                "--allowed-sidecar-images entry {entry:?} must be an image reference or a prefix ending in ':', '@' or '/', without spaces"
            ));
        }
        Ok(Self {
            image: image.into(),
            allowed: allowed.to_vec(),
        })
    }

    /// The operator's own image.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Whether a gateway may name `image`.
    pub fn allows(&self, image: &str) -> bool {
        image == self.image || self.allowed.iter().any(|entry| matches(entry, image))
    }

    /// The image to inject for a gateway that asks for `requested` (`spec.sidecar.image`), or
    /// the field error naming what to do instead.
    pub fn resolve(&self, requested: Option<&str>) -> Result<String, FieldError> {
        match requested {
            None => Ok(self.image.clone()),
            // Written by the apiserver from the old CRD default, not picked by the editor.
            Some(LEGACY_DEFAULT_SIDECAR_IMAGE) => Ok(self.image.clone()),
            Some(image) if self.allows(image) => Ok(image.into()),
            Some(image) => {
                let allowed = if self.allowed.is_empty() {
                    String::new()
                } else {
                    format!(" or match {}", self.allowed.join(", "))
                };
                Err(FieldError {
                    field: IMAGE_FIELD.into(),
                    message: format!(
                        "{IMAGE_FIELD} ({image:?}) is not an image this operator injects: it must be the operator's image ({}){allowed}; remove the field to get the operator's image, or have the operator's administrator allow it (--allowed-sidecar-images, chart value sidecar.allowedImages)",
                        self.image
                    ),
                })
            }
        }
    }
}

/// Whether allow-list `entry` lets in `image`: a prefix when it ends in `:`, `@` or `/` (and
/// something must follow it), else the exact reference.
pub fn matches(entry: &str, image: &str) -> bool {
    if entry.ends_with([':', '@', '/']) {
        image
            .strip_prefix(entry)
            .is_some_and(|rest| !rest.is_empty())
    } else {
        image == entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_entries_match_only_themselves() {
        assert!(matches(
            "ghcr.io/acme/nano-agent:1.2",
            "ghcr.io/acme/nano-agent:1.2"
        ));
        assert!(!matches(
            "ghcr.io/acme/nano-agent:1.2",
            "ghcr.io/acme/nano-agent:1.20"
        ));
        assert!(!matches(
            "ghcr.io/acme/nano-agent",
            "ghcr.io/acme/nano-agent-evil"
        ));
        assert!(!matches(
            "ghcr.io/acme/nano-agent",
            "ghcr.io/acme/nano-agent:1.2"
        ));
    }

    #[test]
    fn prefix_entries_match_tags_digests_or_repositories_below() {
        let tags = "ghcr.io/acme/nano-agent:";
        assert!(matches(tags, "ghcr.io/acme/nano-agent:1.2"));
        assert!(!matches(tags, "ghcr.io/acme/nano-agent:"));
        assert!(!matches(tags, "ghcr.io/acme/nano-agent-evil:1.2"));
        assert!(!matches(tags, "ghcr.io/acme/nano-agent@sha256:00"));
        let digests = "ghcr.io/acme/nano-agent@";
        assert!(matches(digests, "ghcr.io/acme/nano-agent@sha256:00"));
        assert!(!matches(digests, "ghcr.io/acme/nano-agent:1.2"));
        let org = "ghcr.io/acme/";
        assert!(matches(org, "ghcr.io/acme/nano-agent:1.2"));
        assert!(!matches(org, "ghcr.io/acme-evil/nano-agent:1.2"));
        assert!(!matches(org, "evil.io/ghcr.io/acme/x"));
    }

    #[test]
    fn absent_or_old_default_gets_the_operators_image() {
        let images = SidecarImages::new("mirror.local/nano-agent:0.2.0", &[]).unwrap();
        assert_eq!(
            images.resolve(None).unwrap(),
            "mirror.local/nano-agent:0.2.0"
        );
        assert_eq!(
            images.resolve(Some(LEGACY_DEFAULT_SIDECAR_IMAGE)).unwrap(),
            "mirror.local/nano-agent:0.2.0"
        );
        assert_eq!(
            images
                .resolve(Some("mirror.local/nano-agent:0.2.0"))
                .unwrap(),
            "mirror.local/nano-agent:0.2.0"
        );
    }

    #[test]
    fn allowed_images_are_kept_and_others_refused_naming_the_field() {
        let images = SidecarImages::new(
            DEFAULT_SIDECAR_IMAGE,
            &["registry.example/acme/nano-agent:".into()],
        )
        .unwrap();
        assert_eq!(
            images
                .resolve(Some("registry.example/acme/nano-agent:2.0"))
                .unwrap(),
            "registry.example/acme/nano-agent:2.0"
        );
        let error = images.resolve(Some("evil.example/miner:1")).unwrap_err();
        assert_eq!(error.field, "spec.sidecar.image");
        assert!(
            error.message.contains("\"evil.example/miner:1\"")
                && error.message.contains("remove the field")
                && error.message.contains("--allowed-sidecar-images")
                && error.message.contains("registry.example/acme/nano-agent:"),
            "{}",
            error.message
        );
        // Nothing allowed but the operator's image by default.
        assert!(
            SidecarImages::default()
                .resolve(Some("registry.example/acme/nano-agent:2.0"))
                .is_err()
        );
    }

    #[test]
    fn bad_operator_configuration_is_refused() {
        assert!(SidecarImages::new("", &[]).is_err());
        assert!(SidecarImages::new("a b", &[]).is_err());
        let error = SidecarImages::new(DEFAULT_SIDECAR_IMAGE, &[String::new()]).unwrap_err();
        assert!(error.contains("--allowed-sidecar-images"), "{error}");
    }
}
