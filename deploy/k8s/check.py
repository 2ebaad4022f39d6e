#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster.

1. Renders an overlay the way `kubectl apply -k` would, for the subset of
   kustomize Stride's manifests use (resources, namespace, images,
   configMapGenerator with disableNameSuffixHash, JSON6902 patches); any
   other kustomization field is an error here, so the overlay cannot grow
   features this renderer silently ignores.
2. Validates every rendered object against the Kubernetes OpenAPI schemas
   in strict mode (unknown fields are errors) with kubernetes-validate.
3. Checks that the manifests agree with the product: worker count, ports,
   probes, config file, token file, grace period; and that every command
   line is accepted by the binaries (`--dry-run`).
4. Runs the job locally exactly as the manifests start it — same command
   lines and environment, hosts rewritten to 127.0.0.1, the GPU request
   ignored, the config from the ConfigMap shrunk to a tiny model with
   --set — and requires it to finish.

Usage: check.py --bin target/debug [--overlay h100x8] [--k8s-version 1.33.0]
"""

import argparse
import copy
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import jsonpatch
import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches",
                "configMapGenerator", "generatorOptions"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


def fail(msg):
    print(f"check.py: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def render(directory: pathlib.Path):
    """The objects of a kustomization directory, rendered."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN_FIELDS
    if unknown:
        fail(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which this renderer does not implement")
    objects = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        if not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
            fail("configMapGenerator without disableNameSuffixHash is not supported")
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (pathlib.Path(f).name, "", f)
            data[key] = (directory / src).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"]}, "data": data})
    for p in k.get("patches", []):
        target = p["target"]
        ops = yaml.safe_load(p["patch"]) if "patch" in p else yaml.safe_load((directory / p["path"]).read_text())
        hits = [o for o in objects if o["kind"] == target.get("kind", o["kind"])
                and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
        if not hits:
            fail(f"patch target {target} matches nothing")
        for o in hits:
            patched = jsonpatch.apply_patch(o, ops)
            o.clear()
            o.update(patched)
    if "namespace" in k:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for img in k.get("images", []):
        for o in objects:
            for c in containers(o):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f'{img.get("newName", name)}:{img.get("newTag", tag or "latest")}'
    return objects


def containers(obj):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def one(objects, kind, name):
    hits = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(hits) != 1:
        fail(f"expected one {kind} {name}, found {len(hits)}")
    return hits[0]


def flag(args, name):
    """The value of --name=value or --name value in a container's args."""
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def mount_for(pod_spec, container, path):
    """(volume, file) for an absolute file path inside a mounted volume."""
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        if path.startswith(root):
            vol = next(v for v in pod_spec["volumes"] if v["name"] == m["name"])
            return vol, path[len(root):]
    fail(f"{path} is not inside any volume mount of {container['name']}")


def consistency(objects):
    coord_job = one(objects, "Job", "stride-coordinator")
    workers = one(objects, "Job", "stride-workers")
    service = one(objects, "Service", "stride-coordinator")
    cspec = coord_job["spec"]["template"]["spec"]
    wspec = workers["spec"]["template"]["spec"]
    coord = cspec["containers"][0]
    worker = wspec["containers"][0]
    cargs, wargs = coord["args"], worker["args"]

    n = int(flag(cargs, "workers"))
    if not (n == workers["spec"]["parallelism"] == workers["spec"]["completions"]):
        fail(f"--workers={n} but the worker Job has parallelism {workers['spec']['parallelism']}, "
             f"completions {workers['spec']['completions']}")
    if workers["spec"].get("completionMode") != "Indexed":
        fail("the worker Job must be Indexed")

    port = int(flag(cargs, "listen").rsplit(":", 1)[1])
    by_name = lambda ports, key: {p["name"]: p[key] for p in ports}
    sports = [p["targetPort"] for p in service["spec"]["ports"] if p["name"] == "grpc"] + \
        [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    probes = [coord[p]["grpc"]["port"] for p in ("readinessProbe", "livenessProbe")]
    cports = [by_name(coord["ports"], "containerPort").get("grpc")]
    if any(p != port for p in sports + probes + cports):
        fail(f"--listen port {port}, service {sports}, probes {probes}, container ports {cports} disagree")
    mport = int(flag(cargs, "metrics-listen").rsplit(":", 1)[1])
    annotations = coord_job["spec"]["template"]["metadata"].get("annotations", {})
    mports = [by_name(coord["ports"], "containerPort").get("metrics"),
              by_name(service["spec"]["ports"], "port").get("metrics"),
              by_name(service["spec"]["ports"], "targetPort").get("metrics"),
              int(annotations.get("prometheus.io/port", -1))]
    if any(p != mport for p in mports):
        fail(f"--metrics-listen port {mport}, container/service/annotation ports {mports} disagree")
    if service["spec"]["selector"].items() > coord_job["spec"]["template"]["metadata"]["labels"].items():
        fail("the Service does not select the coordinator pod")
    connect = flag(wargs, "connect")
    if connect != f"http://{service['metadata']['name']}:{port}":
        fail(f"workers connect to {connect}, the Service is {service['metadata']['name']}:{port}")

    config_path = flag(cargs, "config")
    vol, key = mount_for(cspec, coord, config_path)
    cm = one(objects, "ConfigMap", vol["configMap"]["name"])
    if key not in cm["data"]:
        fail(f"--config={config_path}: the ConfigMap {cm['metadata']['name']} has no {key}")
    same = (REPO / "configs" / key).read_text() == cm["data"][key]
    if not same:
        fail(f"deploy/k8s/base/{key} differs from configs/{key}: copy configs/{key} over it")

    for spec, c, args in ((cspec, coord, cargs), (wspec, worker, wargs)):
        vol, key = mount_for(spec, c, flag(args, "token-file"))
        if "secret" not in vol:
            fail(f"{c['name']}: the token file must come from a Secret")
        for res in ("requests", "limits"):
            if res not in c.get("resources", {}):
                fail(f"{c['name']} has no resource {res}")
        sc = c.get("securityContext", {})
        if not spec["securityContext"].get("runAsNonRoot") or sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{c['name']} must run as non-root without privilege escalation")
        if spec.get("terminationGracePeriodSeconds", 30) < 120:
            fail(f"{c['name']}: terminationGracePeriodSeconds must leave time to finish a checkpoint")
    if worker["resources"]["limits"].get("nvidia.com/gpu") != 1:
        fail("each worker must request one GPU")
    print(f"consistency: {n} workers, port {port}, config {config_path}: ok")
    return coord_job, workers, cm


def rewrite(args, mapping):
    out = []
    for a in args:
        for old, new in mapping.items():
            a = a.replace(old, new)
        out.append(a)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_run(objects, coord_job, workers_job, cm, bins: pathlib.Path):
    """The job as the manifests start it, on 127.0.0.1."""
    coord = coord_job["spec"]["template"]["spec"]["containers"][0]
    worker = workers_job["spec"]["template"]["spec"]["containers"][0]
    n = workers_job["spec"]["completions"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        etc = tmp / "etc-stride"
        etc.mkdir()
        for k, v in cm["data"].items():
            (etc / k).write_text(v)
        (tmp / "token").write_text("local-stand-in-token\n")
        shared = tmp / "shared"
        shared.mkdir()
        port = free_port()
        mapping = {
            "/etc/stride": str(etc),
            "/var/run/stride/token": str(tmp / "token"),
            "/shared": str(shared),
            "0.0.0.0:": "127.0.0.1:",
            f"http://stride-coordinator:": "http://127.0.0.1:",
            ":29400": f":{port}",
            ":9400": f":{free_port()}",
        }
        cargs = rewrite(coord["args"], mapping)
        wargs = rewrite(worker["args"], mapping)
        env = {e["name"]: e["value"] for e in worker.get("env", [])}

        # Every command line must be accepted as written (paths rewritten).
        for binary, args in (("coordinator", cargs), ("worker", wargs)):
            r = subprocess.run([str(bins / binary), *args, "--dry-run"], cwd=shared,
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                fail(f"{binary} {' '.join(args)} --dry-run: {r.stderr}")
        print("command lines: accepted by coordinator and worker (--dry-run)")

        shrink = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
                  "--set", "model.vocab_size=128", "--set", "model.context=32", "--set", "data.train=",
                  "--set", "data.val=", "--set", "data.synthetic_tokens=20000", "--set", "worker.device=cpu",
                  "--set", "train.max_steps=3", "--set", "train.warmup_steps=1", "--set", "train.eval_batches=1",
                  "--set", "checkpoint.interval=0", "--set", "cluster.startup_timeout_s=120"]
        base_env = {k: v for k, v in os.environ.items() if k != "STRIDE_TOKEN"}
        log = open(tmp / "coordinator.log", "w")
        procs = []
        try:
            c = subprocess.Popen([str(bins / "coordinator"), *cargs, *shrink], cwd=shared,
                                 stdout=log, stderr=subprocess.STDOUT, env=base_env)
            procs.append(c)
            for i in range(n):
                wenv = dict(base_env, **env, JOB_COMPLETION_INDEX=str(i), RAYON_NUM_THREADS="1")
                wlog = open(tmp / f"worker-{i}.log", "w")
                procs.append(subprocess.Popen([str(bins / "worker"), *wargs], cwd=shared,
                                              stdout=wlog, stderr=subprocess.STDOUT, env=wenv))
            deadline = time.time() + 300
            while c.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if c.returncode != 0:
                fail(f"the coordinator exited with {c.returncode}:\n{(tmp / 'coordinator.log').read_text()[-4000:]}")
            for i, w in enumerate(procs[1:]):
                if w.wait(timeout=60) != 0:
                    fail(f"worker {i} exited with {w.returncode}:\n{(tmp / f'worker-{i}.log').read_text()[-2000:]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        metrics = (shared / flag(cargs, "run-dir").replace(str(shared) + "/", "") / "metrics.jsonl")
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
        if len(steps) != 3 or steps[-1]["workers"] != n:
            fail(f"the local stand-in trained {len(steps)} steps")
        print(f"local stand-in: {n} workers trained 3 steps with the manifests' command lines")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, type=pathlib.Path, help="folder with the coordinator and worker binaries")
    ap.add_argument("--overlay", default="h100x8")
    ap.add_argument("--k8s-version", default="1.33.0")
    a = ap.parse_args()
    objects = render(HERE / "overlays" / a.overlay)
    for o in objects:
        try:
            kubernetes_validate.validate(copy.deepcopy(o), a.k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{o['kind']} {o['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
    print(f"schemas: {len(objects)} objects valid for Kubernetes {a.k8s_version} (strict)")
    coord_job, workers, cm = consistency(objects)
    local_run(objects, coord_job, workers, cm, a.bin.resolve())
    print("deploy/k8s: all checks passed")


if __name__ == "__main__":
    main()
