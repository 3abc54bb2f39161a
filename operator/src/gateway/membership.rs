//! Which pods belong to which gateway, from their annotations (and the `nanogate.io/inject`
//! label) and their namespace's label.
//!
//! The injector applies these rules at admission (opt-in, then the gateway the pod names or its
//! namespace's only one), the reconciler replays them to count a gateway's pods ([`belongs`]),
//! and the controller's pod watch maps a pod to the gateways to recount ([`to_recount`]). A rule
//! of membership changes here, once. Pure: metadata in, a decision out.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::names::{
    GATEWAY_ANNOTATION, INJECT_ANNOTATION, INJECTED_ANNOTATION, NAMESPACE_INJECTION_ENABLED,
    NAMESPACE_INJECTION_LABEL,
};

type Annotations = BTreeMap<String, String>;

fn annotation<'a>(annotations: Option<&'a Annotations>, key: &str) -> Option<&'a str> {
    annotations.and_then(|a| a.get(key)).map(|v| v.trim())
}

/// The value of the `nanogate.io/injected` annotation: what the injector put into a pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InjectedRecord {
    pub gateway: String,
    pub generation: i64,
    #[serde(
        default,
        rename = "configHash",
        skip_serializing_if = "Option::is_none"
    )]
    pub config_hash: Option<String>,
    /// `native` or `legacy`.
    pub mode: String,
    /// Whether the sidecar waits for the app containers to finish and then exits (legacy
    /// mode, a pod that runs to completion): the hub looks at the whole pod only for these.
    /// `None` in records of operators before 0.2.
    #[serde(
        default,
        rename = "awaitsApps",
        skip_serializing_if = "Option::is_none"
    )]
    pub awaits_apps: Option<bool>,
    /// The nano-agent image injected. `None` in records of operators before 0.2: such a
    /// sidecar counts as outdated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// [`crate::gateway::InjectionSettings::pod_hash`] at injection: the gateway's settings
    /// written into the pod's spec (resources, log level, admin port, socket, Secrets, TCP
    /// listener). `None` in records of earlier operators: such a sidecar is judged by its image.
    #[serde(default, rename = "podHash", skip_serializing_if = "Option::is_none")]
    pub pod_hash: Option<String>,
}

/// Why an injected sidecar differs from what the injector puts into a new pod now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outdated {
    /// It runs another image (`None`: unknown, a record without one).
    Image(Option<String>),
    /// Same image, but the gateway's pod settings changed since (a restart applies them;
    /// the configuration file itself reaches running sidecars without one).
    PodSettings,
}

impl InjectedRecord {
    /// The record in a pod's annotation value (`None`: not JSON, e.g. of a very old injector).
    pub fn parse(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// The record of an injected pod.
    pub fn of(annotations: Option<&Annotations>) -> Option<Self> {
        annotations
            .and_then(|a| a.get(INJECTED_ANNOTATION))
            .and_then(|value| Self::parse(value))
    }

    /// How this sidecar differs from one injected now with `image` and `pod_hash`; `None`
    /// when it is current.
    pub fn outdated(&self, image: &str, pod_hash: &str) -> Option<Outdated> {
        if self.image.as_deref() != Some(image) {
            Some(Outdated::Image(self.image.clone()))
        } else if self.pod_hash.as_deref().is_some_and(|h| h != pod_hash) {
            Some(Outdated::PodSettings)
        } else {
            None
        }
    }
}

/// A value of `nanogate.io/inject` (trimmed, any case): `true`/`yes`/`enabled`/`on` opt in,
/// `false`/`no`/`disabled`/`off` opt out; anything else is `None` (not understood).
pub fn parse_inject_value(value: &str) -> Option<bool> {
    const YES: [&str; 4] = ["true", "yes", "enabled", "on"];
    const NO: [&str; 4] = ["false", "no", "disabled", "off"];
    let value = value.trim();
    if YES.iter().any(|y| value.eq_ignore_ascii_case(y)) {
        Some(true)
    } else if NO.iter().any(|n| value.eq_ignore_ascii_case(n)) {
        Some(false)
    } else {
        None
    }
}

/// The pod's `nanogate.io/inject` values: its annotation, then its label (the label is what
/// the chart's label-only injection webhook selects with an `objectSelector`).
fn inject_values(meta: &ObjectMeta) -> impl Iterator<Item = &str> {
    [meta.annotations.as_ref(), meta.labels.as_ref()]
        .into_iter()
        .filter_map(|m| annotation(m, INJECT_ANNOTATION))
}

/// The `nanogate.io/inject` value (annotation, else label) of a pod when it is set but not
/// understood (the webhook warns and does not inject).
pub fn unrecognised_inject_value(meta: &ObjectMeta) -> Option<&str> {
    inject_values(meta).find(|v| parse_inject_value(v).is_none())
}

/// The pod's own choice from `nanogate.io/inject`, as an annotation or a label
/// ([`parse_inject_value`]): `Some(true)` opts in (either says yes, neither says otherwise),
/// `Some(false)` opts out and always wins over the namespace label — so does a value that is
/// not understood, which is never injected, and so does an opt-out by either of the two — and
/// `None` (neither set) leaves it to the namespace label.
pub fn pod_opt_in(meta: &ObjectMeta) -> Option<bool> {
    inject_values(meta)
        .map(|v| parse_inject_value(v).unwrap_or(false))
        .reduce(|a, b| a && b)
}

/// The annotation alone ([`pod_opt_in`] without the label), for [`pod_gateway`].
fn annotation_opt_in(annotations: Option<&Annotations>) -> Option<bool> {
    annotation(annotations, INJECT_ANNOTATION).map(|v| parse_inject_value(v).unwrap_or(false))
}

/// Whether the namespace's labels opt all its pods in (`nanogate.io/injection=enabled`).
pub fn namespace_opted_in(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(NAMESPACE_INJECTION_LABEL))
        .is_some_and(|v| v == NAMESPACE_INJECTION_ENABLED)
}

/// Whether a pod asks for a sidecar: its own annotation or label, else its namespace's label.
pub fn opts_in(meta: &ObjectMeta, namespace_opted_in: bool) -> bool {
    pod_opt_in(meta).unwrap_or(namespace_opted_in)
}

/// The gateway a pod names with `nanogate.io/gateway` (trimmed; empty names none).
pub fn requested_gateway(annotations: Option<&Annotations>) -> Option<&str> {
    annotation(annotations, GATEWAY_ANNOTATION).filter(|g| !g.is_empty())
}

/// Whether the injector has recorded an injection on the pod (`nanogate.io/injected`).
pub fn is_injected(annotations: Option<&Annotations>) -> bool {
    annotations.is_some_and(|a| a.contains_key(INJECTED_ANNOTATION))
}

/// Why no gateway could be chosen for a pod that opted in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoGateway {
    /// The gateway the pod names does not exist, or (`None`) the namespace has none.
    Missing(Option<String>),
    /// Several gateways and the pod names none of them (sorted names).
    Ambiguous(Vec<String>),
}

/// The gateway of a pod that opted in: the one it names, else the namespace's only one.
pub fn choose<'g, G>(
    requested: Option<&str>,
    gateways: &'g [G],
    name: impl Fn(&G) -> &str,
) -> Result<&'g G, NoGateway> {
    match requested {
        Some(wanted) => gateways
            .iter()
            .find(|g| name(g) == wanted)
            .ok_or_else(|| NoGateway::Missing(Some(wanted.to_string()))),
        None => match gateways {
            [] => Err(NoGateway::Missing(None)),
            [only] => Ok(only),
            many => {
                let mut candidates: Vec<String> =
                    many.iter().map(|g| name(g).to_string()).collect();
                candidates.sort();
                Err(NoGateway::Ambiguous(candidates))
            }
        },
    }
}

/// Which gateway an injected or opted-in pod belongs to, from its annotations:
/// `nanogate.io/gateway`, else the gateway recorded in `nanogate.io/injected`
/// (`{"gateway":"x",…}` JSON, or `x` / `x/<hash>` / `gateway=x,…`). Pods opted out or neither
/// injected nor opted in belong to none.
pub fn pod_gateway(annotations: &Annotations) -> Option<String> {
    let injected = annotations.get(INJECTED_ANNOTATION);
    if injected.is_none() && annotation_opt_in(Some(annotations)) != Some(true) {
        return None;
    }
    if let Some(g) = requested_gateway(Some(annotations)) {
        return Some(g.to_string());
    }
    let v = injected?.trim();
    if v.starts_with('{') {
        return serde_json::from_str::<serde_json::Value>(v)
            .ok()?
            .get("gateway")?
            .as_str()
            .map(str::to_string);
    }
    if let Some(kv) = v.split(',').find_map(|p| p.trim().strip_prefix("gateway=")) {
        return Some(kv.to_string());
    }
    let name = v.split('/').next()?.trim();
    (!name.is_empty() && name != "true").then(|| name.to_string())
}

/// What decides pod membership besides the pod's own annotations.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scope {
    /// The namespace carries `nanogate.io/injection=enabled`.
    pub namespace_opted_in: bool,
    /// The gateway is its namespace's only one (pods naming no gateway get it).
    pub only_gateway: bool,
}

/// Whether the pod expects a sidecar of gateway `name` — the webhook's decision, replayed.
pub fn belongs(meta: &ObjectMeta, name: &str, scope: Scope) -> bool {
    if meta.deletion_timestamp.is_some() {
        return false;
    }
    let annotations = meta.annotations.as_ref();
    if is_injected(annotations) {
        return annotations.and_then(pod_gateway).is_some_and(|g| g == name);
    }
    if !opts_in(meta, scope.namespace_opted_in) {
        return false;
    }
    match requested_gateway(annotations) {
        Some(gateway) => gateway == name,
        None => scope.only_gateway,
    }
}

/// The gateways whose pod counts a change of a pod may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recount {
    /// The gateway the pod belongs to (same namespace).
    Gateway(String),
    /// Every gateway of the pod's namespace: a pod that opted in naming no gateway may still
    /// expect the namespace's only one (admitted while the webhook was down, or opted in by
    /// the namespace label).
    Namespace,
    /// None: the pod opted out, or neither it nor its namespace opted in. Most pods of a
    /// cluster are here, so they cost the controller no reconcile.
    Nothing,
}

/// Which gateways to recount when a pod changes; `namespace_opted_in` is its namespace's
/// `nanogate.io/injection=enabled`. Mirrors [`belongs`]: a pod this maps to `Nothing` belongs
/// to no gateway, and one that names its gateway requeues that one only.
pub fn to_recount(meta: &ObjectMeta, namespace_opted_in: bool) -> Recount {
    let annotations = meta.annotations.as_ref();
    if let Some(gateway) = annotations.and_then(pod_gateway) {
        return Recount::Gateway(gateway);
    }
    if !opts_in(meta, namespace_opted_in) {
        return Recount::Nothing;
    }
    match requested_gateway(annotations) {
        Some(gateway) => Recount::Gateway(gateway.to_string()),
        None => Recount::Namespace,
    }
}

/// A pod's metadata with `name` and `annotations`, for tests of membership rules.
#[cfg(test)]
pub(crate) fn test_pod(name: &str, annotations: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        annotations: Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::test_pod as pod;
    use super::*;

    #[test]
    fn namespace_label_and_only_gateway_decide_like_the_webhook() {
        let plain = pod("plain", &[]);
        let opted = pod("opted", &[("nanogate.io/inject", "TRUE")]);
        let out = pod("out", &[("nanogate.io/inject", "false")]);
        let elsewhere = pod("elsewhere", &[("nanogate.io/gateway", "other")]);
        let both = Scope {
            namespace_opted_in: true,
            only_gateway: true,
        };
        assert!(belongs(&plain, "shop", both));
        assert!(!belongs(
            &plain,
            "shop",
            Scope {
                namespace_opted_in: false,
                ..both
            }
        ));
        assert!(!belongs(
            &plain,
            "shop",
            Scope {
                only_gateway: false,
                ..both
            }
        ));
        assert!(belongs(
            &opted,
            "shop",
            Scope {
                namespace_opted_in: false,
                ..both
            }
        ));
        assert!(!belongs(&out, "shop", both));
        assert!(!belongs(&elsewhere, "shop", both));
        let mut gone = opted.clone();
        gone.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(!belongs(&gone, "shop", both));
    }

    #[test]
    fn inject_values_and_an_explicit_opt_out_wins_over_the_namespace() {
        for yes in ["true", "TRUE", " yes ", "Enabled", "on"] {
            assert_eq!(parse_inject_value(yes), Some(true), "{yes}");
        }
        for no in ["false", "No", "DISABLED", "off"] {
            assert_eq!(parse_inject_value(no), Some(false), "{no}");
        }
        for odd in ["", "1", "y", "sure", "enable"] {
            assert_eq!(parse_inject_value(odd), None, "{odd:?}");
        }
        let both = Scope {
            namespace_opted_in: true,
            only_gateway: true,
        };
        for out in ["no", "No", "disabled", "off", "maybe"] {
            let meta = pod("p", &[("nanogate.io/inject", out)]);
            assert!(!belongs(&meta, "shop", both), "{out}");
            assert!(!opts_in(&meta, true), "{out}");
        }
        let maybe = pod("p", &[("nanogate.io/inject", "maybe")]);
        assert_eq!(unrecognised_inject_value(&maybe), Some("maybe"));
        let yes = pod("p", &[("nanogate.io/inject", "yes")]);
        assert_eq!(unrecognised_inject_value(&yes), None);
        assert!(opts_in(&yes, false));
    }

    #[test]
    fn a_changed_pod_recounts_its_gateway_its_namespace_or_nothing() {
        let a = |pairs: &[(&str, &str)]| pod("p", pairs);
        for ns_opted_in in [false, true] {
            assert_eq!(
                to_recount(
                    &a(&[("nanogate.io/inject", "true"), ("nanogate.io/gateway", "g")]),
                    ns_opted_in
                ),
                Recount::Gateway("g".into())
            );
            assert_eq!(
                to_recount(
                    &a(&[("nanogate.io/injected", r#"{"gateway":"g"}"#)]),
                    ns_opted_in
                ),
                Recount::Gateway("g".into()),
                "an injected pod recounts its own gateway only"
            );
            assert_eq!(
                to_recount(&a(&[("nanogate.io/inject", " False ")]), ns_opted_in),
                Recount::Nothing
            );
            assert_eq!(
                to_recount(&a(&[("nanogate.io/inject", "yes")]), ns_opted_in),
                Recount::Namespace
            );
        }
        // A pod with nothing of ours in a namespace that did not opt in is no one's.
        assert_eq!(to_recount(&a(&[]), false), Recount::Nothing);
        assert_eq!(to_recount(&ObjectMeta::default(), false), Recount::Nothing);
        assert_eq!(
            to_recount(&a(&[("nanogate.io/gateway", "g")]), false),
            Recount::Nothing,
            "naming a gateway without opting in is not membership"
        );
        // In an opted-in namespace: its only gateway, or the one it names.
        assert_eq!(to_recount(&a(&[]), true), Recount::Namespace);
        assert_eq!(to_recount(&ObjectMeta::default(), true), Recount::Namespace);
        assert_eq!(
            to_recount(&a(&[("nanogate.io/gateway", "g")]), true),
            Recount::Gateway("g".into())
        );
    }

    /// `to_recount` never skips a pod that `belongs` counts (else a count would go stale).
    #[test]
    fn every_pod_that_belongs_is_recounted() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("nanogate.io/inject", "true")],
            &[("nanogate.io/inject", "off")],
            &[("nanogate.io/inject", "maybe")],
            &[("nanogate.io/gateway", "shop")],
            &[("nanogate.io/gateway", "other")],
            &[
                ("nanogate.io/inject", "true"),
                ("nanogate.io/gateway", "shop"),
            ],
            &[("nanogate.io/injected", "shop/abc")],
            &[("nanogate.io/injected", "other/abc")],
        ];
        for pairs in cases {
            let meta = pod("p", pairs);
            for namespace_opted_in in [false, true] {
                for only_gateway in [false, true] {
                    let scope = Scope {
                        namespace_opted_in,
                        only_gateway,
                    };
                    if !belongs(&meta, "shop", scope) {
                        continue;
                    }
                    let recount = to_recount(&meta, namespace_opted_in);
                    assert!(
                        matches!(&recount, Recount::Namespace)
                            || recount == Recount::Gateway("shop".into()),
                        "{pairs:?} {scope:?}: {recount:?}"
                    );
                }
            }
        }
    }

    /// A pod labelled `nanogate.io/inject: "true"` (what the chart's label-only webhook selects)
    /// opts in like the annotation; an opt-out by either, or a value of either that is not
    /// understood, wins.
    #[test]
    fn the_inject_label_opts_in_like_the_annotation_and_an_opt_out_by_either_wins() {
        let labelled = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| {
            let mut meta = pod("p", annotations);
            meta.labels = Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            meta
        };
        let alone = Scope {
            namespace_opted_in: false,
            only_gateway: true,
        };
        let yes = labelled(&[("nanogate.io/inject", "true")], &[]);
        assert_eq!(pod_opt_in(&yes), Some(true));
        assert!(opts_in(&yes, false));
        assert!(belongs(&yes, "shop", alone));
        assert_eq!(to_recount(&yes, false), Recount::Namespace);
        let named = labelled(
            &[("nanogate.io/inject", "true")],
            &[("nanogate.io/gateway", "shop")],
        );
        assert_eq!(to_recount(&named, false), Recount::Gateway("shop".into()));
        assert!(belongs(&named, "shop", Scope::default()));
        // Both say yes: in.
        let both = labelled(
            &[("nanogate.io/inject", "true")],
            &[("nanogate.io/inject", "yes")],
        );
        assert_eq!(pod_opt_in(&both), Some(true));
        // Either says no: out, even in an opted-in namespace.
        for (label, annotation) in [("true", "false"), ("false", "true"), ("off", "")] {
            let annotations: &[(&str, &str)] = if annotation.is_empty() {
                &[]
            } else {
                &[("nanogate.io/inject", annotation)]
            };
            let meta = labelled(&[("nanogate.io/inject", label)], annotations);
            assert_eq!(pod_opt_in(&meta), Some(false), "{label} {annotation}");
            assert!(!opts_in(&meta, true), "{label} {annotation}");
            assert!(!belongs(
                &meta,
                "shop",
                Scope {
                    namespace_opted_in: true,
                    only_gateway: true
                }
            ));
            assert_eq!(to_recount(&meta, true), Recount::Nothing);
        }
        // A label value that is not understood is reported like an annotation's.
        let odd = labelled(&[("nanogate.io/inject", "maybe")], &[]);
        assert_eq!(unrecognised_inject_value(&odd), Some("maybe"));
        assert_eq!(pod_opt_in(&odd), Some(false));
        // Other labels are not an opt-in.
        let other = labelled(&[("app", "shop")], &[]);
        assert_eq!(pod_opt_in(&other), None);
        assert!(!belongs(&other, "shop", alone));
    }

    #[test]
    fn the_gateway_is_the_named_one_or_the_only_one() {
        let gateways =
            |names: &[&str]| -> Vec<String> { names.iter().map(|n| n.to_string()).collect() };
        let pick = |requested: Option<&str>, names: &[&str]| {
            choose(requested, &gateways(names), String::as_str).cloned()
        };
        assert_eq!(pick(Some("b"), &["a", "b"]), Ok("b".to_string()));
        assert_eq!(
            pick(Some("c"), &["a"]),
            Err(NoGateway::Missing(Some("c".into())))
        );
        assert_eq!(pick(None, &["a"]), Ok("a".to_string()));
        assert_eq!(pick(None, &[]), Err(NoGateway::Missing(None)));
        assert_eq!(
            pick(None, &["b", "a"]),
            Err(NoGateway::Ambiguous(vec!["a".into(), "b".into()]))
        );
    }
}
