"""The real KServe controller manager, run against a test :class:`~tests.k8s.cluster.ControlPlane`.

``tests/k8s/build-kserve.sh`` builds ``github.com/kserve/kserve/cmd/manager`` for every version in
``KSERVE_VERSIONS`` (tests/k8s/versions.env) and copies, from the same module version, its five CRDs, its
``inferenceservice-config`` ConfigMap and its webhook configurations into
``${LSBERT_CACHE:-~/.cache/lsbert}/k8s/<K8S_VERSION>/kserve/<version>/``. This module builds nothing.

:meth:`KServeController.start`:

* namespace ``kserve`` (the manager's ``POD_NAMESPACE``) with the shipped ConfigMap, edited for a cluster
  without Knative or Istio: default deployment mode Standard (``RawDeployment`` before 0.16, when the
  mode was renamed), no Istio VirtualService, no Ingress;
* the version's five CRDs (InferenceService, ServingRuntime, ClusterServingRuntime, TrainedModel,
  InferenceGraph; with fewer the manager waits for the missing informers and exits). CRDs the control
  plane had installed are saved first and put back by :meth:`stop`;
* a serving certificate for 127.0.0.1 signed by a CA made here, where the manager's webhook server looks
  for it (``$TMPDIR/k8s-webhook-server/serving-certs/``);
* the manager (``--leader-elect=false``, metrics and health on 127.0.0.1, webhook server on a free port;
  controller-runtime binds that one on all interfaces and KServe has no flag for the host);
* the shipped Mutating/ValidatingWebhookConfigurations, with ``clientConfig.url:
  https://127.0.0.1:<port>/<path>`` and the CA as ``caBundle`` instead of the in-cluster Service;
* then waits until a server-side dry-run create of an InferenceService comes back defaulted by the
  mutating webhook, which proves the whole admission path.

:meth:`stop` kills the manager's process group and deletes what ``start`` created: webhook
configurations first (they fail closed), then the finalizer KServe put on InferenceServices that are still
there (nothing would remove it once the manager is gone), the CRDs it added (the saved ones restored), the
ConfigMap and, if it created it, the namespace.

The manager runs with the control plane's admin kubeconfig (system:masters), not KServe's ClusterRole.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from tests.k8s.cluster import _PKI, ControlPlane, ControlPlaneError, cache_dir, free_port, read_versions, wait_until

NAMESPACE = "kserve"
CONFIGMAP = "inferenceservice-config"
GROUP = "serving.kserve.io"
ISVC_FINALIZER = "inferenceservice.finalizers"
CRD_FILES = (
    "serving.kserve.io_inferenceservices.yaml",
    "serving.kserve.io_servingruntimes.yaml",
    "serving.kserve.io_clusterservingruntimes.yaml",
    "serving.kserve.io_trainedmodels.yaml",
    "serving.kserve.io_inferencegraphs.yaml",
)
FILES = ("kserve-controller", "inferenceservice-config.yaml", "webhooks.yaml", *(f"crds/{f}" for f in CRD_FILES))
# Object metadata that must not travel when a saved CRD is applied again.
_SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields")


class KServeControllerError(RuntimeError):
    """The KServe controller failed to start, or a harness step failed."""


def versions() -> list[str]:
    """The pinned KServe versions, newest first (``LSBERT_KSERVE_VERSIONS`` narrows them, comma-separated)."""
    pinned = [v.strip() for v in read_versions().get("KSERVE_VERSIONS", "").split(",") if v.strip()]
    wanted = [v.strip() for v in os.environ.get("LSBERT_KSERVE_VERSIONS", "").split(",") if v.strip()]
    if wanted:
        unknown = sorted(set(wanted) - set(pinned))
        if unknown:
            raise KServeControllerError(
                f"LSBERT_KSERVE_VERSIONS names {unknown}, not pinned in tests/k8s/versions.env ({pinned})"
            )
        return [v for v in pinned if v in wanted]
    return pinned


def version_dir(version: str) -> Path:
    """``${LSBERT_CACHE:-~/.cache/lsbert}/k8s/<K8S_VERSION>/kserve/<version>`` (what build-kserve.sh fills)."""
    return cache_dir() / "kserve" / version


def missing_files(version: str) -> list[str]:
    d = version_dir(version)
    missing = [f for f in FILES if not (d / f).is_file()]
    if "kserve-controller" not in missing and not os.access(d / "kserve-controller", os.X_OK):
        missing.append("kserve-controller (not executable)")
    return missing


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.lstrip("v").split("-")[0].split("."))


def standard_mode_name(version: str) -> str:
    """What this KServe version calls the Deployment + Service mode: ``Standard`` from 0.16, when the modes
    were renamed (0.16+ still accepts the old name and rewrites it), ``RawDeployment`` before."""
    return "Standard" if version_tuple(version) >= (0, 16) else "RawDeployment"


class KServeController:
    """One ``kserve-controller`` process serving a :class:`ControlPlane` (see the module doc)."""

    def __init__(
        self,
        control_plane: ControlPlane,
        version: str,
        *,
        default_mode: Optional[str] = None,
        keep_dir: Optional[bool] = None,
    ) -> None:
        self.cp = control_plane
        self.version = version
        self.dir_in_cache = version_dir(version)
        self.default_mode = default_mode or standard_mode_name(version)
        self.keep_dir = (os.environ.get("LSBERT_K8S_KEEP") == "1") if keep_dir is None else keep_dir
        self.dir: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self.ports: dict[str, int] = {}
        self.ca_bundle: Optional[bytes] = None
        self.startup_seconds: Optional[float] = None
        self._created_namespace = False
        self._saved_crds: dict[str, dict[str, Any]] = {}
        self._crd_names: list[str] = []
        self._webhooks: list[tuple[str, str]] = []  # (kind, name)
        self._started = False

    # ---- paths and logs -----------------------------------------------------------------------

    @property
    def binary(self) -> Path:
        return self.dir_in_cache / "kserve-controller"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "kserve-controller.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise KServeControllerError(
                f"kserve-controller {self.version} is not running (exit {rc}):\n{self.log_tail()}"
            )

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> KServeController:
        if self._started:
            return self
        missing = missing_files(self.version)
        if missing:
            raise KServeControllerError(
                f"KServe {self.version} files missing in {self.dir_in_cache}: {', '.join(missing)}; "
                "run `bash tests/k8s/build-kserve.sh` first"
            )
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"lsbert-kserve-{self.version}-"))
        self._started = True
        try:
            self._start(deadline)
        except BaseException:
            tail = self.log_tail()
            self.stop()
            if tail:
                print(f"--- kserve-controller {self.version} log tail ---\n{tail}")
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Kill the manager and delete what :meth:`start` created. Idempotent; never raises."""
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # keep cleaning up
                errors.append(f"{what}: {exc}")

        if self.proc is not None:
            _terminate(self.proc, grace=10.0)
            self.proc = None
        if self._started and self.cp.server is not None:
            for kind, name in reversed(self._webhooks):
                attempt(f"delete {kind} {name}", self._delete, kind, name)
            self._webhooks.clear()
            attempt("remove KServe finalizers", self._remove_finalizers)
            attempt("restore CRDs", self._restore_crds)
            attempt("delete ConfigMap", self._delete, "configmap", CONFIGMAP, NAMESPACE)
            if self._created_namespace:
                attempt("delete namespace", self._delete, "namespace", NAMESPACE, None, True)
                self._created_namespace = False
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self._started = False
        if errors:
            print(f"kserve-controller {self.version} stop: " + "; ".join(errors))

    def __enter__(self) -> KServeController:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- configuration changes at run time ----------------------------------------------------

    def set_default_mode(self, mode: str) -> None:
        """Change ``deploy.defaultDeploymentMode`` in the ConfigMap (the manager reads it per reconcile)."""
        self.default_mode = mode
        cm = self._configmap()
        self.cp.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=lsbert-tests",
            "-f",
            "-",
            input=json.dumps(cm),
        )

    # ---- internals ----------------------------------------------------------------------------

    def _start(self, deadline: float) -> None:
        assert self.dir is not None
        cp = self.cp
        self.ports = {k: free_port() for k in ("webhook", "metrics", "health")}

        # Namespace + ConfigMap (a namespace left terminating by a previous controller must go first).
        wait_until(
            lambda: ((_get_json(cp, "namespace", NAMESPACE) or {}).get("status") or {}).get("phase") != "Terminating",
            max(1.0, deadline - time.monotonic()),
            f"namespace {NAMESPACE} deleted",
        )
        if not _exists(cp, "namespace", NAMESPACE):
            cp.create_namespace(NAMESPACE)
            self._created_namespace = True
        cp.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=lsbert-tests",
            "-f",
            "-",
            input=json.dumps(self._configmap()),
        )

        # CRDs: save what is there, then apply this version's (server-side: the InferenceService CRD is too
        # large for the last-applied annotation).
        files = [self.dir_in_cache / "crds" / f for f in CRD_FILES]
        self._crd_names = [_crd_name(f) for f in files]
        for name in self._crd_names:
            saved = _get_json(cp, "customresourcedefinition", name)
            if saved is not None:
                self._saved_crds[name] = _strip(saved)
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=lsbert-tests"]
        for f in files:
            args += ["-f", str(f)]
        cp.kubectl(*args, timeout=max(10.0, deadline - time.monotonic()))
        for name in self._crd_names:
            wait_until(
                lambda n=name: _crd_established(cp, n), max(1.0, deadline - time.monotonic()), f"CRD {name} Established"
            )

        # Serving certificate for 127.0.0.1.
        pki = _PKI(self.dir / "pki")
        crt, key = pki.issue("webhook", "kserve-webhook-server", server=True, dns=["localhost"], ips=["127.0.0.1"])
        cert_dir = self.dir / "k8s-webhook-server" / "serving-certs"
        cert_dir.mkdir(parents=True)
        shutil.copy(crt, cert_dir / "tls.crt")
        shutil.copy(key, cert_dir / "tls.key")
        self.ca_bundle = pki.ca_crt_path.read_bytes()

        # The manager.
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.update(
            {
                "KUBECONFIG": str(cp.kubeconfig),
                "POD_NAMESPACE": NAMESPACE,
                "TMPDIR": str(self.dir),
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
            }
        )
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(self.binary),
                    f"--metrics-addr=127.0.0.1:{self.ports['metrics']}",
                    f"--health-probe-addr=127.0.0.1:{self.ports['health']}",
                    f"--webhook-port={self.ports['webhook']}",
                    "--leader-elect=false",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
                env=env,
                start_new_session=True,
            )
        wait_until(self._healthy, max(1.0, deadline - time.monotonic()), f"kserve-controller {self.version} /readyz")
        wait_until(
            self._webhook_listening,
            max(1.0, deadline - time.monotonic()),
            f"kserve-controller {self.version} webhook server on 127.0.0.1:{self.ports['webhook']}",
        )

        # Webhook configurations, pointed at the manager.
        for doc in self._webhook_configurations():
            cp.kubectl(
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=lsbert-tests",
                "-f",
                "-",
                input=json.dumps(doc),
            )
            self._webhooks.append((doc["kind"].lower(), doc["metadata"]["name"]))
        wait_until(
            self._admission_works,
            max(1.0, deadline - time.monotonic()),
            "an InferenceService dry-run create defaulted by the KServe mutating webhook",
        )

    def _configmap(self) -> dict[str, Any]:
        doc = yaml.safe_load((self.dir_in_cache / "inferenceservice-config.yaml").read_text())
        data = doc["data"]
        deploy = json.loads(data["deploy"])
        deploy["defaultDeploymentMode"] = self.default_mode
        data["deploy"] = json.dumps(deploy, indent=2)
        ingress = json.loads(data["ingress"])
        ingress.update({"disableIstioVirtualHost": True, "disableIngressCreation": True})
        data["ingress"] = json.dumps(ingress, indent=2)
        data.pop("_example", None)
        doc["metadata"] = {"name": CONFIGMAP, "namespace": NAMESPACE}
        return doc

    def _webhook_configurations(self) -> list[dict[str, Any]]:
        assert self.ca_bundle is not None
        docs = [d for d in yaml.safe_load_all((self.dir_in_cache / "webhooks.yaml").read_text()) if d]
        out = []
        ca = base64.b64encode(self.ca_bundle).decode()
        for doc in docs:
            doc = copy.deepcopy(doc)
            doc["metadata"] = {"name": doc["metadata"]["name"], "labels": {"lsbert.test/kserve": self.version}}
            for hook in doc.get("webhooks") or []:
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.ports['webhook']}{path}", "caBundle": ca}
                hook["timeoutSeconds"] = 10
            out.append(doc)
        return out

    def _healthy(self) -> bool:
        self.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/readyz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _webhook_listening(self) -> bool:
        self.check_alive()
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=self.ca_bundle.decode() if self.ca_bundle else None)
        try:
            with (
                socket.create_connection(("127.0.0.1", self.ports["webhook"]), timeout=2) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return True
        except (OSError, ssl.SSLError):
            return False

    def _admission_works(self) -> bool:
        self.check_alive()
        probe = {
            "apiVersion": f"{GROUP}/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": "lsbert-admission-probe",
                "namespace": NAMESPACE,
                "annotations": {"serving.kserve.io/deploymentMode": self.default_mode},
            },
            "spec": {"predictor": {"containers": [{"name": "kserve-container", "image": "registry.invalid/probe"}]}},
        }
        res = self.cp.kubectl(
            "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(probe), check=False
        )
        if res.returncode != 0:
            return False
        created = json.loads(res.stdout)
        (container,) = created["spec"]["predictor"]["containers"]
        return bool(container.get("resources"))  # filled in by the mutating webhook

    def _delete(self, kind: str, name: str, namespace: Optional[str] = None, wait: bool = False) -> None:
        args = ["delete", kind, name, "--ignore-not-found", f"--wait={str(wait).lower()}", "--timeout=60s"]
        if namespace:
            args += ["-n", namespace]
        self.cp.kubectl(*args, timeout=90)

    def _remove_finalizers(self) -> None:
        if not _exists(self.cp, "customresourcedefinition", f"inferenceservices.{GROUP}"):
            return
        items = json.loads(self.cp.kubectl("get", f"inferenceservices.{GROUP}", "-A", "-o", "json").stdout)["items"]
        for isvc in items:
            finalizers = isvc["metadata"].get("finalizers") or []
            if ISVC_FINALIZER in finalizers:
                keep = [f for f in finalizers if f != ISVC_FINALIZER]
                self.cp.kubectl(
                    "patch",
                    f"inferenceservices.{GROUP}",
                    isvc["metadata"]["name"],
                    "-n",
                    isvc["metadata"]["namespace"],
                    "--type=merge",
                    "-p",
                    json.dumps({"metadata": {"finalizers": keep or None}}),
                )

    def _restore_crds(self) -> None:
        added = [n for n in self._crd_names if n not in self._saved_crds]
        for name in added:
            self._delete("customresourcedefinition", name)
        if self._saved_crds:
            docs = {"apiVersion": "v1", "kind": "List", "items": list(self._saved_crds.values())}
            self.cp.kubectl(
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=lsbert-tests",
                "-f",
                "-",
                input=json.dumps(docs),
                timeout=120,
            )
            for name in self._saved_crds:
                wait_until(lambda n=name: _crd_established(self.cp, n), 60, f"CRD {name} Established again")
        self._saved_crds.clear()
        self._crd_names = []


# ------------------------------------------------------------------------------------------ helpers


def _crd_name(path: Path) -> str:
    group, _, rest = path.name.partition("_")
    return f"{rest.removesuffix('.yaml')}.{group}"


def _exists(cp: ControlPlane, kind: str, name: str, namespace: Optional[str] = None) -> bool:
    return _get_json(cp, kind, name, namespace) is not None


def _get_json(cp: ControlPlane, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict[str, Any]]:
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = cp.kubectl(*args).stdout.strip()
    return json.loads(out) if out else None


def _crd_established(cp: ControlPlane, name: str) -> bool:
    crd = _get_json(cp, "customresourcedefinition", name)
    conditions = ((crd or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def _strip(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    meta = obj.get("metadata") or {}
    for field in _SERVER_FIELDS:
        meta.pop(field, None)
    return obj


def _terminate(popen: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


__all__ = [
    "NAMESPACE",
    "ControlPlaneError",
    "KServeController",
    "KServeControllerError",
    "missing_files",
    "standard_mode_name",
    "version_dir",
    "versions",
]
