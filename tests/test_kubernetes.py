"""deploy/kubernetes: valid against the Kubernetes schemas, and in step with fedsim.

No cluster runs here, so the manifests are validated, not run:

- every manifest against the Kubernetes JSON schemas that kubernetes-validate
  ships (strict: an unknown field is an error), offline, for Kubernetes 1.30 (the
  oldest version the README promises) and 1.37 (the newest the pinned package has);
- structure: kustomization.yaml lists every manifest, the ConfigMap holds exactly
  the settings users may set with the code's defaults, every fedsim container
  gets them and the fixed values, probes hit /healthz on the container port the
  image binds, the pods run as the images' user under the "restricted" Pod
  Security Standard, the workers are a work-queue Job;
- what the manifests run that is not elsewhere tested: `python -m fedsim.data`
  (the workers' init container) and the wait-for-aggregator script, for real
  against local HTTP servers;
- `kubectl kustomize`, when kubectl is installed, builds the directory and an
  overlay that points the images at a registry.
"""

from __future__ import annotations

import copy
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from fedsim import cli, config

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")
MANIFESTS = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")

# Settings the manifests fix instead of the ConfigMap: the Service's address, the
# two mount points, and TensorFlow's threads from the worker's CPU limit.
FIXED = {
    "AGGREGATOR_URL": "http://aggregator:8080",
    "DATA_DIR": "/data",
    "MODEL_DIR": "/models",
    "TOKENS_FILE": "/run/secrets/fedsim-tokens",
}
# Fixed in the workers alone: the emptyDir their top-k residuals live in (COMPRESSION=topk).
WORKER_FIXED = {"WORKER_STATE_DIR": "/state"}
SECRET = "CLIENT_TOKEN"  # the workers read their token from the Secret, not the ConfigMap
FROM_CPU_LIMIT = "TF_THREADS"
SETTINGS_MAP = "fedsim-settings"
WAIT_CONTAINER = "wait-for-aggregator"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --- reading the manifests -------------------------------------------------------------


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [doc for name in MANIFESTS for doc in load(name)]


def find(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


def all_containers(docs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    for workload in workloads(docs):
        for c in containers(pod_spec(workload)):
            yield workload["metadata"]["name"], pod_spec(workload), c


def one(items: list[dict], name: str) -> dict:
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, f"expected one {name!r} in {[i['name'] for i in items]}"
    return found[0]


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volume_for(spec: dict, container: dict, path: str) -> dict:
    mount = mounts(container).get(path)
    assert mount, f"{container['name']} mounts nothing at {path}"
    return one(spec["volumes"], mount["name"])


def quantity(raw: str) -> float:
    """A Kubernetes quantity ("250m", "2", "192Mi", "1Gi") as a number of units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi)?", str(raw))
    assert match, f"unreadable quantity {raw!r}"
    scale = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match[2]]
    return float(match[1]) * scale


def image_user_id(dockerfile: str) -> int:
    match = re.search(r"useradd .*--uid (\d+)", (ROOT / dockerfile).read_text())
    assert match, f"{dockerfile} creates no user with a fixed --uid"
    return int(match[1])


def runs_fedsim(container: dict) -> bool:
    """Every container except the wait script runs fedsim and reads the settings."""
    return container["name"] != WAIT_CONTAINER


# --- schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_against_the_kubernetes_schemas(name, version):
    documents = load(name)
    assert documents, f"{name} holds no manifest"
    for doc in documents:
        # Raises ValidationError (a wrong or unknown field) or SchemaNotFoundError.
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda d: d["spec"].update(replica=1), id="unknown field"),
        pytest.param(
            lambda d: pod_spec(d)["containers"][0]["ports"][0].update(containerPort="8080"),
            id="string port",
        ),
        pytest.param(
            lambda d: pod_spec(d)["containers"][0]["livenessProbe"]["httpGet"].pop("port"),
            id="probe without port",
        ),
    ],
)
def test_the_validation_refuses_a_spoilt_manifest(docs, spoil):
    deployment = copy.deepcopy(find(docs, "Deployment", "aggregator"))
    kubernetes_validate.validate(copy.deepcopy(deployment), SCHEMA_VERSIONS[0], strict=True)
    spoil(deployment)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


# --- kustomization ----------------------------------------------------------------------


def test_kustomization_lists_every_manifest_once():
    kustomization = load("kustomization.yaml")[0]
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), f"listed twice: {resources}"
    assert sorted(resources) == MANIFESTS, "kustomization.yaml resources != the *.yaml files"


def test_kustomization_namespace_is_the_namespace_manifest(docs):
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert namespaces == [load("kustomization.yaml")[0]["namespace"]]
    assert all("namespace" not in d["metadata"] for d in docs), "kustomize sets namespaces"


def test_kustomize_images_name_every_container_image(docs):
    entries = {e["name"]: e for e in load("kustomization.yaml")[0]["images"]}
    used = {c["image"] for _, _, c in all_containers(docs)}
    assert {image.split(":")[0] for image in used} == set(entries)
    for image in used:
        name, tag = image.split(":")
        assert entries[name].get("newName", name) == name and entries[name]["newTag"] == tag
    # A local cluster (kind, minikube) runs images loaded into it, never pulled.
    for _, _, c in all_containers(docs):
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]


# --- settings ---------------------------------------------------------------------------


def test_configmap_holds_exactly_the_settings_users_set(docs):
    data = find(docs, "ConfigMap", SETTINGS_MAP)["data"]
    unknown = sorted(set(data) - config.KNOWN_KEYS)
    assert not unknown, f"not settings: {unknown}"
    missing = sorted(
        config.KNOWN_KEYS - set(FIXED) - set(WORKER_FIXED) - {FROM_CPU_LIMIT, SECRET} - set(data)
    )
    assert not missing, f"{SETTINGS_MAP} lacks {missing}"
    fixed_here = sorted((set(FIXED) | set(WORKER_FIXED) | {FROM_CPU_LIMIT}) & set(data))
    assert not fixed_here, f"fixed by the manifests, not the ConfigMap: {fixed_here}"


def test_configmap_values_are_the_code_defaults(docs, tmp_path):
    data = find(docs, "ConfigMap", SETTINGS_MAP)["data"]
    defaults = {s.key: s.default for s in config.SETTINGS}
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    differing = {k: (v, defaults[k]) for k, v in data.items() if v != defaults[k]}
    assert not differing, f"ConfigMap differs from the code's defaults: {differing}"
    absent = tmp_path / "absent.env"
    in_pod = config.load(environ={**data, **FIXED}, env_file=absent)
    assert in_pod.to_dict() == config.load(environ=dict(FIXED), env_file=absent).to_dict()


def test_every_fedsim_container_gets_the_settings_and_the_fixed_values(docs):
    checked = 0
    for workload, _, c in all_containers(docs):
        env = {e["name"]: e for e in c.get("env", [])}
        if not runs_fedsim(c):
            assert env["AGGREGATOR_URL"]["value"] == FIXED["AGGREGATOR_URL"]
            continue
        sources = [s["configMapRef"]["name"] for s in c.get("envFrom", [])]
        assert sources == [SETTINGS_MAP], f"{workload}/{c['name']}: envFrom {sources}"
        fixed = {**FIXED, **(WORKER_FIXED if c["name"] == "client" else {})}
        for key, value in fixed.items():
            assert env.get(key, {}).get("value") == value, f"{workload}/{c['name']}: {key}"
        assert not set(env) - set(fixed) - {FROM_CPU_LIMIT}, f"{workload}/{c['name']}: {env}"
        checked += 1
    assert checked == 4  # prepare, aggregator, data, client


def test_fixed_values_match_the_service_and_the_mounts(docs):
    service = find(docs, "Service", "aggregator")
    url = urlparse(FIXED["AGGREGATOR_URL"])
    assert url.hostname == service["metadata"]["name"]
    assert url.port == one(service["spec"]["ports"], "http")["port"]
    allowed = {FIXED["DATA_DIR"], FIXED["MODEL_DIR"], "/tmp", "/run/secrets"}
    for workload, spec, c in all_containers(docs):
        state = {WORKER_FIXED["WORKER_STATE_DIR"]} if c["name"] == "client" else set()
        assert set(mounts(c)) <= allowed | state, f"{workload}/{c['name']}: {sorted(mounts(c))}"
        if state:  # the workers' residuals: a writable volume of the pod's own
            assert "emptyDir" in volume_for(spec, c, WORKER_FIXED["WORKER_STATE_DIR"])
            assert not mounts(c)["/state"].get("readOnly")


def test_tensorflow_threads_follow_the_worker_cpu_limit(docs):
    client = one(pod_spec(find(docs, "Job", "client"))["containers"], "client")
    ref = one(client["env"], FROM_CPU_LIMIT)["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "client", "resource": "limits.cpu", "divisor": "1"}
    limit = quantity(client["resources"]["limits"]["cpu"])
    assert limit == int(limit) >= 1, "a whole number of cores, so the thread count is exact"


# --- aggregator ------------------------------------------------------------------------


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    for p in container["ports"]:
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"{container['name']} has no port {port!r}")


def test_probes_hit_healthz_on_the_port_the_image_binds(docs):
    spec = pod_spec(find(docs, "Deployment", "aggregator"))
    aggregator = one(spec["containers"], "aggregator")
    bind = re.search(
        r"ENV BIND=[\d.]+:(\d+)", (ROOT / "services/aggregator/Dockerfile").read_text()
    )
    assert bind, "services/aggregator/Dockerfile sets no BIND"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = aggregator[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert container_port(aggregator, get["port"]) == int(bind[1]), probe
    service = find(docs, "Service", "aggregator")
    target = one(service["spec"]["ports"], "http")["targetPort"]
    assert container_port(aggregator, target) == int(bind[1])


def test_service_selects_the_aggregator_only(docs):
    selector = find(docs, "Service", "aggregator")["spec"]["selector"]
    for workload in workloads(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selected = selector.items() <= labels.items()
        assert selected == (workload["metadata"]["name"] == "aggregator"), workload["kind"]


def test_deployment_selector_matches_its_pods(docs):
    deployment = find(docs, "Deployment", "aggregator")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_aggregator_is_one_writer_that_checkpoints_on_sigterm(docs):
    from fedsim.aggregator import gunicorn_conf

    deployment = find(docs, "Deployment", "aggregator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace == 30 and grace > gunicorn_conf.graceful_timeout


def test_checkpoints_volume_is_the_claim_and_prepare_runs_first(docs):
    claim = find(docs, "PersistentVolumeClaim", "models")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    spec = pod_spec(find(docs, "Deployment", "aggregator"))
    prepare = one(spec["initContainers"], "prepare")
    assert prepare["args"] == ["python", "-m", "fedsim.prepare"]
    for c in (prepare, one(spec["containers"], "aggregator")):
        volume = volume_for(spec, c, FIXED["MODEL_DIR"])
        assert volume["persistentVolumeClaim"]["claimName"] == "models", c["name"]
        assert not mounts(c)[FIXED["MODEL_DIR"]].get("readOnly"), c["name"]
    assert "emptyDir" in volume_for(spec, prepare, FIXED["DATA_DIR"])


# --- workers ----------------------------------------------------------------------------


def test_workers_are_a_work_queue_job(docs):
    job = find(docs, "Job", "client")
    assert "completions" not in job["spec"], "a work-queue Job leaves completions unset"
    assert job["spec"]["parallelism"] >= 1
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "client"]


def test_a_bad_setting_fails_the_job_at_once(docs):
    def bad_setting() -> int:
        raise config.ConfigError("MAX_RETRY", "zero", "an integer >= 1")

    code = cli.run("client", bad_setting)
    rules = find(docs, "Job", "client")["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and fail[0]["onExitCodes"] == {"operator": "In", "values": [code]}


def test_workers_get_mnist_from_their_own_init_container(docs):
    spec = pod_spec(find(docs, "Job", "client"))
    init = [c["name"] for c in spec["initContainers"]]
    assert init == ["data", WAIT_CONTAINER], "data first, then wait for the aggregator"
    data = one(spec["initContainers"], "data")
    client = one(spec["containers"], "client")
    assert data["args"] == ["python", "-m", "fedsim.data"]
    assert client["args"] == ["python", "-m", "fedsim.client"]
    written = volume_for(spec, data, FIXED["DATA_DIR"])
    assert written is volume_for(spec, client, FIXED["DATA_DIR"]) and "emptyDir" in written
    assert mounts(client)[FIXED["DATA_DIR"]]["readOnly"] is True
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"]), "no shared volume"


# --- security and resources -------------------------------------------------------------


def test_pods_run_as_the_images_user_under_the_restricted_standard(docs):
    uids = {image_user_id(f"services/{s}/Dockerfile") for s in ("aggregator", "client")}
    assert len(uids) == 1, f"the two images' users differ: {uids}"
    (uid,) = uids
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(docs):
        context = pod_spec(workload)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == context["runAsGroup"] == context["fsGroup"] == uid
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec(workload)["enableServiceLinks"] is False
    for workload, spec, c in all_containers(docs):
        where = f"{workload}/{c['name']}"
        context = c["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["capabilities"] == {"drop": ["ALL"]}, where
        assert context["readOnlyRootFilesystem"] is True, where
        if runs_fedsim(c):
            assert "emptyDir" in volume_for(spec, c, "/tmp"), where


def test_every_container_requests_and_limits_cpu_and_memory(docs):
    for workload, _, c in all_containers(docs):
        resources = c["resources"]
        for kind in ("cpu", "memory"):
            request = quantity(resources["requests"][kind])
            limit = quantity(resources["limits"][kind])
            assert 0 < request <= limit, f"{workload}/{c['name']} {kind}: {request} > {limit}"


def test_tokens_secret_is_required_and_mounted_where_tokens_file_says(docs):
    assert not [d for d in docs if d["kind"] == "Secret"], "apply must never replace the tokens"
    for name, kind in (("aggregator", "Deployment"), ("client", "Job")):
        spec = pod_spec(find(docs, kind, name))
        c = one(spec["containers"], name)
        secret = volume_for(spec, c, "/run/secrets")["secret"]
        assert secret["secretName"] == "fedsim-tokens" and secret["optional"] is False
        assert secret["items"] == [{"key": "tokens", "path": "fedsim-tokens"}]
        assert mounts(c)["/run/secrets"]["readOnly"] is True


# --- what the init containers run -------------------------------------------------------


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def serve() -> Iterator:
    """Start HTTP servers on 127.0.0.1 for a test; each is shut down after it."""
    servers = []

    def start(handler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_python(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    base["FEDSIM_ENV_FILE"] = str(cwd / "absent.env")  # never the project's .env
    # The timeout only turns a hang (a script that never returns) into a failure.
    return subprocess.run(
        [sys.executable, *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_data(tmp_path: Path, data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "fedsim.data"], {"DATA_DIR": str(data_dir), **env}, tmp_path)


def test_fedsim_data_verifies_the_files_it_finds(tmp_path, mnist_dir):
    data = tmp_path / "data"
    shutil.copytree(mnist_dir, data)
    result = run_data(tmp_path, data, MNIST_MIRRORS=closed_port_url() + "/")
    assert result.returncode == 0, result.stderr
    assert f"data ok in {data}" in result.stdout


def test_fedsim_data_downloads_what_is_absent(tmp_path, mnist_dir, serve):
    mirror = serve(lambda *a, **k: _Files(*a, directory=str(mnist_dir), **k))
    data = tmp_path / "empty"
    result = run_data(tmp_path, data, MNIST_MIRRORS=f"{closed_port_url()}/ {mirror}/")
    assert result.returncode == 0, result.stderr
    for name in MNIST_FILES:
        assert (data / name).read_bytes() == (mnist_dir / name).read_bytes(), name


def test_fedsim_data_refuses_a_corrupt_file_in_one_line(tmp_path, mnist_dir):
    data = tmp_path / "data"
    shutil.copytree(mnist_dir, data)
    labels = data / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    result = run_data(tmp_path, data, MNIST_MIRRORS=closed_port_url() + "/")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim data: error: "), result.stderr
    assert "train-labels-idx1-ubyte" in lines[0]


def test_fedsim_data_refuses_a_bad_setting_with_the_exit_code_the_job_fails_on(tmp_path):
    result = run_data(tmp_path, tmp_path / "data", DATA_VERIFY="maybe")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "fedsim data: error: invalid setting DATA_VERIFY='maybe': true or false"
    )
    assert not (tmp_path / "data").exists(), "nothing is downloaded on a bad setting"


def wait_script(docs: list[dict]) -> list[str]:
    init = pod_spec(find(docs, "Job", "client"))["initContainers"]
    return one(init, WAIT_CONTAINER)["args"][1:]  # ["-c", source]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class _Unready(_Health):
    status = 503


def test_wait_script_returns_once_the_aggregator_is_healthy(docs, tmp_path, serve):
    url = serve(_Health)
    result = run_python(wait_script(docs), {"AGGREGATOR_URL": url, "WAIT_SECONDS": "5"}, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("answer", ["closed port", "503"])
def test_wait_script_gives_up_after_wait_seconds(docs, tmp_path, serve, answer):
    url = closed_port_url() if answer == "closed port" else serve(_Unready)
    result = run_python(wait_script(docs), {"AGGREGATOR_URL": url, "WAIT_SECONDS": "0"}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"aggregator not ready at {url}/healthz: ")


# --- kubectl kustomize, where kubectl is installed --------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@needs_kubectl
def test_kustomize_builds_every_manifest_into_the_namespace(docs):
    built = kustomize(KUBE)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in docs
    )
    for doc in built:
        kubernetes_validate.validate(doc, SCHEMA_VERSIONS[0], strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fedsim", doc["kind"]


@needs_kubectl
def test_an_overlay_points_the_images_at_a_registry(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(KUBE, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [base],
                "images": [
                    {"name": n, "newName": f"registry.example.org:5000/{n}", "newTag": "7"}
                    for n in ("fedsim-aggregator", "fedsim-client")
                ],
            }
        )
    )
    images = [c["image"] for _, _, c in all_containers(kustomize(overlay))]
    assert len(images) == 5
    assert all(re.fullmatch(r"registry\.example\.org:5000/fedsim-\w+:7", i) for i in images)
