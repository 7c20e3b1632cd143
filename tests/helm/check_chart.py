#!/usr/bin/env python3
"""Checks the Helm chart offline, with Helm's own Go SDK (helm-python-sdk) and the
Kubernetes OpenAPI schemas (kubernetes-validate):

  python3 check_chart.py CHART_DIR REPO_ROOT OUT_DIR

For every helm/mailgate/ci/*-values.yaml: lint (strict), render, a client-side dry-run
install, every rendered object validated strictly against the Kubernetes schemas of the
oldest and newest supported versions (CRD kinds checked by hand), and assertions on
what the objects must say (ports against the ConfigMap's TOML, security contexts,
probes, Secret mounts, the dashboard and alert rules against deploy/, and the chart's
files/ as byte-equal copies of deploy/'s). Values the chart must refuse are refused with a
message naming the problem. README.md's parameters table must be what Bitnami's readme
generator (installed by scripts/test.sh) makes from values.yaml.

For the server-side check (`mailgate check-config`, run by tests/integration/helm.rs),
each values file's mailgate.toml is written to OUT_DIR/NAME/mailgate.toml with every
/etc/mailgate and /var/lib/mailgate path moved under OUT_DIR/NAME/root, beside a
needs.json listing the files the config names and the container's environment.
Exits non-zero with every failure listed; never skips.
"""
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import helm_python as helm
import kubernetes_validate
import yaml

RELEASE = "mg"
NAMESPACE = "mail"
# kubeVersion in Chart.yaml is >=1.27; the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
# Kinds whose CRDs offline validation cannot know, checked structurally below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "Issuer"}
MOUNT_ROOTS = ("/etc/mailgate", "/var/lib/mailgate")

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def check(condition, where, message):
    if not condition:
        fail(where, message)
    return condition


def docs(manifests):
    """Parses rendered templates (path -> text) into objects, keeping their source."""
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((path, doc))
    return objects


def find(objects, kind, name=None):
    return [o for _, o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind, name, where):
    found = find(objects, kind, name)
    check(len(found) == 1, where, f"expected one {kind} {name}, found {len(found)}")
    return found[0] if found else None


def port_of(listen):
    """The port of a listen address ("0.0.0.0:1110", "[::]:995"); None when off."""
    if not listen:
        return None
    return int(listen.rsplit(":", 1)[1])


def validate_schema(objects, where):
    for path, obj in objects:
        kind = obj.get("kind")
        label = f"{where} {path} {kind}/{obj.get('metadata', {}).get('name')}"
        if kind in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(label, f"Kubernetes {version} schema: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(label, f"no Kubernetes {version} schema: {e.message}")


def check_crds(objects, values, where, repo):
    metrics = values.get("metrics", {})
    monitors = find(objects, "ServiceMonitor")
    rules = find(objects, "PrometheusRule")
    dashboards = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    check(len(monitors) == int(bool(metrics.get("serviceMonitor", {}).get("enabled"))), where, "ServiceMonitor follows metrics.serviceMonitor.enabled")
    check(len(rules) == int(bool(metrics.get("prometheusRule", {}).get("enabled"))), where, "PrometheusRule follows metrics.prometheusRule.enabled")
    check(len(dashboards) == int(bool(metrics.get("dashboard", {}).get("enabled"))), where, "dashboard ConfigMap follows metrics.dashboard.enabled")
    for m in monitors:
        check(m["apiVersion"] == "monitoring.coreos.com/v1", where, "ServiceMonitor apiVersion")
        endpoints = m["spec"]["endpoints"]
        check([e["port"] for e in endpoints] == ["metrics"] and endpoints[0]["path"] == "/metrics", where, "ServiceMonitor scrapes port metrics at /metrics")
        selected = [s for s in find(objects, "Service") if all(s["metadata"]["labels"].get(k) == v for k, v in m["spec"]["selector"]["matchLabels"].items())]
        check(len(selected) == 1 and any(p["name"] == "metrics" for p in selected[0]["spec"]["ports"]), where, "the ServiceMonitor selects exactly the metrics Service")
        check(m["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE], where, "ServiceMonitor looks in the release namespace")
        for k, v in metrics["serviceMonitor"].get("labels", {}).items():
            check(m["metadata"]["labels"].get(k) == v, where, f"ServiceMonitor label {k}")
    expected_rules = yaml.safe_load(open(os.path.join(repo, "deploy/prometheus/alerts.yaml")))["groups"]
    for r in rules:
        check(r["apiVersion"] == "monitoring.coreos.com/v1", where, "PrometheusRule apiVersion")
        check(r["spec"]["groups"] == expected_rules, where, "PrometheusRule groups differ from deploy/prometheus/alerts.yaml")
        check(sum(len(g["rules"]) for g in r["spec"]["groups"]) >= 10, where, "PrometheusRule has the alerts")
    dashboard = json.load(open(os.path.join(repo, "deploy/grafana/mailgate.json")))
    for d in dashboards:
        check(d["data"] and json.loads(d["data"]["mailgate.json"]) == dashboard, where, "dashboard ConfigMap JSON differs from deploy/grafana/mailgate.json")
        for k, v in metrics["dashboard"].get("labels", {}).items():
            check(d["metadata"]["labels"].get(k) == v, where, f"dashboard label {k} (Grafana's sidecar picks it by label)")
        if metrics["dashboard"].get("namespace"):
            check(d["metadata"]["namespace"] == metrics["dashboard"]["namespace"], where, "dashboard namespace")
    # The cluster's own Certificates and Issuers are check_cluster's.
    certs = [c for c in find(objects, "Certificate") if not is_cluster_object(c)]
    check(all(is_cluster_object(i) for i in find(objects, "Issuer")), where, "Issuers outside cluster mode")
    cm = values.get("tls", {}).get("certManager", {})
    for c in certs:
        spec = c["spec"]
        check(c["apiVersion"] == "cert-manager.io/v1", where, "Certificate apiVersion")
        check(spec.get("secretName") and spec.get("dnsNames") and spec["issuerRef"]["name"] == cm["issuerRef"]["name"], where, f"Certificate {c['metadata']['name']} has secretName, dnsNames and the issuer")
        check(set(spec) <= {"secretName", "dnsNames", "duration", "renewBefore", "privateKey", "usages", "issuerRef"}, where, f"unknown Certificate fields {sorted(spec)}")
    if not cm.get("enabled"):
        check(not certs, where, "Certificates without tls.certManager.enabled")
    return certs


def is_cluster_object(obj):
    return obj["metadata"]["labels"].get("app.kubernetes.io/component") == "cluster"


def check_pod(spec, where, name):
    """Every container non-root, read-only root, no escalation, no capabilities, seccomp."""
    pod_sc = spec.get("securityContext", {})
    check(pod_sc.get("runAsNonRoot") is True, where, f"{name}: pod runAsNonRoot")
    check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where, f"{name}: pod seccomp RuntimeDefault")
    check(spec.get("automountServiceAccountToken") is False, where, f"{name}: no service account token")
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        label = f"{name}/{c['name']}"
        check(sc.get("allowPrivilegeEscalation") is False, where, f"{label}: allowPrivilegeEscalation false")
        check(sc.get("readOnlyRootFilesystem") is True, where, f"{label}: readOnlyRootFilesystem")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc["capabilities"].get("add"), where, f"{label}: drops ALL capabilities, adds none")
        check(sc.get("privileged") is not True, where, f"{label}: not privileged")
        check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where, f"{label}: runAsNonRoot")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        check(isinstance(uid, int) and uid > 0, where, f"{label}: a non-zero runAsUser")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        check(seccomp.get("type") == "RuntimeDefault", where, f"{label}: seccomp RuntimeDefault")


def check_redis(objects, deployment, values, where):
    """The in-chart Redis keeps its append-only file (the domains' homes in cluster mode)
    on a claim that outlives the release, or on an emptyDir when persistence is off."""
    spec = deployment["spec"]["template"]["spec"]
    check_pod(spec, where, "redis")
    (redis,) = spec["containers"]
    script = " ".join(redis["command"])
    check("--appendonly yes" in script and "--maxmemory-policy noeviction" in script, where, "Redis writes an append-only file and evicts nothing")
    check("requirepass" in script and "/data/" not in script.split("exec")[0], where, "the Redis password file is written off the data volume")
    check(deployment["spec"]["strategy"]["type"] == "Recreate", where, "one Redis pod at a time")
    persistence = values.get("redis", {}).get("internal", {}).get("persistence", {})
    data = {v["name"]: v for v in spec["volumes"]}.get("data", {})
    claims = [c for c in find(objects, "PersistentVolumeClaim") if c["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    if persistence.get("enabled", True):
        if check(len(claims) == 1, where, "one Redis claim"):
            claim = claims[0]
            check(data.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"], where, "Redis's data volume is its claim")
            check(claim["spec"]["resources"]["requests"]["storage"] == persistence.get("size", "1Gi"), where, "Redis claim size from values")
            check(claim["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", where, "the Redis claim is kept when the release is deleted")
    else:
        check(not claims and "emptyDir" in data, where, "Redis without persistence uses an emptyDir")


def check_cluster(objects, values, config, sts, container, ports, volume_file, volumes, where):
    """Cluster mode (replicaCount > 1 or cluster.enabled): every pod of the StatefulSet is
    a peer at its headless-Service name, the replica name comes from the pod name, the
    listener is a container port open to the release's own pods only, the certificate
    names every replica for server and client auth, and the certificate, CA and secret
    files are in mounted Secrets. Returns the files check-config needs, None outside
    cluster mode (where nothing of the cluster may be rendered)."""
    replicas = values.get("replicaCount", 1)
    cl = values.get("cluster", {})
    cluster = config.get("cluster")
    env = {e["name"]: e for e in container.get("env", [])}
    cluster_objects = [o for _, o in objects if is_cluster_object(o)]
    if not (cl.get("enabled") or replicas > 1):
        check(cluster is None and "MAILGATE_CLUSTER__NAME" not in env and "cluster" not in ports and not cluster_objects, where, "cluster configuration, env, port or objects outside cluster mode")
        return None
    if not check(cluster is not None, where, "no [cluster] in cluster mode"):
        return None
    fullname = f"{RELEASE}-mailgate"
    headless = f"{fullname}-headless"
    names = [f"{fullname}-{i}" for i in range(max(replicas, 1))]
    port = cl.get("port", 7025)
    domain = cl.get("clusterDomain", "cluster.local")
    peers = {n: f"{n}.{headless}.{NAMESPACE}.svc.{domain}:{port}" for n in names}
    check(cluster.get("peers") == peers, where, f"[cluster.peers] {cluster.get('peers')} != {peers}")
    check(sts["metadata"]["name"] == fullname and sts["spec"]["serviceName"] == headless, where, "the peers are the StatefulSet's pods on its headless Service")
    check(port_of(cluster.get("listen")) == port == ports.get("cluster"), where, f"[cluster] listen {cluster.get('listen')} is the container port cluster, {port}")
    check(set(cluster) <= {"listen", "cert", "key", "ca", "secret_file", "peers", "pins", "connect_timeout_ms"}, where, f"[cluster] keys {sorted(cluster)}: the name comes from the pod")
    check(env.get("MAILGATE_CLUSTER__NAME", {}).get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.name"}}, where, "MAILGATE_CLUSTER__NAME from the pod name (downward API)")
    check(config.get("locks", {}).get("backend") == "redis", where, "cluster mode without Redis")
    pins = {d.lower(): r for d, r in cl.get("pins", {}).items()}
    check(cluster.get("pins", {}) == pins and set(pins.values()) <= set(names), where, f"[cluster.pins] {cluster.get('pins')} != {pins}")
    for k, v in config.get("cluster", {}).items():
        if k in values.get("config", {}).get("cluster", {}):
            check(v == values["config"]["cluster"][k], where, f"[cluster] {k} from config.cluster")

    tls = cl.get("tls", {})
    tls_secret = tls.get("existingSecret") or f"{fullname}-cluster-tls"
    for path, key in ((cluster["cert"], "tls.crt"), (cluster["key"], "tls.key"), (cluster["ca"], "ca.crt")):
        volume, secret_key = volume_file(path)
        check(volumes.get(volume, {}).get("secret", {}).get("secretName") == tls_secret and secret_key == key, where, f"{path} is {key} of Secret {tls_secret}")
    secret = cl.get("secret", {})
    secret_name = secret.get("existingSecret") or f"{fullname}-cluster-secret"
    secret_key = secret.get("existingSecretKey", "cluster-secret") if secret.get("existingSecret") else "cluster-secret"
    volume, key = volume_file(cluster["secret_file"])
    check(volumes.get(volume, {}).get("secret", {}).get("secretName") == secret_name and key == secret_key, where, f"secret_file is {secret_key} of Secret {secret_name}")
    made = [s for s in find(objects, "Secret", secret_name) if is_cluster_object(s)]
    if secret.get("existingSecret"):
        check(not made, where, "a cluster secret is made though cluster.secret.existingSecret names one")
    elif check(len(made) == 1, where, f"the chart makes Secret {secret_name}"):
        value = base64.b64decode(made[0]["data"].get(secret_key, ""))
        check(len(value) >= 32, where, f"the cluster secret has {len(value)} bytes, fewer than 32")

    certs = [o for o in cluster_objects if o["kind"] == "Certificate"]
    issuers = {o["metadata"]["name"]: o for o in cluster_objects if o["kind"] == "Issuer"}
    cm = tls.get("certManager", {})
    if cm.get("enabled"):
        leaves = [c for c in certs if not c["spec"].get("isCA")]
        cas = [c for c in certs if c["spec"].get("isCA")]
        for c in certs:
            check(c["apiVersion"] == "cert-manager.io/v1", where, "Certificate apiVersion")
            check(set(c["spec"]) <= {"secretName", "dnsNames", "commonName", "isCA", "duration", "renewBefore", "privateKey", "usages", "issuerRef"}, where, f"unknown Certificate fields {sorted(c['spec'])}")
        if check(len(leaves) == 1, where, "one Certificate for the replicas"):
            leaf = leaves[0]["spec"]
            check(leaf["secretName"] == tls_secret, where, f"the replicas' Certificate writes Secret {tls_secret}")
            check(leaf["dnsNames"] == names, where, f"the replicas' Certificate names {leaf['dnsNames']}, want every replica {names}")
            check({"server auth", "client auth"} <= set(leaf.get("usages", [])), where, f"the replicas' Certificate usages {leaf.get('usages')} lack server or client auth")
            ref = cm.get("issuerRef", {})
            if ref.get("name"):
                want = {"name": ref["name"], "kind": ref.get("kind", "Issuer"), "group": ref.get("group", "cert-manager.io")}
                check(leaf["issuerRef"] == want and not cas and not issuers, where, f"the replicas' Certificate is signed by {want} and the chart makes no CA")
            elif check(len(cas) == 1 and len(issuers) == 2, where, "the chart's own CA: a CA Certificate, a self-signed and a CA Issuer"):
                ca = cas[0]["spec"]
                ca_issuer = issuers.get(leaf["issuerRef"]["name"], {})
                self_signed = issuers.get(ca["issuerRef"]["name"], {})
                check(leaf["issuerRef"]["kind"] == ca["issuerRef"]["kind"] == "Issuer", where, "the chart's Issuers are namespaced")
                check(self_signed.get("spec") == {"selfSigned": {}}, where, "the CA Certificate is self-signed")
                check(ca_issuer.get("spec") == {"ca": {"secretName": ca["secretName"]}}, where, "the replicas' Certificate is signed by the CA Issuer of the CA Certificate's Secret")
    else:
        check(not certs and not issuers, where, "cert-manager objects without cluster.tls.certManager.enabled")

    if values.get("networkPolicy", {}).get("enabled", True):
        np = one(objects, "NetworkPolicy", fullname, where)
        if np:
            rules = [r for r in np["spec"]["ingress"] if port in [p["port"] for p in r["ports"]]]
            own = [{"podSelector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]}}]
            check([r.get("from") for r in rules] == [own], where, f"the cluster port is open to {[r.get('from') for r in rules]}, want this release's mailgate pods only")
    pdb = find(objects, "PodDisruptionBudget")
    for b in pdb:
        budget = b["spec"].get("maxUnavailable")
        check(replicas <= 1 or not isinstance(budget, int) or budget < replicas, where, f"the PodDisruptionBudget lets all {replicas} replicas go at once")
    return {"kind": "cluster", "names": names, "cert": cluster["cert"], "key": cluster["key"], "ca": cluster["ca"], "secret_file": cluster["secret_file"]}


def expand(value, env):
    """Kubernetes' $(VAR) expansion against the variables defined before."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def expects_self_signed(values):
    """Whether mailgate should make its own default certificate: tls.selfSigned when set,
    otherwise when neither a Secret nor cert-manager names one (no values at all)."""
    tls = values.get("tls", {})
    if tls.get("selfSigned") is not None:
        return tls["selfSigned"]
    return not (tls.get("secretName") or tls.get("certManager", {}).get("enabled"))


def check_release(objects, values, where, repo, out):
    sts = one(objects, "StatefulSet", f"{RELEASE}-mailgate", where)
    cm = one(objects, "ConfigMap", f"{RELEASE}-mailgate", where)
    if not sts or not cm:
        return
    text = cm["data"]["mailgate.toml"]
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"mailgate.toml is not TOML: {e}")
        return
    pod = sts["spec"]["template"]["spec"]
    check_pod(pod, where, "mailgate")
    (container,) = [c for c in pod["containers"] if c["name"] == "mailgate"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for p in container["ports"]:
        check(p["containerPort"] > 1024, where, f"container port {p['name']} {p['containerPort']} is privileged")

    # Ports: every listener of the TOML is a named container port, and nothing else is.
    listen = {
        "pop3": config["pop3"].get("listen"),
        "pop3s": config["pop3"].get("tls_listen"),
        "lmtp": config["lmtp"].get("listen"),
        "smtp": config["smtp"].get("listen"),
        "metrics": config["metrics"].get("listen"),
        "cluster": config.get("cluster", {}).get("listen"),
    }
    toml_ports = {name: port_of(addr) for name, addr in listen.items() if port_of(addr)}
    check(toml_ports == ports, where, f"container ports {ports} differ from the TOML's listeners {toml_ports}")
    listeners = values.get("listeners", {})
    defaults = {"pop3": (True, 110), "pop3s": (True, 995), "smtp": (False, 25), "lmtp": (True, 24)}
    for name, (enabled, service_port) in defaults.items():
        want = listeners.get(name, {}).get("enabled", enabled)
        check((name in toml_ports) == want, where, f"listener {name} enabled={want} but TOML says {listen[name]!r}")

    def service_targets(svc):
        out = {}
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            check(target in ports, where, f"Service {svc['metadata']['name']} port {p['name']} targets {target!r}, not a container port")
            out[p["port"]] = ports.get(target)
        return out

    client = find(objects, "Service", f"{RELEASE}-mailgate")
    expected_client = {}
    for name in ("pop3", "pop3s", "smtp"):
        if name in toml_ports:
            expected_client[listeners.get(name, {}).get("servicePort", defaults[name][1])] = toml_ports[name]
    if check(len(client) == 1, where, "one client Service"):
        svc = client[0]
        check(service_targets(svc) == expected_client, where, f"client Service maps {service_targets(svc)}, want {expected_client}")
        stype = svc["spec"]["type"]
        if stype in ("LoadBalancer", "NodePort"):
            want = values.get("service", {}).get("externalTrafficPolicy", "Local")
            check(svc["spec"].get("externalTrafficPolicy") == want, where, "externalTrafficPolicy from values")
    lmtp = find(objects, "Service", f"{RELEASE}-mailgate-lmtp")
    if "lmtp" in toml_ports:
        if check(len(lmtp) == 1, where, "an LMTP Service"):
            check(lmtp[0]["spec"]["type"] == "ClusterIP", where, "the LMTP Service is cluster-internal")
            check(service_targets(lmtp[0]) == {24: toml_ports["lmtp"]}, where, "LMTP Service maps 24 to the TOML's LMTP port")
    else:
        check(not lmtp, where, "an LMTP Service without LMTP")
    headless = one(objects, "Service", f"{RELEASE}-mailgate-headless", where)
    if headless:
        check(headless["spec"].get("clusterIP") == "None", where, "headless Service")
        check(sts["spec"]["serviceName"] == headless["metadata"]["name"], where, "StatefulSet serviceName is the headless Service")
        check(set(service_targets(headless).values()) == set(toml_ports.values()), where, "headless Service lists every port")
    metrics_svc = one(objects, "Service", f"{RELEASE}-mailgate-metrics", where)
    if metrics_svc:
        check(list(service_targets(metrics_svc).values()) == [toml_ports["metrics"]], where, "metrics Service targets the TOML's metrics port")
    for svc in find(objects, "Service"):
        if svc["metadata"]["labels"].get("app.kubernetes.io/component") == "redis":
            continue
        check(svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"], where, f"Service {svc['metadata']['name']} selects mailgate's pods")
    check(all(sts["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sts["spec"]["selector"]["matchLabels"].items()), where, "pod labels match the selector")

    # Probes: /healthz and /readyz on the metrics listener.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and ports.get(get.get("port")) == toml_ports["metrics"], where, f"{probe} is GET {path} on the metrics port, got {get}")

    # Shutdown: the grace period covers the preStop sleep and the server's drain.
    grace = config.get("limits", {}).get("shutdown_grace_secs", 10)
    sleep = 0
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if pre_stop:
        check(pre_stop[0] == "sleep", where, f"preStop {pre_stop}")
        sleep = int(pre_stop[1])
    check(pod["terminationGracePeriodSeconds"] >= grace + sleep + 5, where, f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < drain {grace} + preStop {sleep} + 5")
    check(sts["spec"]["podManagementPolicy"] == "Parallel" and sts["spec"]["updateStrategy"]["type"] == "RollingUpdate", where, "podManagementPolicy and updateStrategy")
    check(sts["spec"]["replicas"] == values.get("replicaCount", 1), where, f"replicas {sts['spec']['replicas']} != replicaCount")
    claims = sts["spec"].get("volumeClaimTemplates", [])
    check([c["metadata"]["name"] for c in claims] == ["data"], where, "one volumeClaimTemplate, data")
    check(sts["spec"].get("persistentVolumeClaimRetentionPolicy", {}).get("whenDeleted") == "Retain", where, "claims are retained")

    # Mounts: every path the TOML names lies in a mounted volume; Secrets never by subPath.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in container["volumeMounts"]:
        check("subPath" not in m, where, f"mount {m['mountPath']} uses subPath (a renewed Secret would never arrive)")
        check(m["name"] in volumes or m["name"] in [c["metadata"]["name"] for c in claims], where, f"mount {m['mountPath']} has no volume")

    def volume_file(path):
        """(volume, key) holding `path`, from the mounts and the volume's items."""
        for mount_path, m in mounts.items():
            if path.startswith(mount_path + "/"):
                rel = path[len(mount_path) + 1:]
                v = volumes.get(m["name"], {})
                source = v.get("secret") or v.get("configMap")
                if source is None:
                    return m["name"], rel
                items = {i["path"]: i["key"] for i in source.get("items", [])}
                return m["name"], items.get(rel, rel if not items else None)
        return None, None

    files = []
    tls = config.get("tls", {})
    self_signed = expects_self_signed(values)
    # Self-signed: no certificate paths, so `mailgate serve` makes data_dir/tls/selfsigned.*
    # on the data volume, which must be the writable claim; nothing mounts a default Secret.
    check(("cert" in tls) == ("key" in tls) == (not self_signed), where, f"[tls] cert/key {tls.get('cert')!r}/{tls.get('key')!r}, but self-signed={self_signed}")
    if self_signed:
        check("tls-default" not in volumes, where, "a default certificate Secret is mounted, though self-signed")
        data_mount = mounts.get("/var/lib/mailgate", {})
        check(data_mount.get("name") == "data" and not data_mount.get("readOnly"), where, "the self-signed certificate needs the writable data volume at /var/lib/mailgate")
        check(not [c for c in find(objects, "Certificate") if c["spec"]["secretName"] == f"{RELEASE}-mailgate-tls"], where, "a default Certificate, though self-signed")
    pairs = []
    if "cert" in tls:
        pairs.append(("default", tls["cert"], tls["key"]))
    for domain, pair in tls.get("domains", {}).items():
        pairs.append((domain, pair["cert"], pair["key"]))
    for name, cert, key in pairs:
        for path, wanted_key in ((cert, "tls.crt"), (key, "tls.key")):
            volume, secret_key = volume_file(path)
            check(volume is not None and "secret" in volumes.get(volume, {}), where, f"{path} is not in a mounted Secret")
            check(secret_key == wanted_key, where, f"{path} comes from key {secret_key!r}, want {wanted_key}")
        files.append({"kind": "cert_pair", "name": name, "cert": cert, "key": key})
    check(config["data_dir"].startswith("/var/lib/mailgate/") and "/var/lib/mailgate" in mounts, where, "data_dir on the data volume")
    config_mount = [m for m in container["volumeMounts"] if volumes.get(m["name"], {}).get("configMap", {}).get("name") == cm["metadata"]["name"]]
    env_list = container.get("env", [])
    env_names = [e["name"] for e in env_list]
    check(len(env_names) == len(set(env_names)), where, "duplicate env names")
    plain = {e["name"]: e.get("value") for e in env_list if "value" in e}
    check(config_mount and plain.get("MAILGATE_CONFIG") == config_mount[0]["mountPath"] + "/mailgate.toml", where, "MAILGATE_CONFIG names the mounted ConfigMap's mailgate.toml")

    # Provisioning and the PROXY protocol follow the values.
    domains = [d["name"].lower() for d in values.get("domains", [])]
    provision = config.get("provision", {})
    check(provision.get("domains", []) == domains, where, f"provision.domains {provision.get('domains')} != {domains}")
    accounts_secret = values.get("provisioning", {}).get("accountsSecret")
    if check(bool(provision.get("accounts_file")) == bool(accounts_secret), where, "accounts_file iff provisioning.accountsSecret"):
        if accounts_secret:
            volume, key = volume_file(provision["accounts_file"])
            check(volumes.get(volume, {}).get("secret", {}).get("secretName") == accounts_secret, where, "accounts file from the accounts Secret")
            check(key == values["provisioning"].get("accountsSecretKey", "accounts"), where, "accounts file from the configured key")
            files.append({"kind": "accounts", "path": provision["accounts_file"], "domains": domains})
    proxied = sorted(n for n in ("pop3", "pop3s", "smtp", "lmtp") if listeners.get(n, {}).get("proxyProtocol") and n in toml_ports)
    pp = config.get("proxy_protocol")
    if proxied:
        check(pp is not None and sorted(pp["listeners"]) == proxied, where, f"proxy_protocol.listeners {pp} != {proxied}")
        check(pp and pp["trusted_networks"] == values["proxyProtocolSettings"]["trustedNetworks"], where, "trusted_networks from values")
    else:
        check(pp is None, where, "[proxy_protocol] rendered without a PROXY listener")

    # Redis: the URL is composed from variables defined before it, secrets stay in Secrets.
    locks = config.get("locks", {})
    redis = None
    if locks.get("backend") == "redis":
        url_env = [e for e in env_list if e["name"] == "MAILGATE_LOCKS__REDIS_URL"]
        if check(len(url_env) == 1, where, "MAILGATE_LOCKS__REDIS_URL is set"):
            defined = []
            for e in env_list:
                for ref in re.findall(r"\$\(([A-Za-z0-9_]+)\)", e.get("value") or ""):
                    check(ref in defined, where, f"{e['name']} refers to $({ref}) before it is defined")
                defined.append(e["name"])
            for e in env_list:
                if "PASSWORD" in e["name"]:
                    check("secretKeyRef" in e.get("valueFrom", {}), where, f"{e['name']} must come from a Secret")
            redis = {"env": env_list}
        ext = values.get("redis", {}).get("external", {})
        sentinels = ext.get("sentinels") or []
        check(locks.get("redis_sentinels", []) == sentinels, where, "redis_sentinels from redis.external.sentinels")
        check(locks.get("redis_sentinel_master", "") == (ext.get("sentinelMaster", "") if sentinels else ""), where, "redis_sentinel_master from redis.external.sentinelMaster")
        if redis is not None and sentinels:
            redis["sentinel_master"] = locks["redis_sentinel_master"]
        ca = locks.get("redis_ca_file")
        if ca:
            volume, key = volume_file(ca)
            check(volumes.get(volume, {}).get("secret", {}).get("secretName") == values["redis"]["external"]["caSecret"] and key == "ca.crt", where, "redis_ca_file from the CA Secret")
            files.append({"kind": "ca", "path": ca})
        internal = values.get("redis", {}).get("internal", {}).get("enabled")
        deployments = [d for d in find(objects, "Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
        check(len(deployments) == int(bool(internal)), where, "in-chart Redis follows redis.internal.enabled")
        for d in deployments:
            check_redis(objects, d, values, where)
    else:
        check("MAILGATE_LOCKS__REDIS_URL" not in env_names, where, "a Redis URL with local locks")

    # NetworkPolicy: POP3/POP3S/SMTP open, LMTP from the listed peers, metrics from monitoring.
    if values.get("networkPolicy", {}).get("enabled", True):
        np = one(objects, "NetworkPolicy", f"{RELEASE}-mailgate", where)
        if np:
            rules = np["spec"]["ingress"]
            open_ports = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
            check(open_ports == {toml_ports[n] for n in ("pop3", "pop3s", "smtp") if n in toml_ports}, where, f"ports open to anyone: {open_ports}")
            lmtp_from = values.get("networkPolicy", {}).get("lmtpFrom", [])
            lmtp_rules = [r for r in rules if "from" in r and toml_ports.get("lmtp") in [p["port"] for p in r["ports"]]]
            check([r["from"] for r in lmtp_rules] == ([lmtp_from] if lmtp_from and "lmtp" in toml_ports else []), where, "LMTP only from networkPolicy.lmtpFrom")
            metrics_rules = [r for r in rules if "from" in r and toml_ports["metrics"] in [p["port"] for p in r["ports"]]]
            check(len(metrics_rules) == 1 and metrics_rules[0]["from"][0].get("namespaceSelector"), where, "metrics from the monitoring namespace only")

    # Cluster mode: peers, the replica name from the downward API, certificates, secret.
    cluster = check_cluster(objects, values, config, sts, container, ports, volume_file, volumes, where)
    env = {}
    if cluster:
        files.append(cluster)
        # What the kubelet sets from the downward API in the first pod.
        env["MAILGATE_CLUSTER__NAME"] = cluster["names"][0]

    check_pod(pod, where, "mailgate")
    for p in find(objects, "Pod"):
        check_pod(p["spec"], where, p["metadata"]["name"])

    # What the server-side check needs: the TOML with paths moved under root/.
    name_dir = os.path.join(out, where)
    root = os.path.join(name_dir, "root")
    os.makedirs(root, exist_ok=True)
    rewritten = text
    for prefix in MOUNT_ROOTS:
        rewritten = rewritten.replace(f'"{prefix}', f'"{root}{prefix}')

    def moved(v):
        if isinstance(v, str) and v.startswith(MOUNT_ROOTS):
            return root + v
        if isinstance(v, dict):
            return {k: moved(x) for k, x in v.items()}
        if isinstance(v, list):
            return [moved(x) for x in v]
        return v

    check(tomllib.loads(rewritten) == moved(copy.deepcopy(config)), where, "rewriting the paths changed something else")
    with open(os.path.join(name_dir, "mailgate.toml"), "w") as f:
        f.write(rewritten)
    for entry in files:
        for k in ("cert", "key", "path", "ca", "secret_file"):
            if k in entry:
                entry[k] = root + entry[k]
    with open(os.path.join(name_dir, "needs.json"), "w") as f:
        json.dump({"files": files, "redis": redis, "backend": locks.get("backend", "local"), "self_signed": self_signed, "env": env}, f, indent=2)


def check_values_file(chart_dir, repo, path, out):
    where = os.path.basename(path).removesuffix("-values.yaml")
    values = yaml.safe_load(open(path)) or {}
    report = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE)
    for m in report["messages"]:
        if m["severity"] >= 2:
            fail(where, f"helm lint: {m['path']}: {m['error'].strip()}")
    with helm.Chart.load(chart_dir) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        objects = docs(manifests)
        with helm.Config(storage_driver="memory", namespace=NAMESPACE) as cfg:
            release = cfg.install(chart, RELEASE, values, namespace=NAMESPACE, dry_run="client")
    installed = [o for o in yaml.safe_load_all(release["manifest"]) if o]
    hooks = [o for _, o in objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]
    rendered = [o for _, o in objects if o not in hooks]
    key = lambda o: (o["kind"], o["metadata"]["name"])
    check(sorted(map(key, installed)) == sorted(map(key, rendered)), where, "the dry-run install and the render differ")
    check(release["status"] == "pending-install" and release.get("notes"), where, f"dry-run install: {release['status']}, NOTES rendered")
    notes = release.get("notes") or ""
    warned = "serves a self-signed one" in notes
    check(warned == expects_self_signed(values), where, f"NOTES.txt warns of the self-signed certificate: {warned}, expected {expects_self_signed(values)}")
    if warned:
        for words in ("for trying the chart", "tls.secretName=", "tls.certManager.enabled=true"):
            check(words in notes, where, f"NOTES.txt's self-signed warning lacks {words!r}")
    if int(values.get("replicaCount", 1)) > 1:
        for words in ("mailgate cluster rebalance", "mailgate cluster drain ", "cluster cleanup"):
            check(words in notes, where, f"NOTES.txt's scaling steps lack {words!r}")
    check([h["kind"] for h in hooks] == ["Pod"], where, "one test hook, a Pod")
    for _, o in objects:
        check(o["metadata"].get("namespace") in (NAMESPACE, values.get("metrics", {}).get("dashboard", {}).get("namespace")), where, f"{key(o)} namespace")
        labels = o["metadata"].get("labels", {})
        check(labels.get("app.kubernetes.io/instance") == RELEASE and labels.get("helm.sh/chart"), where, f"{key(o)} standard labels")
    validate_schema(objects, where)
    check_crds(objects, values, where, repo)
    check_release(objects, values, where, repo, out)
    return where, sorted(map(key, rendered))


def merged(base, extra):
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# A cluster's parts: Redis for the homes, the replicas' certificate, and both with two replicas.
REDIS = {"config": {"locks": {"backend": "redis"}}, "redis": {"internal": {"enabled": True}}}
CLUSTER_TLS = {"cluster": {"tls": {"certManager": {"enabled": True}}}}
CLUSTER = merged(merged(REDIS, CLUSTER_TLS), {"replicaCount": 2})

# Values the chart must refuse, with words the message must contain.
REFUSED = [
    ("two replicas without Redis or certificates", {"replicaCount": 2}, ["replicaCount=2 runs mailgate as a cluster, which needs Redis for the domains' homes (config.locks.backend=redis", "and certificates for the replicas' mutual TLS (cluster.tls.certManager.enabled=true, or cluster.tls.existingSecret"]),
    ("two replicas without Redis", merged(CLUSTER_TLS, {"replicaCount": 2}), ["replicaCount=2 runs mailgate as a cluster, which needs Redis for the domains' homes (config.locks.backend=redis, with redis.internal.enabled=true or redis.external.host)\n"]),
    ("three replicas without certificates", merged(REDIS, {"replicaCount": 3}), ["replicaCount=3 runs mailgate as a cluster, which needs certificates for the replicas' mutual TLS"]),
    ("a cluster of one without Redis", {"cluster": {"enabled": True, "tls": {"existingSecret": "cluster-tls"}}}, ["cluster.enabled=true runs mailgate as a cluster, which needs Redis"]),
    ("two replicas with Redis locks but no Redis", merged(CLUSTER_TLS, {"replicaCount": 2, "config": {"locks": {"backend": "redis"}}}), ["config.locks.backend=redis: set redis.external.host"]),
    ("both sources of the replicas' certificate", merged(CLUSTER, {"cluster": {"tls": {"existingSecret": "cluster-tls"}}}), ["cluster.tls: use either existingSecret or certManager.enabled"]),
    ("a domain pinned to no replica", merged(CLUSTER, {"cluster": {"pins": {"example.org": "mg-mailgate-5"}}}), ["cluster.pins: example.org is pinned to mg-mailgate-5, which is not a replica (mg-mailgate-0, mg-mailgate-1)"]),
    ("cluster values outside cluster mode", {"cluster": {"tls": {"existingSecret": "cluster-tls"}, "pins": {"example.org": "mg-mailgate-0"}}}, ["cluster.pins, cluster.tls.existingSecret: only used in cluster mode (replicaCount > 1, or cluster.enabled=true"]),
    ("a cluster port clash", merged(CLUSTER, {"cluster": {"port": 9898}}), ["cluster.port 9898 is already used by metrics.containerPort"]),
    ("a disruption budget evicting every replica", merged(CLUSTER, {"podDisruptionBudget": {"maxUnavailable": 2}}), ["podDisruptionBudget.maxUnavailable=2 lets all 2 replicas be evicted at once"]),
    ("a negative replicaCount", {"replicaCount": -1}, ["/replicaCount", "minimum"]),
    ("a cluster port of the wrong type", {"cluster": {"port": "7025"}}, ["/cluster/port", "want integer"]),
    ("a pin to an invalid replica name", {"cluster": {"pins": {"example.org": "Mailgate_0"}}}, ["/cluster/pins/example.org"]),
    ("a pin of an invalid domain", {"cluster": {"pins": {"../etc": "mg-mailgate-0"}}}, ["invalid propertyName '../etc'"]),
    ("an unknown config.cluster key", {"config": {"cluster": {"name": "mg-mailgate-0"}}}, ["name", "not allowed"]),
    ("a Redis volume size of the wrong type", {"redis": {"internal": {"persistence": {"size": 2}}}}, ["/redis/internal/persistence/size"]),
    ("a wrong type", {"listeners": {"pop3s": {"containerPort": "995"}}}, ["/listeners/pop3s/containerPort", "want integer"]),
    ("a privileged container port", {"listeners": {"pop3s": {"containerPort": 995}}}, ["/listeners/pop3s/containerPort", "minimum"]),
    ("an unknown config key", {"config": {"limits": {"max_conections": 5}}}, ["max_conections", "not allowed"]),
    ("a config key of the wrong type", {"config": {"pop3": {"allow_plaintext_auth": "no"}}}, ["/config/pop3/allow_plaintext_auth", "want boolean"]),
    ("a port clash", {"listeners": {"lmtp": {"containerPort": 1995}}}, ["listeners.lmtp.containerPort 1995 is already used by listeners.pop3s.containerPort"]),
    ("a metrics port clash", {"metrics": {"containerPort": 1110}}, ["metrics.containerPort 1110 is already used by listeners.pop3.containerPort"]),
    ("a service port clash", {"listeners": {"smtp": {"enabled": True, "servicePort": 995}}}, ["listeners.smtp.servicePort 995 is already used by listeners.pop3s.servicePort"]),
    ("no default certificate with selfSigned=false", {"tls": {"secretName": "", "selfSigned": False}}, ["tls.selfSigned=false: name the existing kubernetes.io/tls Secret"]),
    ("selfSigned=true with a Secret", {"tls": {"selfSigned": True}}, ["tls.selfSigned=true cannot be combined with tls.secretName"]),
    ("selfSigned=true with cert-manager", {"tls": {"secretName": "", "selfSigned": True, "certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, "dnsNames": ["mail.example.com"]}}}, ["tls.selfSigned=true cannot be combined"]),
    ("selfSigned of the wrong type", {"tls": {"selfSigned": "yes"}}, ["/tls/selfSigned"]),
    ("a domain without its certificate Secret", {"domains": [{"name": "example.org", "tls": {"dnsNames": ["mail.example.org"]}}]}, ["domains[0] (example.org): tls.secretName"]),
    ("cert-manager without an issuer", {"tls": {"secretName": "", "certManager": {"enabled": True, "dnsNames": ["mail.example.com"]}}}, ["tls.certManager.issuerRef.name"]),
    ("Redis locks without a Redis", {"config": {"locks": {"backend": "redis"}}}, ["config.locks.backend=redis: set redis.external.host"]),
    ("sentinels without a master name", {"config": {"locks": {"backend": "redis"}}, "redis": {"external": {"sentinels": ["s-0:26379"]}}}, ["redis.external.sentinels: set redis.external.sentinelMaster"]),
    ("a master name without sentinels", {"config": {"locks": {"backend": "redis"}}, "redis": {"external": {"host": "redis", "sentinelMaster": "mymaster"}}}, ["redis.external.sentinelMaster is only used with redis.external.sentinels"]),
    ("sentinels beside the in-chart Redis", merged(REDIS, {"redis": {"external": {"sentinels": ["s-0:26379"], "sentinelMaster": "mymaster"}}}), ["redis: use either redis.internal.enabled or an external Redis"]),
    ("a sentinel address without a port", {"redis": {"external": {"sentinels": ["s-0"]}}}, ["/redis/external/sentinels/0"]),
    ("PROXY without trusted networks", {"listeners": {"pop3s": {"proxyProtocol": True}}}, ["proxyProtocolSettings.trustedNetworks"]),
    ("a grace period shorter than the drain", {"config": {"limits": {"shutdown_grace_secs": 60}}}, ["terminationGracePeriodSeconds=30 must be at least"]),
    ("accounts without domains", {"provisioning": {"accountsSecret": "accounts"}}, ["provisioning.accountsSecret"]),
    ("a domain twice", {"domains": [{"name": "example.org"}, {"name": "EXAMPLE.org"}]}, ["example.org is listed twice"]),
    ("an invalid domain name", {"domains": [{"name": "../etc"}]}, ["/domains/0/name"]),
]


def check_refused(chart_dir):
    base = {"tls": {"secretName": "mail-example-com-tls"}}
    with helm.Chart.load(chart_dir) as chart:
        for what, extra, words in REFUSED:
            values = merged(base, extra)
            try:
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
            except helm.HelmError as e:
                message = str(e)
                for w in words:
                    check(w in message, f"refused {what}", f"message lacks {w!r}: {message}")
                continue
            fail(f"refused {what}", "the chart rendered it")


def check_cluster_renders(chart_dir):
    """Cluster mode with the names spelled out: three replicas are three peers on the
    headless Service, each pod is told its name by the downward API, port 7025 is on the
    pod, the headless Service and the NetworkPolicy, and the certificate names all three;
    a cluster of one has one peer; an existing issuer is used as given; one replica
    without cluster.enabled renders no cluster at all."""
    base = {"tls": {"secretName": "mail-example-com-tls"}}
    fullname = f"{RELEASE}-mailgate"
    selector = {"app.kubernetes.io/name": "mailgate", "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "server"}
    with helm.Chart.load(chart_dir) as chart:

        def render(where, extra):
            objects = docs(chart.render(merged(base, extra), name=RELEASE, namespace=NAMESPACE))
            cm = one(objects, "ConfigMap", fullname, where)
            sts = one(objects, "StatefulSet", fullname, where)
            (container,) = sts["spec"]["template"]["spec"]["containers"]
            return objects, tomllib.loads(cm["data"]["mailgate.toml"]), container

        where = "three replicas"
        objects, config, container = render(where, merged(CLUSTER, {"replicaCount": 3, "cluster": {"pins": {"Big.Example": "mg-mailgate-2"}}}))
        want = {f"mg-mailgate-{i}": f"mg-mailgate-{i}.mg-mailgate-headless.mail.svc.cluster.local:7025" for i in range(3)}
        check(config["cluster"]["peers"] == want, where, f"[cluster.peers] {config['cluster']['peers']}")
        check(config["cluster"]["listen"] == "0.0.0.0:7025", where, f"[cluster] listen {config['cluster']['listen']}")
        check(config["cluster"]["pins"] == {"big.example": "mg-mailgate-2"}, where, f"[cluster.pins] {config['cluster'].get('pins')}")
        check("name" not in config["cluster"], where, "the replica name is in the shared ConfigMap")
        name_env = [e for e in container["env"] if e["name"] == "MAILGATE_CLUSTER__NAME"]
        check(name_env == [{"name": "MAILGATE_CLUSTER__NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}], where, f"MAILGATE_CLUSTER__NAME {name_env}")
        check({"name": "cluster", "containerPort": 7025, "protocol": "TCP"} in container["ports"], where, f"container ports {container['ports']}")
        headless = one(objects, "Service", f"{fullname}-headless", where)
        check({"name": "cluster", "port": 7025, "targetPort": "cluster", "protocol": "TCP"} in headless["spec"]["ports"], where, "the headless Service has port 7025")
        np = one(objects, "NetworkPolicy", fullname, where)
        check({"from": [{"podSelector": {"matchLabels": selector}}], "ports": [{"port": 7025, "protocol": "TCP"}]} in np["spec"]["ingress"], where, "port 7025 from the release's mailgate pods")
        cert = one(objects, "Certificate", f"{fullname}-cluster", where)
        if cert:
            check(cert["spec"]["dnsNames"] == ["mg-mailgate-0", "mg-mailgate-1", "mg-mailgate-2"], where, f"certificate dnsNames {cert['spec']['dnsNames']}")
            check(cert["spec"]["usages"] == ["digital signature", "key encipherment", "server auth", "client auth"], where, f"certificate usages {cert['spec']['usages']}")
            check(cert["spec"]["issuerRef"] == {"name": f"{fullname}-cluster-ca", "kind": "Issuer", "group": "cert-manager.io"}, where, "signed by the chart's CA Issuer")

        where = "a cluster of one"
        objects, config, container = render(where, merged(REDIS, {"cluster": {"enabled": True, "tls": {"existingSecret": "cluster-tls"}}}))
        check(config["cluster"]["peers"] == {"mg-mailgate-0": "mg-mailgate-0.mg-mailgate-headless.mail.svc.cluster.local:7025"}, where, f"[cluster.peers] {config['cluster']['peers']}")
        check(not find(objects, "Certificate") and not find(objects, "Issuer"), where, "cert-manager objects with an existing Secret")

        where = "an existing cluster issuer"
        objects, config, container = render(where, merged(CLUSTER, {"cluster": {"tls": {"certManager": {"issuerRef": {"name": "mail-ca", "kind": "ClusterIssuer"}}}}}))
        cert = one(objects, "Certificate", f"{fullname}-cluster", where)
        check(cert and cert["spec"]["issuerRef"] == {"name": "mail-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}, where, "the named issuer signs the replicas' certificate")
        check(len(find(objects, "Certificate")) == 1 and not find(objects, "Issuer"), where, "the chart makes its own CA though an issuer is named")

        where = "one replica"
        objects, config, container = render(where, REDIS)
        check("cluster" not in config and not any(e["name"] == "MAILGATE_CLUSTER__NAME" for e in container["env"]), where, "cluster configuration without cluster mode")
        check(not any(p["containerPort"] == 7025 for p in container["ports"]), where, "port 7025 without cluster mode")


def check_chart_files(chart_dir, repo):
    """The chart owns its files: files/ holds real copies (no symlinks, which would leave
    the chart directory) of deploy/prometheus/alerts.yaml and deploy/grafana/*.json, byte
    for byte, and nothing else."""
    deploy = os.path.join(repo, "deploy")
    owned = ["prometheus/alerts.yaml"] + sorted(f"grafana/{f}" for f in os.listdir(os.path.join(deploy, "grafana")) if f.endswith(".json"))
    files = os.path.join(chart_dir, "files")
    present = sorted(os.path.relpath(os.path.join(d, f), files) for d, _, names in os.walk(files) for f in names)
    check(present == sorted(owned), "files/", f"holds {present}, expected copies of deploy/{{{', '.join(owned)}}}")
    for rel in owned:
        copy_path = os.path.join(files, rel)
        where = f"files/{rel}"
        if check(os.path.lexists(copy_path), where, f"missing: copy deploy/{rel} there"):
            check(not os.path.islink(copy_path) and os.path.isfile(copy_path), where, "must be a regular file, not a symlink")
            with open(copy_path, "rb") as a, open(os.path.join(deploy, rel), "rb") as b:
                check(a.read() == b.read(), where, f"differs from deploy/{rel}: copy it again (cp deploy/{rel} helm/mailgate/files/{rel})")


def check_docs(chart_dir):
    """Every value has a `## @param` line (its own or a documented parent's, for free-form
    maps such as podSecurityContext), every @param names a real value, and every helper
    is named mailgate.* with a one-line comment above it."""
    text = open(os.path.join(chart_dir, "values.yaml")).read()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, re.M))
    values = yaml.safe_load(text)

    def paths(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from paths(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix

    leaves = list(paths(values, ""))
    for leaf in leaves:
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            fail("values.yaml", f"{leaf} has no ## @param line")
    for name in documented:
        if not any(leaf == name or leaf.startswith(name + ".") for leaf in leaves):
            fail("values.yaml", f"## @param {name} documents no value")
    helpers = open(os.path.join(chart_dir, "templates/_helpers.tpl")).read()
    defines = re.findall(r"^(.*)\n\{\{- define \"([^\"]+)\" -\}\}", helpers, re.M)
    check(len(defines) == helpers.count("{{- define "), "_helpers.tpl", "every define follows a line")
    for comment, name in defines:
        check(name.startswith("mailgate."), "_helpers.tpl", f"helper {name} is not named mailgate.*")
        check(comment.startswith(f"{{{{/* {name}: ") and comment.endswith("*/}}"), "_helpers.tpl", f"helper {name} lacks its one-line comment")


# Bitnami's readme generator, pinned in scripts/test.sh's npm_pins.
README_GENERATOR = ".tools/npm/node_modules/.bin/readme-generator"


def check_readme(chart_dir, repo):
    """README.md's parameters table is exactly what Bitnami's readme generator makes from
    the `## @param` lines of values.yaml: it runs on a copy and the copy must come out
    unchanged. The generator also refuses values without metadata and metadata without
    a value. Only --readme is given, so it never writes values.schema.json."""
    generator = os.path.join(repo, README_GENERATOR)
    if not check(os.path.exists(generator), "README.md", f"{generator} is missing: ./scripts/test.sh installs @bitnami/readme-generator-for-helm there"):
        return
    readme = os.path.join(chart_dir, "README.md")
    with tempfile.TemporaryDirectory() as tmp:
        regenerated = os.path.join(tmp, "README.md")
        shutil.copyfile(readme, regenerated)
        run = subprocess.run([generator, "--values", os.path.join(chart_dir, "values.yaml"), "--readme", regenerated], capture_output=True, text=True)
        if not check(run.returncode == 0, "values.yaml", f"the readme generator refused its ## @param lines:\n{run.stdout}{run.stderr}"):
            return
        with open(readme) as a, open(regenerated) as b:
            check(a.read() == b.read(), "README.md", f"the parameters table differs from values.yaml's ## @param lines: run {README_GENERATOR} --values helm/mailgate/values.yaml --readme helm/mailgate/README.md")


def check_image(chart_dir, repo):
    """The image (deploy/Dockerfile) and the chart agree: the ports it exposes are the
    chart's default container ports (the replica link's included) and its default
    config's, its user is the one the
    chart runs as, and MAILGATE_CONFIG names the config it ships."""
    where = "deploy/Dockerfile"
    dockerfile = open(os.path.join(repo, "deploy/Dockerfile")).read()
    values = yaml.safe_load(open(os.path.join(chart_dir, "values.yaml")))
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    chart_ports = {l["containerPort"] for l in values["listeners"].values()} | {values["metrics"]["containerPort"], values["cluster"]["port"]}
    check(exposed == chart_ports, where, f"EXPOSE {sorted(exposed)} != the chart's container ports {sorted(chart_ports)}")
    image_config = tomllib.load(open(os.path.join(repo, "deploy/mailgate.toml"), "rb"))
    listens = [image_config["pop3"]["listen"], image_config["pop3"]["tls_listen"], image_config["lmtp"]["listen"], image_config["metrics"]["listen"]]
    check({port_of(a) for a in listens} <= exposed, where, f"deploy/mailgate.toml listens on {listens}, not all exposed")
    users = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    uid = values["podSecurityContext"]["runAsUser"]
    check(users == [(str(uid), str(values["podSecurityContext"]["runAsGroup"]))], where, f"USER {users} != the chart's runAsUser/runAsGroup {uid}")
    check(re.search(r"--uid 10001 ", dockerfile) and uid == 10001, where, "the image's mailgate user is 10001")
    check("ENV MAILGATE_CONFIG=/etc/mailgate/mailgate.toml" in dockerfile and "COPY deploy/mailgate.toml /etc/mailgate/mailgate.toml" in dockerfile, where, "MAILGATE_CONFIG names the shipped config")
    check(re.search(r'^ENTRYPOINT \["/usr/local/bin/mailgate"\]$', dockerfile, re.M), where, "the binary is the entrypoint")
    ignored = open(os.path.join(repo, ".dockerignore")).read().split()
    for needed in ("!Cargo.toml", "!Cargo.lock", "!src", "!deploy/mailgate.toml"):
        check(needed in ignored, ".dockerignore", f"{needed} missing: the build needs it")


def main():
    chart_dir, repo, out = sys.argv[1:4]
    summary = run(chart_dir, repo, out)
    for name, count in summary.items():
        print(f"{name}: {count} objects rendered, validated and checked")
    if failures:
        print(f"{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        sys.exit(1)
    print(f"chart OK: {len(summary)} values files, {len(REFUSED)} refusals")


def run(chart_dir, repo, out):
    ci = os.path.join(chart_dir, "ci")
    names = sorted(f for f in os.listdir(ci) if f.endswith("-values.yaml"))
    check(len(names) >= 5, "ci", f"values files: {names}")
    summary = {}
    for f in names:
        try:
            where, objects = check_values_file(chart_dir, repo, os.path.join(ci, f), out)
            summary[where] = len(objects)
        except helm.HelmError as e:
            fail(f, f"{type(e).__name__}: {e}")
    check_refused(chart_dir)
    try:
        check_cluster_renders(chart_dir)
    except helm.HelmError as e:
        fail("cluster renders", f"{type(e).__name__}: {e}")
    check_docs(chart_dir)
    check_chart_files(chart_dir, repo)
    check_readme(chart_dir, repo)
    check_image(chart_dir, repo)
    return summary


if __name__ == "__main__":
    main()
