"""A real, throwaway Kubernetes control plane for tests (no Docker, no kubelet, loopback only).

Processes (all bound to 127.0.0.1, random free ports, one temp dir):

* etcd 3.6                       -- storage
* kube-apiserver                 -- RBAC + Node authorization, admission, SA token signing
* kube-controller-manager        -- Job/Deployment/ReplicaSet/SA/namespace/GC/... controllers
* kube-scheduler                 -- binds pods to nodes (resources, taints, tolerations)
* kwok                           -- plays the kubelet: makes nodes Ready, moves bound pods through
                                    Pending -> Running -> Succeeded/Failed, serves `kubectl logs`

The binaries come from ``tests/k8s/build.sh`` (cached under
``${LSBERT_CACHE:-~/.cache/lsbert}/k8s/<K8S_VERSION>/bin``); this module builds nothing.

kwok runs no containers: images are never pulled and a pod's command never executes. Pod
behaviour is scripted by labels/annotations on the pod (see the ``LABEL_*``/``ANNOTATION_*``
constants):

* every pod bound to a node becomes Running + Ready;
* a Running pod owned by a Job becomes Succeeded (exit 0) after ``lsbert.test/duration``
  (default 1s);
* a Running pod labelled ``lsbert.test/fail: "true"`` becomes Failed (exit code
  ``lsbert.test/exit-code``, default 1) after ``lsbert.test/duration`` (default 1s);
* ``kubectl logs`` returns the file set with :meth:`ControlPlane.set_pod_log`, or the text of
  :meth:`ControlPlane.set_default_log` for every other pod.

Usage::

    cp = ControlPlane()
    cp.start()
    try:
        core = kubernetes.client.CoreV1Api(cp.api_client())
        ...
    finally:
        cp.stop()
"""

from __future__ import annotations

import atexit
import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tests.support import polling

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
VERSIONS_FILE = HERE / "versions.env"
# kwok Stage and ClusterLogs definitions (YAML with __PLACEHOLDER__ names filled by _kwok_config).
KWOK_DIR = HERE / "kwok"

# Pod behaviour knobs understood by the kwok stages this module installs.
LABEL_FAIL = "lsbert.test/fail"  # "true" -> the pod ends Failed
ANNOTATION_DURATION = "lsbert.test/duration"  # Go duration ("5s"): time Running before the end
ANNOTATION_EXIT_CODE = "lsbert.test/exit-code"  # exit code of a failing pod (default 1)
ANNOTATION_REASON = "lsbert.test/reason"  # terminated.reason of a failing pod (default Error)
ANNOTATION_MESSAGE = "lsbert.test/message"  # terminated.message of a failing pod

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE = "gpu-node-1"
CPU_NODE = "cpu-node-1"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
KSERVE_CRDS = (
    "serving.kserve.io_inferenceservices.yaml",
    "serving.kserve.io_servingruntimes.yaml",
    "serving.kserve.io_clusterservingruntimes.yaml",
)
SERVICE_CIDR = "10.96.0.0/16"  # fake; never contacted
POD_CIDR = "10.244.0.1/16"  # fake pod IPs that kwok writes into pod status; never contacted

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl", "helm")


class ControlPlaneError(RuntimeError):
    """The control plane failed to start or a helper command failed."""


# --------------------------------------------------------------------------------------------
# versions / locations
# --------------------------------------------------------------------------------------------


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse ``versions.env`` (plain KEY=VALUE lines; ``#`` comments)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def cache_dir() -> Path:
    """``${LSBERT_CACHE:-~/.cache/lsbert}/k8s/<K8S_VERSION>`` (what build.sh fills)."""
    root = Path(os.environ.get("LSBERT_CACHE") or Path.home() / ".cache" / "lsbert")
    return root / "k8s" / read_versions()["K8S_VERSION"]


def default_bin_dir() -> Path:
    override = os.environ.get("LSBERT_K8S_BIN_DIR")
    return Path(override) if override else cache_dir() / "bin"


def kwok_crd_dir() -> Path:
    return cache_dir() / "kwok-crds"


def missing_binaries(bin_dir: Path | None = None) -> list[str]:
    """Names of the required binaries (and kwok CRD files) that build.sh has not produced."""
    bin_dir = bin_dir or default_bin_dir()
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if not (kwok_crd_dir() / "kwok.x-k8s.io_logs.yaml").is_file():
        missing.append("kwok-crds/kwok.x-k8s.io_logs.yaml")
    return missing


def shared_dir() -> Path:
    override = os.environ.get("LSBERT_SHARED_DIR")
    return Path(override) if override else (REPO_ROOT.parent / "shared")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cri_log_lines(text: str, stream: str = "stdout") -> str:
    """Render ``text`` in the CRI container-log format kwok (like the kubelet) serves."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    lines = text.splitlines()
    return "".join(f"{now} {stream} F {line}\n" for line in lines)


# --------------------------------------------------------------------------------------------
# PKI (cryptography)
# --------------------------------------------------------------------------------------------


class _PKI:
    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._ser, self._ec = x509, hashes, serialization, ec
        self._EKU, self._Name = ExtendedKeyUsageOID, NameOID
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lsbert-test-ca")])
        now = _dt.datetime.now(_dt.timezone.utc)
        self.ca_name = name
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_crt_path = self._write_cert("ca.crt", self.ca_cert)
        self._write_key("ca.key", self.ca_key)

    def _write_cert(self, name: str, cert: Any) -> Path:
        p = self.dir / name
        p.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        return p

    def _write_key(self, name: str, key: Any) -> Path:
        p = self.dir / name
        p.write_bytes(
            key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8, self._ser.NoEncryption())
        )
        p.chmod(0o600)
        return p

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: Sequence[str] = (),
        *,
        server: bool = False,
        client: bool = False,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
    ) -> tuple[Path, Path]:
        x509, NameOID = self._x509, self._Name
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = _dt.datetime.now(_dt.timezone.utc)
        usages = []
        if server:
            usages.append(self._EKU.SERVER_AUTH)
        if client:
            usages.append(self._EKU.CLIENT_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self.ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(hours=1))
            .not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        sans: list[Any] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.ca_key, self._hashes.SHA256())
        return self._write_cert(f"{name}.crt", cert), self._write_key(f"{name}.key", key)

    def service_account_keys(self) -> tuple[Path, Path]:
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        priv = self._write_key("sa.key", key)
        pub = self.dir / "sa.pub"
        pub.write_bytes(
            key.public_key().public_bytes(self._ser.Encoding.PEM, self._ser.PublicFormat.SubjectPublicKeyInfo)
        )
        return priv, pub


# --------------------------------------------------------------------------------------------
# kwok configuration (our own stages; modelled on kwok's kustomize/stage/pod/fast + chaos)
# --------------------------------------------------------------------------------------------


def _kwok_config(default_log: Path) -> str:
    """kwok's configuration: the Stage files of tests/k8s/kwok/ with our label/annotation names filled in."""
    pods = (
        (KWOK_DIR / "pod-stages.yaml")
        .read_text()
        .replace("__LABEL_FAIL__", LABEL_FAIL)
        .replace("__ANN_DURATION__", ANNOTATION_DURATION)
        .replace("__ANN_EXIT_CODE__", ANNOTATION_EXIT_CODE)
        .replace("__ANN_REASON__", ANNOTATION_REASON)
        .replace("__ANN_MESSAGE__", ANNOTATION_MESSAGE)
    )
    logs = (KWOK_DIR / "cluster-logs.yaml").read_text().replace("__DEFAULT_LOG__", json.dumps(str(default_log)))
    return "---\n".join([(KWOK_DIR / "node-stages.yaml").read_text(), pods, logs])


# --------------------------------------------------------------------------------------------
# the control plane
# --------------------------------------------------------------------------------------------


class _Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1."""

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        *,
        gpus_per_node: int = 2,
        install_kserve_crds: bool = True,
        keep_dir: bool | None = None,
        real_node: bool = False,
    ) -> None:
        self.versions = read_versions()
        self.bin_dir = Path(bin_dir) if bin_dir else default_bin_dir()
        self.gpus_per_node = gpus_per_node
        self.install_kserve_crds = install_kserve_crds
        self.keep_dir = (os.environ.get("LSBERT_K8S_KEEP") == "1") if keep_dir is None else keep_dir
        self.dir: Path | None = None
        self.server: str | None = None
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self._procs: list[_Proc] = []
        self._lock = threading.Lock()
        self._started = False
        # A real kubelet node (tests/k8s/node.py): the API server then binds the node's bridge address so
        # that pods reach it through the `kubernetes` Service.
        self.real_node = real_node
        self.node: Any = None
        self.bind_ip = "127.0.0.1"
        self._pki: Any = None

    # ---- public paths ------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """Admin (system:masters) kubeconfig file."""
        self._require_started()
        assert self.dir is not None
        return self.dir / "admin.kubeconfig"

    @property
    def ca_file(self) -> Path:
        self._require_started()
        assert self.dir is not None
        return self.dir / "pki" / "ca.crt"

    @property
    def log_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "logs"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> ControlPlane:
        if self._started:
            return self
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ControlPlaneError(
                f"missing control-plane binaries in {self.bin_dir}: {', '.join(missing)}; "
                "run `bash tests/k8s/build.sh` first"
            )
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="lsbert-k8s-"))
        self.log_dir.mkdir()
        self._started = True
        atexit.register(self.stop)
        try:
            if self.real_node:
                from tests.k8s.node import NODE_IP, RealNode

                self.node = RealNode(cache_dir().parent.parent / "node")
                self.node.prepare_host(self.dir)  # may wait for another run's node: time starts after
                self.bind_ip = NODE_IP
                t0 = time.monotonic()
            self._start(deadline=t0 + timeout)
            if self.node is not None:
                self.node.start(self, self._pki, timeout=max(60.0, t0 + timeout + 120 - time.monotonic()))
                self.timings.update({f"node-{k}": v for k, v in self.node.timings.items()})
        except BaseException:
            self._dump_logs()
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Kill every process (whole process groups) and remove the temp dir. Idempotent."""
        with self._lock:
            if self.node is not None:
                try:
                    self.node.stop()
                except Exception as e:  # pragma: no cover - the node's sweep runs again at the next start
                    print(f"real node teardown failed: {e!r}")
                self.node = None
            procs, self._procs = self._procs, []
            for p in reversed(procs):
                _terminate(p.popen, grace=5.0)
            if self.dir is not None and not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._started = False
            try:
                atexit.unregister(self.stop)
            except Exception:  # pragma: no cover
                pass

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs}

    def check_alive(self) -> None:
        """Raise if any control-plane process has exited."""
        for p in self._procs:
            rc = p.popen.poll()
            if rc is not None:
                raise ControlPlaneError(f"{p.name} exited with {rc}; log tail:\n{p.tail()}")

    # ---- clients ------------------------------------------------------------------------------

    def api_client(self) -> Any:
        """kubernetes.client.ApiClient authenticated as cluster admin (system:masters)."""
        from kubernetes import client

        assert self.dir is not None
        cfg = client.Configuration(
            host=self.server,
            ssl_ca_cert=str(self.ca_file),
            cert_file=str(self.dir / "pki" / "admin.crt"),
            key_file=str(self.dir / "pki" / "admin.key"),
        )
        return client.ApiClient(cfg)

    def service_account_token(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600, audiences: Sequence[str] = ()
    ) -> str:
        """A bound token for the ServiceAccount, minted with the TokenRequest API."""
        from kubernetes import client

        with self.api_client() as api:
            body = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    expiration_seconds=expiration_seconds,
                    audiences=list(audiences) or None,
                )
            )
            tr = client.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, body)
            return tr.status.token

    def service_account_client(self, namespace: str, name: str, **kw: Any) -> Any:
        """kubernetes.client.ApiClient that acts as ``system:serviceaccount:<ns>:<name>``."""
        from kubernetes import client

        token = self.service_account_token(namespace, name, **kw)
        cfg = client.Configuration(
            host=self.server,
            ssl_ca_cert=str(self.ca_file),
            api_key={"BearerToken": f"Bearer {token}"},
        )
        return client.ApiClient(cfg)

    def service_account_kubeconfig(self, namespace: str, name: str, **kw: Any) -> Path:
        """A kubeconfig file for the ServiceAccount (for kubectl/helm or a launcher subprocess)."""
        assert self.dir is not None
        token = self.service_account_token(namespace, name, **kw)
        path = self.dir / f"sa-{namespace}-{name}.kubeconfig"
        path.write_text(_kubeconfig(self.server or "", self.ca_file, token=token, namespace=namespace))
        path.chmod(0o600)
        return path

    # ---- CLI helpers --------------------------------------------------------------------------

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        """Environment for kubectl/helm subprocesses (KUBECONFIG + isolated helm dirs)."""
        assert self.dir is not None
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        for var, sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
            env[var] = str(self.dir / "helm" / sub)
        env.pop("HELM_KUBECONTEXT", None)
        env.pop("HELM_NAMESPACE", None)
        return env

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self._run_cli("kubectl", args, check, input, timeout, kubeconfig)

    def helm(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self._run_cli("helm", args, check, input, timeout, kubeconfig)

    def _run_cli(
        self,
        tool: str,
        args: Iterable[str],
        check: bool,
        input: str | None,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary(tool)), *args]
        res = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(kubeconfig),
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise ControlPlaneError(
                f"{tool} {' '.join(args)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
            )
        return res

    # ---- kwok pod logs ------------------------------------------------------------------------

    def set_default_log(self, text: str) -> None:
        """Text that ``kubectl logs`` returns for every pod without a :meth:`set_pod_log` entry."""
        assert self.dir is not None
        (self.dir / "logs-served" / "default.log").write_text(cri_log_lines(text))

    def set_pod_log(self, namespace: str, pod: str, text: str, *, container: str | None = None) -> Path:
        """Make ``kubectl logs <pod>`` (and read_namespaced_pod_log) return ``text``.

        Creates/updates a kwok ``Logs`` object for the pod pointing at a file under the temp dir.
        Takes effect once kwok's informer sees it (well under a second); poll in tests.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        assert self.dir is not None
        path = self.dir / "logs-served" / f"{namespace}_{pod}_{container or 'all'}.log"
        path.write_text(cri_log_lines(text))
        entry: dict[str, Any] = {"logsFile": str(path), "previousLogsFile": str(path)}
        if container:
            entry["containers"] = [container]
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {"logs": [entry]},
        }
        with self.api_client() as api:
            co = client.CustomObjectsApi(api)
            try:
                co.create_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", namespace, "logs", body)
            except ApiException as e:
                if e.status != 409:
                    raise
                co.patch_namespaced_custom_object(
                    "kwok.x-k8s.io", "v1alpha1", namespace, "logs", pod, {"spec": body["spec"]}
                )
        return path

    # ---- small conveniences for tests ---------------------------------------------------------

    def create_namespace(self, name: str, timeout: float = 30.0) -> None:
        """Create a namespace and wait for its ``default`` ServiceAccount (pods need it)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            try:
                core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
            except ApiException as e:
                if e.status != 409:
                    raise

            def sa_ready() -> bool:
                try:
                    core.read_namespaced_service_account("default", name)
                    return True
                except ApiException as e:
                    if e.status == 404:
                        return False
                    raise

            wait_until(sa_ready, timeout, f"default ServiceAccount in namespace {name}")

    # ---- internals ----------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.dir is None:
            raise ControlPlaneError("control plane not started")

    def _spawn(self, name: str, args: Sequence[str]) -> _Proc:
        log = self.log_dir / f"{name}.log"
        fh = open(log, "ab")
        try:
            popen = subprocess.Popen(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
                start_new_session=True,  # own process group: stop() kills the whole group
                env=_component_env(),
            )
        finally:
            fh.close()
        proc = _Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def _mark(self, label: str, t0: float) -> None:
        self.timings[label] = round(time.monotonic() - t0, 2)

    def _start(self, deadline: float) -> None:
        t0 = time.monotonic()
        d = self.dir
        assert d is not None
        b = self.binary
        p = {k: free_port() for k in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "kwok")}
        self.ports = p
        self.server = f"https://{self.bind_ip}:{p['apiserver']}"

        # -- PKI --
        pki = self._pki = _PKI(d / "pki")
        apiserver_crt, apiserver_key = pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=sorted({"127.0.0.1", "10.96.0.1", self.bind_ip}),
        )
        pki.issue("admin", "lsbert-test-admin", ["system:masters"], client=True)
        kubelet_client = pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["kubeadm:cluster-admins"], client=True
        )
        pki.issue("kube-controller-manager", "system:kube-controller-manager", client=True)
        pki.issue("kube-scheduler", "system:kube-scheduler", client=True)
        pki.issue("kwok", "lsbert-kwok", ["system:masters"], client=True)
        front_proxy = pki.issue("front-proxy-client", "front-proxy-client", client=True)
        kwok_serving = pki.issue("kwok-serving", "kwok-kubelet", server=True, dns=["localhost"], ips=["127.0.0.1"])
        sa_key, sa_pub = pki.service_account_keys()
        ca = pki.ca_crt_path
        for user in ("admin", "kube-controller-manager", "kube-scheduler", "kwok"):
            (d / f"{user}.kubeconfig").write_text(
                _kubeconfig(self.server, ca, cert=d / "pki" / f"{user}.crt", key=d / "pki" / f"{user}.key")
            )
        served = d / "logs-served"
        served.mkdir()
        self.set_default_log("")
        (d / "kwok.yaml").write_text(_kwok_config(served / "default.log"))
        self._mark("pki", t0)

        # -- etcd --
        etcd_url = f"http://127.0.0.1:{p['etcd']}"
        peer_url = f"http://127.0.0.1:{p['etcd_peer']}"
        self._spawn(
            "etcd",
            [
                b("etcd"),
                "--name=lsbert",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=lsbert={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=2147483648",
                "--auto-compaction-retention=1",
                "--log-level=warn",
                "--enable-pprof=false",
            ],
        )

        # -- kube-apiserver (started right away; it retries etcd until it answers) --
        self._spawn(
            "kube-apiserver",
            [
                b("kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                f"--bind-address={self.bind_ip}",
                f"--advertise-address={self.bind_ip}",
                f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={apiserver_crt}",
                f"--tls-private-key-file={apiserver_key}",
                f"--client-ca-file={ca}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
                "DefaultTolerationSeconds,DefaultStorageClass,ResourceQuota,Priority,NodeRestriction,"
                "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # With a real node, pods reach the API server through the `kubernetes` Service: its endpoint is
                # the advertised bridge address. Without one nothing may connect to it, so no endpoint.
                f"--endpoint-reconciler-type={'lease' if self.real_node else 'none'}",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                f"--requestheader-client-ca-file={ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy[0]}",
                f"--proxy-client-key-file={front_proxy[1]}",
                f"--kubelet-client-certificate={kubelet_client[0]}",
                f"--kubelet-client-key={kubelet_client[1]}",
                f"--kubelet-certificate-authority={ca}",
                "--kubelet-preferred-address-types=InternalIP",
                "--event-ttl=30m",
                "--v=1",
            ],
        )
        self._wait_apiserver(deadline)
        self._mark("apiserver-ready", t0)

        # -- controller-manager + scheduler --
        kcm_kc = d / "kube-controller-manager.kubeconfig"
        self._spawn(
            "kube-controller-manager",
            [
                b("kube-controller-manager"),
                f"--kubeconfig={kcm_kc}",
                f"--authentication-kubeconfig={kcm_kc}",
                f"--authorization-kubeconfig={kcm_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['kcm']}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca}",
                f"--cluster-signing-cert-file={ca}",
                f"--cluster-signing-key-file={d / 'pki' / 'ca.key'}",
                "--use-service-account-credentials=true",
                "--controllers=*",
                "--leader-elect=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--node-monitor-grace-period=3m20s",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
                "--v=1",
            ],
        )
        sched_kc = d / "kube-scheduler.kubeconfig"
        self._spawn(
            "kube-scheduler",
            [
                b("kube-scheduler"),
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p['scheduler']}",
                "--leader-elect=false",
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
                "--v=1",
            ],
        )

        # -- CRDs: kwok's Logs first (kwok watches it, so it must exist before kwok starts); the
        # KServe CRDs (the InferenceService one is 2 MB and takes seconds to become Established)
        # install in a background thread while kwok brings the nodes up.
        self._apply_crds([kwok_crd_dir() / "kwok.x-k8s.io_logs.yaml"], ["logs.kwok.x-k8s.io"], deadline)
        self._mark("kwok-crd-established", t0)
        crd_thread: threading.Thread | None = None
        crd_error: list[BaseException] = []
        if self.install_kserve_crds:
            sd = shared_dir() / "kserve-crds"
            files = [sd / f for f in KSERVE_CRDS]
            for f in files:
                if not f.is_file():
                    raise ControlPlaneError(f"CRD file not found: {f} (set LSBERT_SHARED_DIR)")
            names = [f"{f.name.split('_', 1)[1].removesuffix('.yaml')}.{f.name.split('_', 1)[0]}" for f in files]

            def install() -> None:
                try:
                    self._apply_crds(files, names, deadline)
                    self._mark("kserve-crds-established", t0)
                except BaseException as e:  # re-raised in the main thread
                    crd_error.append(e)

            crd_thread = threading.Thread(target=install, name="kserve-crds", daemon=True)
            crd_thread.start()

        # -- kwok --
        kwok_kc = d / "kwok.kubeconfig"
        self._spawn(
            "kwok",
            [
                b("kwok"),
                f"--kubeconfig={kwok_kc}",
                f"--config={d / 'kwok.yaml'}",
                # Only the fake nodes: a real kubelet may join the same cluster.
                "--manage-nodes-with-label-selector=type=kwok",
                "--node-ip=127.0.0.1",
                f"--node-port={p['kwok']}",
                f"--server-address=127.0.0.1:{p['kwok']}",
                f"--tls-cert-file={kwok_serving[0]}",
                f"--tls-private-key-file={kwok_serving[1]}",
                f"--cidr={POD_CIDR}",
                "--node-lease-duration-seconds=40",
                "--enable-crds=Logs",
                "--v=INFO",
            ],
        )

        # -- nodes --
        self._create_nodes()
        self._wait_nodes_ready(deadline)
        self._mark("nodes-ready", t0)
        self._wait_default_sa(deadline)
        self._wait_healthz("kube-scheduler", p["scheduler"], deadline)
        self._wait_healthz("kube-controller-manager", p["kcm"], deadline)
        if crd_thread is not None:
            crd_thread.join(max(1.0, deadline - time.monotonic()))
            if crd_error:
                raise crd_error[0]
            if crd_thread.is_alive():
                raise ControlPlaneError("timed out installing the KServe CRDs")
        self._mark("all-ready", t0)

    def _apply_crds(self, files: Sequence[Path], names: Sequence[str], deadline: float) -> None:
        # server-side apply: the InferenceService CRD is too large for client-side apply's annotation
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=lsbert-tests"]
        for f in files:
            args += ["-f", str(f)]
        self.kubectl(*args, timeout=max(5.0, deadline - time.monotonic()))
        for n in names:
            self._wait_crd_established(n, deadline)

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.dir is not None
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        ctx.load_cert_chain(str(self.dir / "pki" / "admin.crt"), str(self.dir / "pki" / "admin.key"))
        return ctx

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` on the API server as admin and decode the JSON (no model parsing)."""
        with urllib.request.urlopen(f"{self.server}{path}", context=self._ssl_context(), timeout=timeout) as r:
            return json.load(r)

    def _wait_crd_established(self, name: str, deadline: float) -> None:
        def established() -> bool:
            self.check_alive()
            crd = self.get_json(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
            return conds.get("Established") == "True"

        wait_until(established, max(1.0, deadline - time.monotonic()), f"CRD {name} Established", interval=0.2)

    def _wait_apiserver(self, deadline: float) -> None:
        ctx = self._ssl_context()
        url = f"{self.server}/readyz"
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ConnectionError) as e:
                last = str(e)
            time.sleep(0.2)
        raise ControlPlaneError(f"kube-apiserver not ready at {url}: {last}")

    def _wait_healthz(self, name: str, port: int, deadline: float) -> None:
        # kcm/scheduler serve a self-signed loopback cert generated in memory.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{port}/healthz"
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ConnectionError) as e:
                last = str(e)
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not healthy at {url}: {last}")

    def _create_nodes(self) -> None:
        from kubernetes import client

        def node(name: str, capacity: dict[str, str], labels: dict[str, str], taints: list[dict[str, str]]) -> Any:
            return client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=name,
                    labels={
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        **labels,
                    },
                    annotations={"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                ),
                spec=client.V1NodeSpec(taints=[client.V1Taint(**t) for t in taints] or None),
                status=client.V1NodeStatus(capacity=capacity, allocatable=capacity),
            )

        base = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "500Gi"}
        gpu = {**base, "cpu": "32", "memory": "256Gi", GPU_RESOURCE: str(self.gpus_per_node)}
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_node(node(CPU_NODE, base, {"lsbert.test/pool": "cpu"}, []))
            core.create_node(
                node(GPU_NODE, gpu, {"lsbert.test/pool": "gpu", "nvidia.com/gpu.present": "true"}, [GPU_TAINT])
            )

    def _wait_nodes_ready(self, deadline: float) -> None:
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)

            def ready() -> bool:
                self.check_alive()
                for n in core.list_node().items:
                    conds = {c.type: c.status for c in (n.status.conditions or [])}
                    if conds.get("Ready") != "True":
                        return False
                    taints = [t.key for t in (n.spec.taints or [])]
                    if any(k.startswith("node.kubernetes.io/") for k in taints):
                        return False  # not-ready/unreachable taints not yet lifted by kcm
                return True

            wait_until(ready, max(1.0, deadline - time.monotonic()), "kwok nodes Ready and untainted", interval=0.2)

    def _wait_default_sa(self, deadline: float) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)

            def ok() -> bool:
                self.check_alive()
                try:
                    core.read_namespaced_service_account("default", "default")
                    return True
                except ApiException as e:
                    if e.status == 404:
                        return False
                    raise

            wait_until(ok, max(1.0, deadline - time.monotonic()), "default/default ServiceAccount", interval=0.2)

    def _dump_logs(self) -> None:
        for p in self._procs:
            print(f"----- {p.name} (pid {p.popen.pid}, rc {p.popen.poll()}) log tail -----\n{p.tail()}")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class _Abort(BaseException):
    """Carries a ControlPlaneError through the polling loop, which keeps going through ordinary errors."""

    def __init__(self, error: ControlPlaneError):
        super().__init__(str(error))
        self.error = error


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """``tests.support.polling.wait_until`` through transient API errors (a broken control plane still fails
    at once); a time-out raises ``WaitTimeout`` (a ``TimeoutError``) naming ``what`` and the last error."""

    def attempt() -> Any:
        try:
            return pred()
        except ControlPlaneError as exc:
            raise _Abort(exc) from exc

    try:
        return polling.wait_until(attempt, timeout, what, interval, ignore=(Exception,))
    except _Abort as abort:
        raise abort.error from None


def _component_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.pop("KUBECONFIG", None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _kubeconfig(
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> str:
    user: dict[str, str] = {}
    if cert and key:
        user = {"client-certificate": str(cert), "client-key": str(key)}
    if token:
        user = {"token": token}
    ctx: dict[str, str] = {"cluster": "lsbert-test", "user": "lsbert-test"}
    if namespace:
        ctx["namespace"] = namespace
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lsbert-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "lsbert-test", "user": user}],
        "contexts": [{"name": "lsbert-test", "context": ctx}],
        "current-context": "lsbert-test",
    }
    return json.dumps(cfg, indent=2)  # JSON is valid YAML


def _terminate(popen: subprocess.Popen, grace: float) -> None:
    if popen.poll() is not None:
        _reap_group(popen.pid)
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _reap_group(popen.pid)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def _reap_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
