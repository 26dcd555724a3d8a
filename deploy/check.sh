#!/usr/bin/env bash
# Validate every operations artefact under deploy/: systemd units,
# Kubernetes manifests, the Mosquitto config and ACL, Prometheus config,
# alert rules and their unit tests, Grafana provisioning and dashboards,
# HAProxy config.
#
#   bash deploy/check.sh          (from anywhere; it works from the repo root)
#
# One line per check; stops with a non-zero status at the first failure and
# prints that tool's output. It installs nothing: CI installs the tools
# first (see deploy/README.md, "Checks"), and a missing tool is named.
#
# Environment:
#   K8S_VERSIONS  Kubernetes versions to validate the manifests against
#                 (space separated; default "1.34.0 1.37.0").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
D=deploy
K8S_VERSIONS=${K8S_VERSIONS:-"1.34.0 1.37.0"}

# shellcheck source=deploy/checks.sh
. deploy/checks.sh

# --- tools ------------------------------------------------------------------
missing=()
need() {
    command -v "$1" >/dev/null 2>&1 || missing+=("$1 (from $2)")
}
need systemd-analyze "the Debian package systemd"
need promtool "the Debian package prometheus"
need haproxy "the Debian package haproxy"
need kubernetes-validate "the pip package kubernetes-validate"
need kubectl "kubectl (for kustomize)"
need mosquitto "the Debian package mosquitto (/usr/sbin: put it on PATH)"
need openssl "the Debian package openssl"
need python3 "python3 with PyYAML (a dependency of kubernetes-validate)"
if [ ${#missing[@]} -gt 0 ]; then
    printf 'FAIL  missing tool: %s\n' "${missing[@]}"
    echo "      deploy/check.sh installs nothing; see deploy/README.md (Checks)."
    exit 1
fi
python3 -c 'import yaml' 2>/dev/null || {
    echo "FAIL  missing tool: the python3 module yaml (pip package PyYAML)"
    exit 1
}

# --- systemd ----------------------------------------------------------------
# `systemd-analyze verify` fails when an Exec*= binary does not exist, and
# dai-edge/dai-cloud are not installed where the check runs. `--root=DIR`
# does not help: it wants a whole unit tree (sysinit.target and friends) in
# DIR. So the units are copied into a scratch directory with the /usr/bin/
# prefix of their Exec*= lines rewritten to a directory of stub executables
# there; nothing else changes, so every other directive is verified as
# written. The drop-in directories (*.service.d/) are copied along: verify
# loads drop-ins that sit next to a unit it is given by path. verify reports
# unknown or malformed directives as warnings with exit status 0, so any
# output at all fails the check.
mkdir -p "$WORK/systemd/bin"
for unit in "$D"/systemd/*.service; do
    sed -E "s#^(Exec[A-Za-z]*=[-+!@:|]*)/usr/bin/#\\1$WORK/systemd/bin/#" "$unit" \
        >"$WORK/systemd/$(basename "$unit")"
    # Every binary the unit runs gets a stub.
    sed -nE "s#^Exec[A-Za-z]*=[-+!@:|]*$WORK/systemd/bin/([^ ]+).*#\\1#p" \
        "$WORK/systemd/$(basename "$unit")" | while read -r bin; do
        printf '#!/bin/sh\nexit 0\n' >"$WORK/systemd/bin/$bin"
        chmod +x "$WORK/systemd/bin/$bin"
    done
done
for dropins in "$D"/systemd/*.service.d; do
    if [ -d "$dropins" ]; then cp -r "$dropins" "$WORK/systemd/"; fi
done
units=$(cd "$WORK/systemd" && ls ./*.service | sed 's#^\./##' | xargs)
dropins=$(cd "$D/systemd" && { ls -d ./*.service.d/*.conf 2>/dev/null || true; } | sed 's#^\./##' | xargs)
run_silent "systemd: systemd-analyze verify $units (drop-ins: ${dropins:-none})" \
    systemd-analyze verify "$WORK"/systemd/*.service

# --- Kubernetes -------------------------------------------------------------
# Every manifest on its own (kustomization.yaml is kustomize's, not an API
# object), then the kustomize build as applied by `kubectl apply -k`.
# --quiet prints only warnings and failures: any output fails the check.
mapfile -t manifests < <(ls "$D"/k8s/*.yaml | grep -v '/kustomization.yaml$')
for v in $K8S_VERSIONS; do
    run_silent "k8s: kubernetes-validate --strict -k $v (${#manifests[@]} files in $D/k8s)" \
        kubernetes-validate --strict --quiet -k "$v" "${manifests[@]}"
done
run "k8s: kubectl kustomize $D/k8s" sh -c "kubectl kustomize '$D/k8s' >'$WORK/kustomized.yaml'"
for v in $K8S_VERSIONS; do
    run_silent "k8s: kubernetes-validate --strict -k $v (kustomize build, $(grep -c '^kind:' "$WORK/kustomized.yaml") objects)" \
        kubernetes-validate --strict --quiet -k "$v" "$WORK/kustomized.yaml"
done

# The large-fleet variant (deploy/k8s-emqx: EMQX in place of Mosquitto):
# its own manifests, and the overlay's build (its JSON patches `test` the
# argument they replace, so a changed Deployment fails here).
mapfile -t emqx < <(ls "$D"/k8s-emqx/*.yaml | grep -v '/kustomization.yaml$')
run "k8s-emqx: kubectl kustomize $D/k8s-emqx" sh -c "kubectl kustomize '$D/k8s-emqx' >'$WORK/emqx.yaml'"
for v in $K8S_VERSIONS; do
    run_silent "k8s-emqx: kubernetes-validate --strict -k $v (${#emqx[@]} files, and the overlay's $(grep -c '^kind:' "$WORK/emqx.yaml") objects)" \
        kubernetes-validate --strict --quiet -k "$v" "${emqx[@]}" "$WORK/emqx.yaml"
done
run "k8s-emqx: no Mosquitto object left, every broker address is emqx:8883" \
    sh -c "! grep -q 'mosquitto' '$WORK/emqx.yaml' || { grep -n 'mosquitto' '$WORK/emqx.yaml' | grep -v '^[0-9]*: *#'; exit 1; }"
run "k8s-emqx: the EMQX ACL has every topic of $D/mosquitto/acl (fleet default, %u as \${username})" \
    python3 - "$D" <<'PY'
import re, sys, yaml
d = sys.argv[1]
acl = yaml.safe_load(open(f"{d}/k8s-emqx/emqx-configmap.yaml"))["data"]["acl.conf"]
quoted = set(re.findall(r'"([^"]+)"', acl))
missing = []
for line in open(f"{d}/mosquitto/acl"):
    parts = line.split()
    if len(parts) == 3 and parts[0] in ("pattern", "topic"):
        t = parts[2].replace("@FLEET@", "default").replace("%u", "${username}")
        if t not in quoted:
            missing.append(t)
if missing:
    sys.exit(f"missing from the EMQX acl.conf: {missing}")
PY

# --- Mosquitto --------------------------------------------------------------
# The ConfigMap carries copies of deploy/mosquitto/mosquitto.conf and of the
# ACL rendered for the fleet "default"; they must not drift.
run "mosquitto: $D/k8s/mosquitto-configmap.yaml holds $D/mosquitto/mosquitto.conf and the acl of render.sh default" \
    python3 - "$D" <<'PY'
import subprocess, sys, yaml
d = sys.argv[1]
cm = yaml.safe_load(open(f"{d}/k8s/mosquitto-configmap.yaml"))["data"]
acl = subprocess.run(["sh", f"{d}/mosquitto/render.sh", "default"],
                     capture_output=True, text=True, check=True).stdout
bad = [k for k, want in (("mosquitto.conf", open(f"{d}/mosquitto/mosquitto.conf").read()),
                         ("acl", acl)) if cm.get(k) != want]
if "@FLEET@" in acl or bad:
    sys.exit(f"differs from the shipped file: {bad} (regenerate the ConfigMap's data)")
PY
run "mosquitto: render.sh refuses fleet names that are not topic segments" \
    sh -c "! sh '$D/mosquitto/render.sh' 'a/b' 2>/dev/null && ! sh '$D/mosquitto/render.sh' '#' 2>/dev/null && ! sh '$D/mosquitto/render.sh' '' 2>/dev/null"
run "mosquitto: render-bridge.sh fills every placeholder and refuses bad names and addresses" \
    sh -c "out=\$(sh '$D/mosquitto/render-bridge.sh' default site-1 cloud.example:8883) && ! printf '%s' \"\$out\" | grep -q @ \
        && printf '%s' \"\$out\" | grep -q '^topic dai/v1/default/dev/site-1/partial out 1\$' \
        && ! sh '$D/mosquitto/render-bridge.sh' default 'a/b' x:1 2>/dev/null \
        && ! sh '$D/mosquitto/render-bridge.sh' default site '#:1' 2>/dev/null \
        && ! sh '$D/mosquitto/render-bridge.sh' default site nohostport 2>/dev/null"
# Mosquitto has no config test mode: start it on the shipped config (its
# file paths pointed at a scratch directory, the listener at a free
# loopback port) with throwaway Ed25519 certificates and an empty CRL
# shaped like dai-trust's, and require that it listens, is still running a
# second later and logged no error. What the ACL allows and refuses, and
# that a revoked device is refused, is the Rust test
# tests/edge/mosquitto_acl.rs (real fleet certificates, mosquitto_pub and
# mosquitto_sub).
mosquitto_starts() {
    local m="$WORK/mosquitto" port pid
    mkdir -p "$m/data"
    openssl genpkey -algorithm ed25519 -out "$m/ca.key.pem"
    openssl req -x509 -new -key "$m/ca.key.pem" -subj "/O=default/CN=dai fleet CA" \
        -days 1 -addext basicConstraints=critical,CA:true,pathlen:0 \
        -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature -out "$m/ca.pem"
    openssl genpkey -algorithm ed25519 -out "$m/broker.key.pem"
    openssl req -new -key "$m/broker.key.pem" -subj "/O=default/OU=broker/CN=broker" \
        -out "$m/broker.csr"
    printf '%s\n' "basicConstraints=critical,CA:false" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1" >"$m/broker.ext"
    openssl x509 -req -in "$m/broker.csr" -CA "$m/ca.pem" -CAkey "$m/ca.key.pem" \
        -set_serial 1 -days 1 -extfile "$m/broker.ext" -out "$m/broker.pem"
    # An empty CRL of that CA (what `dai-cloud fleet init` writes as
    # crl.pem): `openssl ca -gencrl` with a minimal config and an empty
    # database ("default_md = default": Ed25519 hashes internally).
    : >"$m/index.txt"
    printf '%s\n' "[ca]" "default_ca = fleet" "[fleet]" "database = $m/index.txt" \
        "default_md = default" "default_crl_days = 1" >"$m/ca.cnf"
    openssl ca -batch -config "$m/ca.cnf" -gencrl -cert "$m/ca.pem" \
        -keyfile "$m/ca.key.pem" -out "$m/crl.pem"
    sh "$D/mosquitto/render.sh" default >"$m/acl"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    sed -e "s#^listener 8883\$#listener $port 127.0.0.1#" \
        -e "s#/etc/mosquitto/dai/#$m/#g" -e "s#/var/lib/mosquitto/#$m/data/#g" \
        "$D/mosquitto/mosquitto.conf" >"$m/mosquitto.conf"
    grep -q "^listener $port 127.0.0.1\$" "$m/mosquitto.conf"
    # As root Mosquitto drops to the user "mosquitto", which cannot read
    # this scratch directory (0700); elsewhere the line has no effect.
    echo "user root" >>"$m/mosquitto.conf"
    mosquitto -c "$m/mosquitto.conf" >"$m/log" 2>&1 &
    pid=$!
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    sleep 1
    local up=0
    kill -0 "$pid" 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && up=1
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    cat "$m/log"
    # The probes (connect, then close without TLS) are logged as failed
    # handshakes, "unexpected eof while reading", at times on an "OpenSSL
    # Error" line: expected. Any other error fails.
    [ "$up" = 1 ] && ! awk '/Error/ && !/unexpected eof while reading/ { bad = 1 }
        END { exit !bad }' "$m/log"
}
run "mosquitto: mosquitto -c $D/mosquitto/mosquitto.conf starts and listens (TLS, ACL of render.sh default)" \
    mosquitto_starts

# --- Prometheus -------------------------------------------------------------
run "prometheus: promtool check config $D/prometheus/prometheus.yml" \
    promtool check config "$D/prometheus/prometheus.yml"
run "prometheus: promtool check rules $D/prometheus/rules/dai.rules.yml" \
    promtool check rules "$D/prometheus/rules/dai.rules.yml"
run "prometheus: promtool test rules $D/prometheus/tests/dai.rules.test.yml" \
    promtool test rules "$D/prometheus/tests/dai.rules.test.yml"

# --- Grafana and metric names -----------------------------------------------
# Structure of the provisioning files and dashboards; every dashboard query
# becomes a recording rule in a scratch rules file that promtool parses
# (PromQL syntax); every metric name in the dashboards and alert rules must
# be one that dai-edge or dai-cloud exports.
run "grafana: provisioning, dashboards, metric names (dashboards and alert rules)" \
    python3 - "$D" "$WORK/dashboard-exprs.rules.yml" <<'PY'
import glob, json, re, sys, yaml

deploy, rules_out = sys.argv[1], sys.argv[2]
errors = []

# What the code exports (name as on the wire). Counters carry _total;
# histograms expose _bucket, _sum and _count.
COUNTERS = """
dai_edge_requests_total dai_edge_cache_hits_total dai_edge_cache_misses_total
dai_edge_cache_evictions_total dai_edge_overloaded_total dai_edge_samples_total
dai_edge_training_runs_total dai_edge_training_diverged_total
dai_edge_sync_acks_total dai_edge_sync_globals_adopted_total
dai_edge_sync_globals_refused_total dai_edge_sensor_samples_total
dai_edge_sensor_faults_total dai_edge_sensor_windows_total
dai_edge_sensor_events_total
dai_cloud_updates_total dai_cloud_update_bytes_total
dai_cloud_globals_published_total dai_cloud_broker_disconnects_total
""".split()
GAUGES = """
dai_edge_cache_used_bytes dai_edge_cache_entries dai_edge_queue_depth
dai_edge_queue_capacity dai_edge_active_workers dai_edge_max_workers
dai_edge_batch_size_current dai_edge_cpu_usage_percent
dai_edge_process_cpu_usage_percent dai_edge_memory_used_bytes
dai_edge_memory_total_bytes dai_edge_process_resident_memory_bytes
dai_edge_model_info dai_edge_latency_p95_seconds dai_edge_sensor_healthy
dai_cloud_global_version dai_cloud_pending_updates
dai_cloud_last_aggregation_timestamp_seconds dai_cloud_devices_online
dai_cloud_devices_known dai_cloud_devices_outbox_pending
dai_cloud_broker_connected
""".split()
HISTOGRAMS = """
dai_edge_request_duration_seconds dai_edge_stage_duration_seconds
dai_edge_batch_rows dai_edge_sensor_latency_seconds dai_cloud_aggregation_seconds
""".split()
EXPORTED = set(COUNTERS) | set(GAUGES) | {
    h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
            "bool", "and", "or", "unless", "offset", "inf", "nan"}

def metric_names(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", "", s)                      # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                     # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok = m.group(0)
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue                                     # 1e3, 0.5e-3
        if s[m.end():].lstrip().startswith("("):
            continue                                     # a function
        if tok.lower() in KEYWORDS:
            continue
        names.append(tok)
    return names

def check_names(where, expr):
    found = metric_names(expr)
    for n in found:
        if n not in EXPORTED:
            errors.append(f"{where}: {n!r} is not an exported metric (expr: {expr})")
    return found

# Provisioning.
ds = yaml.safe_load(open(f"{deploy}/grafana/provisioning/datasources/prometheus.yml"))
uids = {d["uid"] for d in ds.get("datasources", []) if d.get("type") == "prometheus"}
if ds.get("apiVersion") != 1 or not uids:
    errors.append("datasources/prometheus.yml: want apiVersion 1 and a prometheus datasource with a uid")
prov = yaml.safe_load(open(f"{deploy}/grafana/provisioning/dashboards/dai.yml"))
providers = prov.get("providers") or []
if prov.get("apiVersion") != 1 or not providers or any(
        p.get("type") != "file" or not p.get("options", {}).get("path") for p in providers):
    errors.append("dashboards/dai.yml: want apiVersion 1 and file providers with options.path")

# Dashboards.
exprs = []
seen_uids = set()
files = sorted(glob.glob(f"{deploy}/grafana/dashboards/*.json"))
if not files:
    errors.append("no dashboards in grafana/dashboards")
for path in files:
    name = path.rsplit("/", 1)[1]
    try:
        d = json.load(open(path))
    except ValueError as e:
        errors.append(f"{name}: not JSON: {e}")
        continue
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        errors.append(f"{name}: schemaVersion {d.get('schemaVersion')!r} (want >= 36)")
    if not d.get("uid") or d["uid"] in seen_uids:
        errors.append(f"{name}: missing or duplicate uid {d.get('uid')!r}")
    seen_uids.add(d.get("uid"))
    if not d.get("title"):
        errors.append(f"{name}: no title")
    panels = list(d.get("panels", []))
    for p in list(panels):
        panels.extend(p.get("panels", []))             # collapsed rows
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        errors.append(f"{name}: panel ids missing or not unique")
    for p in panels:
        if p.get("type") == "row":
            continue
        where = f"{name}: panel {p.get('id')} {p.get('title')!r}"
        if "gridPos" not in p:
            errors.append(f"{where}: no gridPos")
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{where}: no targets")
        for t in [p] + targets:
            uid = (t.get("datasource") or {}).get("uid")
            if uid is not None and uid not in uids:
                errors.append(f"{where}: datasource uid {uid!r} is not provisioned ({sorted(uids)})")
        for t in targets:
            expr = (t.get("expr") or "").strip()
            if not expr:
                errors.append(f"{where}: target {t.get('refId')} has no expr")
                continue
            if not check_names(where, expr):
                errors.append(f"{where}: no metric name in {expr!r}")
            exprs.append(expr)

# Alert rules.
for path in sorted(glob.glob(f"{deploy}/prometheus/rules/*.yml")):
    for g in yaml.safe_load(open(path))["groups"]:
        for r in g["rules"]:
            check_names(f"{path.rsplit('/', 1)[1]}: {r.get('alert') or r.get('record')}", str(r["expr"]))

with open(rules_out, "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard_exprs", "rules": [
        {"record": f"dashboard_expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}, f)

if errors:
    print("\n".join(errors))
    sys.exit(1)
PY
run "grafana: PromQL of every dashboard query parses (promtool check rules)" \
    promtool check rules "$WORK/dashboard-exprs.rules.yml"

# --- HAProxy ----------------------------------------------------------------
# -c exits 0 on warnings too (an unresolvable server, a deprecated keyword):
# any [WARNING] or [ALERT] fails the check.
run "haproxy: haproxy -c -f $D/haproxy/haproxy.cfg" \
    sh -c "out=\$(haproxy -c -f '$D/haproxy/haproxy.cfg' 2>&1); s=\$?; printf '%s\n' \"\$out\"; [ \$s -eq 0 ] && ! printf '%s' \"\$out\" | grep -qE '\\[(WARNING|ALERT)\\]'"

echo "deploy: all $checks checks passed"
