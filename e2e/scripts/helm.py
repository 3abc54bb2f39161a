#!/usr/bin/env python3
"""Thin command line over helm-python-sdk (the real Helm v4 engine) for tests and the demo.

Usage (inside the venv from e2e/scripts/setup.sh, KUBECONFIG pointing at the cluster):
  helm.py lint CHART
  helm.py render CHART NAME NAMESPACE [--values FILE]
  helm.py install|upgrade CHART NAME NAMESPACE [--values FILE]
  helm.py uninstall NAME NAMESPACE
Exit code 0 on success; on failure the Helm error goes to stderr and the exit code is 1.
"""
import argparse
import json
import os
import sys

import helm_python
import yaml


def values_from(path):
    if not path:
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


def config(namespace):
    return helm_python.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=namespace)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["lint", "render", "install", "upgrade", "uninstall"])
    p.add_argument("args", nargs="+")
    p.add_argument("--values", help="YAML file of values")
    a = p.parse_args()
    try:
        if a.action == "lint":
            print(json.dumps(helm_python.lint(a.args[0], values_from(a.values)), default=str))
        elif a.action == "render":
            chart, name, ns = a.args
            rendered = helm_python.Chart.load(chart).render(values_from(a.values), name=name, namespace=ns)
            print(json.dumps(rendered, default=str))
        elif a.action in ("install", "upgrade"):
            chart, name, ns = a.args
            cfg = config(ns)
            loaded = helm_python.Chart.load(chart)
            if a.action == "install":
                release = cfg.install(loaded, name, values_from(a.values), namespace=ns, create_namespace=True)
            else:
                release = cfg.upgrade(loaded, name, values_from(a.values), namespace=ns)
            print(json.dumps(release, default=str))
        else:
            name, ns = a.args
            print(json.dumps(config(ns).uninstall(name), default=str))
    except helm_python.HelmError as error:
        print(f"helm {a.action} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
