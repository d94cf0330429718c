"""deploy/ and the Dockerfile against the binaries: every flag a manifest passes exists in that binary's --help, the
image's entrypoint is what the manifests assume, and the sharded deployment agrees with itself on the shard count
(Job completions, StatefulSet replicas, --shard-count, --shard-servers). Exit 77 (skip) without PyYAML.

Usage: deploy_test.py RAPIDIN_SERVER RAPIDIN SOURCE_DIR
"""
import glob
import json
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError as e:
    print(f"deploy_test: skipped, PyYAML not importable ({e})")
    sys.exit(77)

server_bin, cli_bin, src = sys.argv[1:4]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def flags_of(cmd):
    out = subprocess.run(cmd + ["--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", out))


server_flags = flags_of([server_bin])
cache_flags = flags_of([cli_bin, "cache"])

# The image: the server as entrypoint, its default store arguments as CMD (Kubernetes args replace CMD only).
docker = open(os.path.join(src, "Dockerfile")).read()
entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", docker, re.M).group(1))
cmd = json.loads(re.search(r"^CMD (.*)$", docker, re.M).group(1))
check(entry == ["rapidin-server"], f"Dockerfile ENTRYPOINT is {entry}, the manifests assume ['rapidin-server']")
check(all(a in server_flags for a in cmd if a.startswith("--")), f"Dockerfile CMD has unknown flags: {cmd}")


def arg(args, name):
    return args[args.index(name) + 1] if name in args else None


scrape = yaml.safe_load(open(os.path.join(src, "deploy", "prometheus-scrape.yaml")))
keep = [r["regex"] for r in scrape["scrape_configs"][0]["relabel_configs"] if r.get("action") == "keep"]

docs = {}
for path in sorted(glob.glob(os.path.join(src, "deploy", "*.yaml"))):
    for d in yaml.safe_load_all(open(path)):
        if not d or "kind" not in d:  # the Prometheus config
            continue
        docs[(os.path.basename(path), d["kind"], d["metadata"]["name"])] = d
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec")
        if not pod:
            continue
        meta = spec["template"].get("metadata", {})
        if meta.get("annotations", {}).get("prometheus.io/scrape") == "true":
            app = meta["labels"]["app"]
            check(all(re.fullmatch(k, app) for k in keep), f"{path}: pods labelled app={app} are not scraped ({keep})")
        for c in pod["containers"]:
            command = c.get("command", ["rapidin-server"])
            args = c.get("args", [])
            if command == ["rapidin-server"]:
                known = server_flags
            elif command == ["rapidin"] and args[:1] == ["cache"]:
                known = cache_flags
            else:
                failures.append(f"{path}: {c['name']} runs {command} {args[:1]}: not checked by this test")
                continue
            for a in args:
                if a.startswith("--"):
                    check(a in known, f"{path}: {c['name']}: {command[0]} has no flag {a}")
            check(("--store" in args) != ("--shard-servers" in args) or command == ["rapidin"],
                  f"{path}: {c['name']}: exactly one of --store and --shard-servers")
            if command == ["rapidin-server"]:  # TLS and tokens, from files on Secret volumes
                secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
                secret_mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
                need = ["--tls-cert", "--tls-key", "--auth-tokens"]
                if "--shard-servers" in args:
                    need += ["--shard-tls-ca", "--shard-tls-cert", "--shard-tls-key", "--shard-token-file"]
                for flag in need:
                    value = arg(args, flag)
                    check(value is not None, f"{path}: {c['name']}: no {flag}")
                    check(value is None or any(value.startswith(m + "/") for m in secret_mounts),
                          f"{path}: {c['name']}: {flag} {value} is not on a Secret volume ({secret_mounts})")
                probe = c.get("readinessProbe", {})
                check("grpc" not in probe, f"{path}: {c['name']}: a gRPC readiness probe cannot speak TLS")
            env = {e["name"] for e in c.get("env", [])}
            for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
                check(ref in env, f"{path}: {c['name']}: $({ref}) is not defined in env (Kubernetes would not expand it)")

sharded = "rapidin-sharded.yaml"
job = docs[(sharded, "Job", "rapidin-cache")]
sts = docs[(sharded, "StatefulSet", "rapidin-shard")]
router = docs[(sharded, "Deployment", "rapidin-router")]
n = sts["spec"]["replicas"]
check(job["spec"]["completionMode"] == "Indexed", "the caching Job must be Indexed (JOB_COMPLETION_INDEX)")
check(job["spec"]["completions"] == n and job["spec"]["parallelism"] == n,
      f"Job completions/parallelism {job['spec']['completions']}/{job['spec']['parallelism']} != {n} shard servers")
job_args = job["spec"]["template"]["spec"]["containers"][0]["args"]
check(arg(job_args, "--shard-count") == str(n), f"--shard-count {arg(job_args, '--shard-count')} != {n}")
store = arg(job_args, "--store")
sts_store = arg(sts["spec"]["template"]["spec"]["containers"][0]["args"], "--store")
for i in range(n):  # pod i of the Job writes the store that pod i of the StatefulSet serves
    written = store.replace("$(SHARD_INDEX)", str(i))
    served = sts_store.replace("$(POD_NAME)", f"{sts['metadata']['name']}-{i}")
    check(written == served, f"Job index {i} writes {written} but shard server {i} serves {served}")
servers = arg(router["spec"]["template"]["spec"]["containers"][0]["args"], "--shard-servers").split(",")
want = [f"{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:50051" for i in range(n)]
check(servers == want, f"--shard-servers {servers} != the StatefulSet's pods {want}")
router_args = router["spec"]["template"]["spec"]["containers"][0]["args"]
check(arg(router_args, "--model") == arg(job_args, "--model"), "the router's --model differs from the cached one")

# kustomization.yaml: its resources exist, and the Grafana dashboard ConfigMap is generated from the dashboard JSON
# with the label Grafana's sidecar watches (the metric names themselves: tests/http_test.py, against a server).
kust = yaml.safe_load(open(os.path.join(src, "deploy", "kustomization.yaml")))
for r in kust["resources"]:
    check(os.path.exists(os.path.join(src, "deploy", r)), f"kustomization resource {r} missing")
gen = {g["name"]: g for g in kust["configMapGenerator"]}
dash = gen.get("rapidin-grafana-dashboard")
check(dash is not None and dash["options"]["labels"].get("grafana_dashboard") == "1", "dashboard ConfigMap label")
for f in (dash or {}).get("files", []):
    d = json.load(open(os.path.join(src, "deploy", f)))
    check(d.get("panels"), f"{f} has no panels")

if failures:
    print("\n".join("FAIL: " + f for f in failures))
    sys.exit(1)
print(f"deploy_test: {len(docs)} manifests checked against {server_bin} and {cli_bin}")
