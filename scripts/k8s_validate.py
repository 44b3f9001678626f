#!/usr/bin/env python3
"""Checks for scripts/k8s-check.sh, run with the Python of target/tools/venv.

  k8s_validate.py manifests --kube-version V [--kube-version V ...] [--external-secret NAME ...] FILE
      Every object of a rendered overlay (FILE, `kubectl kustomize` output) against the pinned
      Kubernetes JSON schemas of kubernetes-validate in strict mode: an unknown field, a wrong
      type or a missing required field fails, and so does a kind without a schema (the package
      only warns about those). Then the invariants of this deployment: grace periods, replicas,
      pod security, references to ConfigMaps and Secrets, what Redis must guarantee.

  k8s_validate.py alert-tests RULES TESTS
      Every alert of RULES is expected to fire in at least one case of TESTS (promtool unit
      tests), and at least two alerts also have a case where they must not fire.
"""

import argparse
import functools
import sys

import yaml
import kubernetes_validate.utils as kv

# kubernetes-validate reads the (large) schema files again for every object; read each once.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)

GATEWAY = "cloud-gateway"
DEFAULT_SHUTDOWN_GRACE_SECS = 20  # cloud-gateway/src/main.rs, ServeArgs::shutdown_grace_secs


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj):
    return "%s/%s" % (obj.get("kind"), obj.get("metadata", {}).get("name"))


def validate_schemas(objs, versions, errors):
    for version in versions:
        for obj in objs:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append("%s: invalid against Kubernetes %s (strict): %s: %s"
                              % (name_of(obj), version, path or "(top)", e.message))
            except kv.SchemaNotFoundError as e:
                errors.append("%s: %s" % (name_of(obj), e.message))
            except kv.VersionNotSupportedError:
                errors.append("kubernetes-validate does not know Kubernetes %s" % version)
                return


def pod_specs(objs):
    for obj in objs:
        if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]


def env_value(objs, container, name):
    """The value a container gets for `name`: env first, then its envFrom ConfigMaps."""
    for e in container.get("env", []):
        if e.get("name") == name and "value" in e:
            return e["value"]
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef", {}).get("name")
        for obj in objs:
            if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] == ref:
                if name in obj.get("data", {}):
                    return obj["data"][name]
    return None


def check_invariants(objs, external_secrets, errors):
    by_kind = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    deploy = by_kind.get("Deployment", {}).get(GATEWAY)
    if deploy is None:
        errors.append("no Deployment %s" % GATEWAY)
        return
    pod = deploy["spec"]["template"]["spec"]
    gw = next((c for c in pod["containers"] if c["name"] == GATEWAY), None)
    if gw is None:
        errors.append("Deployment %s has no container %s" % (GATEWAY, GATEWAY))
        return

    # SIGTERM comes after preStop; the gateway then drains for WRITEBACK_SHUTDOWN_GRACE_SECS.
    grace = int(env_value(objs, gw, "WRITEBACK_SHUTDOWN_GRACE_SECS") or DEFAULT_SHUTDOWN_GRACE_SECS)
    pre_stop = gw.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps <= pre_stop + grace:
        errors.append("terminationGracePeriodSeconds %d must exceed preStop %d s + "
                      "WRITEBACK_SHUTDOWN_GRACE_SECS %d s" % (tgps, pre_stop, grace))
    for var in ("WRITEBACK_REPLICA_ID",):
        if not any(e.get("name") == var and (e.get("value") == "$(POD_NAME)" or
                   e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name")
                   for e in gw.get("env", [])):
            errors.append("%s is not the pod name" % var)
    for var in ("REDIS_URL",):
        if not any(e.get("name") == var and "secretKeyRef" in e.get("valueFrom", {})
                   for e in gw.get("env", [])):
            errors.append("%s must come from a Secret" % var)

    # Replicas: the HPA owns the count, at least 3; a PDB covers the gateway pods.
    labels = deploy["spec"]["template"]["metadata"].get("labels", {})
    hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", {}).values()
            if h["spec"]["scaleTargetRef"].get("name") == GATEWAY]
    if not hpas or any(h["spec"].get("minReplicas", 1) < 3 for h in hpas):
        errors.append("a HorizontalPodAutoscaler with minReplicas >= 3 must target %s" % GATEWAY)
    if deploy["spec"].get("replicas", 3) < 3:
        errors.append("Deployment %s has fewer than 3 replicas" % GATEWAY)
    if not any(set(p["spec"]["selector"].get("matchLabels", {}).items()) <= set(labels.items())
               for p in by_kind.get("PodDisruptionBudget", {}).values()):
        errors.append("no PodDisruptionBudget selects the %s pods" % GATEWAY)
    for probe in ("readinessProbe", "livenessProbe"):
        command = gw.get(probe, {}).get("exec", {}).get("command", [])
        if command[:2] != ["/usr/local/bin/cloud-gateway", "health"]:
            errors.append("%s of %s is not a grpc.health.v1 check" % (probe, GATEWAY))

    # Metrics: the address the gateway listens on, the container port named "metrics", the
    # scrape annotations, the scrape job and the NetworkPolicy agree.
    listen = env_value(objs, gw, "WRITEBACK_METRICS_LISTEN")
    ports = {p.get("name"): p["containerPort"] for p in gw.get("ports", [])}
    port = ports.get("metrics")
    if listen is None or port is None or not listen.endswith(":%d" % port):
        errors.append("WRITEBACK_METRICS_LISTEN %r does not match the container port named "
                      "metrics (%r)" % (listen, port))
    ann = deploy["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/port") != str(port) or ann.get("prometheus.io/path") != "/metrics":
        errors.append("prometheus.io/port and /path annotations do not match the metrics port")
    grpc_listen = env_value(objs, gw, "WRITEBACK_LISTEN")
    if grpc_listen is None or not grpc_listen.endswith(":%s" % ports.get("grpc")):
        errors.append("WRITEBACK_LISTEN %r does not match the container port named grpc" % grpc_listen)
    scrape = by_kind.get("ConfigMap", {}).get("writeback-prometheus-scrape")
    if scrape is None:
        errors.append("no ConfigMap writeback-prometheus-scrape")
    else:
        jobs = yaml.safe_load(scrape["data"]["prometheus-scrape.yml"])
        job = next((j for j in jobs if j.get("job_name") == GATEWAY), None)
        keep = "%s;metrics" % labels.get("app.kubernetes.io/name")
        if job is None or job.get("metrics_path") != "/metrics" or not any(
                r.get("action") == "keep" and r.get("regex") == keep
                for r in job.get("relabel_configs", [])) or not any(
                deploy["metadata"]["namespace"] in sd.get("namespaces", {}).get("names", [])
                for sd in job.get("kubernetes_sd_configs", [])):
            errors.append("the scrape job %s does not select the pods' metrics port in "
                          "namespace %s" % (GATEWAY, deploy["metadata"].get("namespace")))
    policy = by_kind.get("NetworkPolicy", {}).get(GATEWAY)
    allowed = {p.get("port") for r in (policy or {}).get("spec", {}).get("ingress", [])
               for p in r.get("ports", [])}
    for n in ("grpc", "metrics"):
        if ports.get(n) not in allowed:
            errors.append("NetworkPolicy %s does not let in port %s (%s)" % (GATEWAY, n, ports.get(n)))

    # Every pod: non-root, RuntimeDefault seccomp, read-only root, no privilege, no capability.
    for owner, tmpl in pod_specs(objs):
        spec = tmpl["spec"]
        psc = spec.get("securityContext", {})
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            errors.append("%s: seccompProfile must be RuntimeDefault" % name_of(owner))
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = "%s container %s" % (name_of(owner), c["name"])
            if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                errors.append("%s: runAsNonRoot must be true" % where)
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append("%s: readOnlyRootFilesystem must be true" % where)
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append("%s: allowPrivilegeEscalation must be false" % where)
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                errors.append("%s: capabilities must drop ALL" % where)
            if "limits" not in c.get("resources", {}) or "requests" not in c.get("resources", {}):
                errors.append("%s: needs resource requests and limits" % where)
        # References: each ConfigMap and Secret a pod uses exists, or is created by the operator.
        refs = []
        for v in spec.get("volumes", []):
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"], v["secret"].get("optional")))
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"], v["configMap"].get("optional")))
        for c in spec["containers"]:
            for e in c.get("env", []):
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = e.get("valueFrom", {}).get(key)
                    if ref:
                        refs.append((kind, ref["name"], ref.get("optional")))
            for src in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in src:
                        refs.append((kind, src[key]["name"], src[key].get("optional")))
        for kind, ref, optional in refs:
            if ref in by_kind.get(kind, {}) or optional:
                continue
            if kind == "Secret" and ref in external_secrets:
                continue
            errors.append("%s uses %s %s, which is neither rendered nor an expected external "
                          "Secret" % (name_of(owner), kind, ref))
    for s in external_secrets:
        if s in by_kind.get("Secret", {}):
            errors.append("Secret %s is expected to be created outside the overlay" % s)

    # What the gateway needs from a Redis it is deployed with (k8s/README.md).
    for cm in by_kind.get("ConfigMap", {}).values():
        conf = cm.get("data", {}).get("redis.conf")
        if conf is None:
            continue
        settings = {}
        for line in conf.splitlines():
            parts = line.split(None, 1)
            if parts and not parts[0].startswith("#"):
                settings[parts[0].lower()] = parts[1].strip() if len(parts) > 1 else ""
        for key, want in (("appendonly", "yes"), ("appendfsync", "always"),
                          ("maxmemory-policy", "noeviction")):
            if settings.get(key) != want:
                errors.append("ConfigMap %s: redis.conf must set %s %s (has %r)"
                              % (cm["metadata"]["name"], key, want, settings.get(key)))


def check_alert_tests(rules_path, tests_path, errors):
    with open(rules_path) as f:
        rules = yaml.safe_load(f)
    with open(tests_path) as f:
        tests = yaml.safe_load(f)
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    fires, quiet = set(), set()
    for t in tests.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    for a in alerts:
        if a not in fires:
            errors.append("%s: alert %s is never expected to fire in %s" % (rules_path, a, tests_path))
    unknown = (fires | quiet) - set(alerts)
    if unknown:
        errors.append("%s tests alerts that %s does not define: %s"
                      % (tests_path, rules_path, ", ".join(sorted(unknown))))
    if len(quiet & set(alerts)) < 2:
        errors.append("%s: fewer than two alerts have a case where they must not fire" % tests_path)
    return len(alerts), len(quiet & set(alerts))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--kube-version", action="append", required=True)
    m.add_argument("--external-secret", action="append", default=[])
    m.add_argument("file")
    a = sub.add_parser("alert-tests")
    a.add_argument("rules")
    a.add_argument("tests")
    args = ap.parse_args()

    errors = []
    if args.cmd == "manifests":
        objs = load(args.file)
        validate_schemas(objs, args.kube_version, errors)
        check_invariants(objs, set(args.external_secret), errors)
        summary = "%d objects valid against Kubernetes %s (strict), invariants hold" % (
            len(objs), " and ".join(args.kube_version))
    else:
        n, q = check_alert_tests(args.rules, args.tests, errors)
        summary = "each of the %d alerts fires in a test; %d also have a must-not-fire case" % (n, q)
    for e in errors:
        print("ERROR %s" % e)
    if errors:
        return 1
    print("%s: %s" % (args.file if args.cmd == "manifests" else args.tests, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
