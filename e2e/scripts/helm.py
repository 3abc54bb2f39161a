#!/usr/bin/env python3
"""Thin command line over helm-python-sdk (the real Helm v4 engine) for tests and the demo.

Usage (inside the venv from e2e/scripts/setup.sh, KUBECONFIG pointing at the cluster):
  helm.py lint CHART
  helm.py render CHART NAME NAMESPACE [--values FILE]
  helm.py template CHART NAME NAMESPACE [--values FILE]
  helm.py install|upgrade CHART NAME NAMESPACE [--values FILE]
  helm.py uninstall NAME NAMESPACE
  helm.py test NAME NAMESPACE [--timeout SECONDS]   (`helm test --logs`: the hooks' logs included)
`render` prints a JSON map of template path -> rendered text. `template` prints one JSON string:
the multi-document YAML `helm template --include-crds --skip-tests` would print (CRDs first, then every
object in Helm's install order by kind, each preceded by `# Source: <path>`; NOTES.txt and
empty documents left out).
Exit code 0 on success; on failure the Helm error goes to stderr and the exit code is 1.
"""
import argparse
import json
import os
import re
import sys

import helm_python
import yaml


def values_from(path):
    if not path:
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


# Helm's install order by kind (InstallOrder in helm's pkg/release/util/kind_sorter.go): what
# `helm template` prints first is what `kubectl apply -f` of the output creates first.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


def documents(text):
    """The non-empty YAML documents of a multi-document text, as (kind, text)."""
    for doc in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
        obj = yaml.safe_load(doc)
        if obj:
            yield obj.get("kind", ""), doc.strip("\n") + "\n"


def template(chart_path, name, namespace, values):
    chart = helm_python.Chart.load(chart_path)
    out = []
    for crd in sorted(chart.crds, key=lambda c: c["name"]):
        for _, doc in documents(crd["data"]):
            out.append(f"# Source: {chart.name}/{crd['name']}\n{doc}")
    rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    objects = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for kind, doc in documents(rendered[path]):
            # `helm template --skip-tests`: the `helm test` hooks are not for `kubectl apply`.
            hook = ((yaml.safe_load(doc).get("metadata") or {}).get("annotations") or {}).get("helm.sh/hook", "")
            if "test" in [h.strip() for h in hook.split(",")]:
                continue
            objects.append((kind, path, doc))
    rank = {kind: i for i, kind in enumerate(INSTALL_ORDER)}
    # sorted() is stable: within one kind, file order and then document order are kept.
    objects.sort(key=lambda o: rank.get(o[0], len(INSTALL_ORDER)))
    out.extend(f"# Source: {path}\n{doc}" for _, path, doc in objects)
    return "".join(f"---\n{doc}" for doc in out)


def config(namespace):
    return helm_python.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["lint", "render", "template", "install", "upgrade", "uninstall", "test"])
    p.add_argument("args", nargs="+")
    p.add_argument("--values", help="YAML file of values")
    p.add_argument("--timeout", type=int, default=300, help="seconds `test` waits for the hooks")
    a = p.parse_args()
    try:
        if a.action == "lint":
            print(json.dumps(helm_python.lint(a.args[0], values_from(a.values)), default=str))
        elif a.action == "render":
            chart, name, ns = a.args
            rendered = helm_python.Chart.load(chart).render(values_from(a.values), name=name, namespace=ns)
            print(json.dumps(rendered, default=str))
        elif a.action == "template":
            chart, name, ns = a.args
            print(json.dumps(template(chart, name, ns, values_from(a.values))))
        elif a.action in ("install", "upgrade"):
            chart, name, ns = a.args
            cfg = config(ns)
            loaded = helm_python.Chart.load(chart)
            if a.action == "install":
                release = cfg.install(loaded, name, values_from(a.values), namespace=ns, create_namespace=True)
            else:
                release = cfg.upgrade(loaded, name, values_from(a.values), namespace=ns)
            print(json.dumps(release, default=str))
        elif a.action == "test":
            name, ns = a.args
            print(json.dumps(config(ns).test(name, timeout=a.timeout, logs=True), default=str))
        else:
            name, ns = a.args
            print(json.dumps(config(ns).uninstall(name), default=str))
    except helm_python.HelmError as error:
        print(f"helm {a.action} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
