"""A real Kubernetes node on this machine, joined to the test control plane (tests/k8s/cluster.py).

What runs (every process in its own process group, every path under one test directory or a fixed
``/run/lsbert-node`` state directory):

* containerd (Debian's) with runc and the CNI bridge plugin: pods are real Linux containers;
* kubelet and kube-proxy at the control plane's version (built by ``tests/k8s/build.sh``);
* CoreDNS (same build script), the cluster DNS behind the ``kube-system/kube-dns`` Service.

The network stays on this machine: pods live on the bridge ``lsbr0`` (``10.245.0.0/24``, the node and
the API server at ``10.245.0.1``), the Service range is routed to that bridge, and a guard in the
``mangle`` table drops anything that enters from the bridge and would leave through another
interface. Nothing is masqueraded to the outside.

Every change to the host is recorded in ``/run/lsbert-node/state.json`` before it is made, so that
:func:`sweep` (run at every start) undoes what a crashed run left: processes, containers, mounts,
network namespaces, iptables chains, the bridge and route, cgroups, and the sysctls the kubelet and
the bridge plugin change (``vm.overcommit_memory``, ``kernel.panic``, ``kernel.panic_on_oops``,
``net.ipv4.ip_forward``).

The node advertises ``nvidia.com/gpu`` as an extended resource and carries the GPU label and taint,
so a training Job's GPU request is scheduled for real; its container runs on the CPU (there is no
GPU here). A second taint, ``lsbert.test/real-node``, keeps the kwok-based tests' pods off it: only
tests that tolerate it run containers.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from tests.k8s.cluster import ControlPlane

NODE_NAME = "lsbert-node-1"
BRIDGE = "lsbr0"
NODE_CIDR = "10.245.0.0/24"
NODE_IP = "10.245.0.1"
SERVICE_CIDR = "10.96.0.0/16"
DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_LABEL = "nvidia.com/gpu.present"
REAL_NODE_TAINT = {"key": "lsbert.test/real-node", "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Tolerations a pod needs to run on the real node (helm values: tolerations / trainer.tolerations).
TOLERATIONS = [
    {"key": REAL_NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"},
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
]
PAUSE_IMAGE = "lsbert.local/pause:1"
GUARD_CHAIN = "LSBERT-GUARD"

STATE_DIR = Path("/run/lsbert-node")
STATE_FILE = STATE_DIR / "state.json"
LOCK_FILE = Path("/run/lsbert-node.lock")
CONTAINERD_STATE = STATE_DIR / "containerd"
CONTAINERD_SOCKET = CONTAINERD_STATE / "containerd.sock"
# Values the kubelet, kube-proxy or the CNI bridge plugin may change on the host.
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward")
# Host paths outside the test directory that the kubelet, containerd or CNI create.
HOST_PATHS = (
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/run/netns",
)
NEEDED = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "ip": "iproute2",
    "mount": "mount",
}
CNI_BIN_DIR = Path("/usr/lib/cni")
DEBIAN_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "iproute2", "conntrack")


class NodeError(RuntimeError):
    """The real node could not be set up."""


# --------------------------------------------------------------------------------------------
# host requirements
# --------------------------------------------------------------------------------------------


def unmet_requirements() -> list[str]:
    """Why this host cannot run the real node (empty: it can)."""
    why: list[str] = []
    if os.geteuid() != 0:
        why.append("not root (the kubelet, containerd and the bridge need root)")
    missing = [cmd for cmd in NEEDED if shutil.which(cmd) is None]
    if missing:
        why.append(f"missing commands {missing} (Debian: apt-get install {' '.join(DEBIAN_PACKAGES)})")
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        if not (CNI_BIN_DIR / plugin).exists():
            why.append(f"missing CNI plugin {CNI_BIN_DIR / plugin} (Debian: containernetworking-plugins)")
            break
    if not Path("/sys/fs/cgroup").exists():
        why.append("no /sys/fs/cgroup")
    return why


def install_host_packages() -> None:
    """Install the Debian packages the node needs (idempotent; a no-op when all are there)."""
    if not unmet_requirements():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *DEBIAN_PACKAGES], check=True, env=env
    )


# --------------------------------------------------------------------------------------------
# small host helpers
# --------------------------------------------------------------------------------------------


def _run(*args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, input=input, timeout=timeout)


def _quiet(*args: str) -> None:
    subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    try:
        _sysctl_path(name).write_text(value)
    except OSError:
        pass


def _load_state() -> dict[str, Any]:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(STATE_FILE)


def _pids_matching(needles: list[str]) -> list[int]:
    out = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            out.append(int(d.name))
    return out


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kubepods_cgroups() -> list[Path]:
    """Every kubepods cgroup directory (cgroup v1 controllers and the unified hierarchy), deepest first."""
    found: list[Path] = []
    root = Path("/sys/fs/cgroup")
    for top in [root, *[p for p in root.iterdir() if p.is_dir()]] if root.exists() else []:
        base = top / "kubepods"
        if base.is_dir():
            found.extend(p for p in base.rglob("*") if p.is_dir())
            found.append(base)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _kill_kubepods() -> None:
    """SIGKILL every process in a kubepods cgroup (pod containers left by a crashed run)."""
    for _ in range(5):
        pids: set[int] = set()
        for cg in _kubepods_cgroups():
            try:
                pids.update(int(x) for x in (cg / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        if not pids:
            return
        _kill(sorted(pids))
        time.sleep(0.5)


def _remove_kubepods_cgroups() -> None:
    for _ in range(3):
        left = False
        for cg in _kubepods_cgroups():
            try:
                cg.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left = True
        if not left:
            return
        time.sleep(0.5)


def _mounts_under(prefixes: list[str]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in prefixes):
            out.append(mp)
    return sorted(set(out), key=len, reverse=True)


def _unmount_under(prefixes: list[str]) -> None:
    for _ in range(3):
        mps = _mounts_under(prefixes)
        if not mps:
            return
        for mp in mps:
            _quiet("umount", "-l", mp)


def _iptables_cleanup() -> None:
    """Remove the chains and jumps kube-proxy and the CNI plugins add, and our guard (IPv4 and IPv6)."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat", "mangle", "raw"):
            res = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True)
            if res.returncode != 0:
                continue
            ours = lambda name: name.startswith(("KUBE-", "CNI-", GUARD_CHAIN))  # noqa: E731
            # Rules of built-in chains that jump to our chains or mention the bridge: delete them.
            for line in res.stdout.splitlines():
                parts = line.split()
                if len(parts) < 2 or parts[0] != "-A" or ours(parts[1]):
                    continue
                if any(ours(p) for p in parts) or BRIDGE in parts or NODE_CIDR in parts:
                    _quiet(tool, "-w", "-t", table, "-D", *parts[1:])
            chains = [
                line.split()[1] for line in res.stdout.splitlines() if line.startswith("-N ") and ours(line.split()[1])
            ]
            for chain in chains:
                _quiet(tool, "-w", "-t", table, "-F", chain)
            for chain in chains:
                _quiet(tool, "-w", "-t", table, "-X", chain)


def _netns_cleanup() -> None:
    netns = Path("/run/netns")
    if not netns.is_dir():
        return
    for ns in netns.iterdir():
        if ns.name.startswith("cni-"):
            _quiet("ip", "netns", "delete", ns.name)
            _quiet("umount", "-l", str(ns))
            try:
                ns.unlink()
            except OSError:
                pass


def sweep(log: Callable[[str], None] = lambda s: None) -> None:
    """Undo what a node run left on this host (a crashed run included). Safe to call any time the lock is held."""
    state = _load_state()
    if not state and not STATE_DIR.exists():
        return
    log(f"real node: sweeping leftovers of an earlier run ({STATE_FILE})")
    needles = [str(CONTAINERD_STATE), "lsbert-node-", f"--hostname-override={NODE_NAME}"]
    if state.get("dir"):
        needles.append(state["dir"])
    # The components first (kubelet restarts pods, containerd restarts shims), then the pods themselves.
    _kill(_pids_matching(needles))
    _kill_kubepods()
    _kill(_pids_matching(needles))
    test_dir = state.get("dir")
    _unmount_under([p for p in (test_dir, str(STATE_DIR), "/run/containerd", "/var/lib/kubelet") if p])
    _netns_cleanup()
    kube_proxy = state.get("kube_proxy")
    if kube_proxy and Path(kube_proxy).exists():
        _quiet(kube_proxy, "--cleanup")
    _iptables_cleanup()
    _quiet("ip", "route", "del", SERVICE_CIDR, "dev", BRIDGE)
    _quiet("ip", "link", "del", BRIDGE)
    for link in Path("/sys/class/net").iterdir():  # veth ends of pods (the bridge plugin names them veth*)
        master = link / "master"
        if link.name.startswith("veth") and master.exists() and master.resolve().name == BRIDGE:
            _quiet("ip", "link", "del", link.name)
    _remove_kubepods_cgroups()
    for name, value in (state.get("sysctls") or {}).items():
        if value is not None and _read_sysctl(name) != value:
            _write_sysctl(name, value)
    for path in state.get("created_paths") or []:
        shutil.rmtree(path, ignore_errors=True)
    if test_dir and Path(test_dir).exists() and state.get("owns_dir"):
        shutil.rmtree(test_dir, ignore_errors=True)
    shutil.rmtree(STATE_DIR, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the pause image (the pod sandbox): a static binary packed as a one-layer image
# --------------------------------------------------------------------------------------------

_PAUSE_GO = """package main

import (
	"os"
	"os/signal"
	"syscall"
)

// Holds a pod's namespaces until it is told to stop.
func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
}
"""


def pause_image_archive(cache: Path) -> Path:
    """A docker-archive tarball of the sandbox image, built once into ``cache`` (Go, no registry)."""
    out = cache / "pause-image.tar"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix="lsbert-pause-"))
    try:
        (src / "go.mod").write_text("module lsbert.local/pause\n\ngo 1.22\n")
        (src / "main.go").write_text(_PAUSE_GO)
        env = {**os.environ, "CGO_ENABLED": "0"}
        go = shutil.which("go") or "/usr/local/go/bin/go"
        subprocess.run(
            [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(src / "pause"), "."],
            cwd=src,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as t:
            info = t.gettarinfo(str(src / "pause"), arcname="pause")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src / "pause", "rb") as f:
                t.addfile(info, f)
        layer_bytes = layer.getvalue()
        diff_id = "sha256:" + sha256(layer_bytes).hexdigest()
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
        ).encode()
        cfg_name = sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": cfg_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]).encode()
        tmp = out.with_suffix(".tmp")
        with tarfile.open(tmp, mode="w") as t:
            for name, data in (("layer.tar", layer_bytes), (cfg_name, config), ("manifest.json", manifest)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        tmp.replace(out)
        return out
    finally:
        shutil.rmtree(src, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the node
# --------------------------------------------------------------------------------------------


class RealNode:
    """containerd + kubelet + kube-proxy + CoreDNS on the bridge ``lsbr0``, joined to a ControlPlane."""

    def __init__(self, cache: Path, log: Callable[[str], None] = print) -> None:
        self.cache = cache  # persistent: containerd's image store, the pause image
        self.log = log
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._cp: ControlPlane | None = None

    # ---- host network: before the API server starts (it binds NODE_IP) ------------------------

    def prepare_host(self, test_dir: Path) -> None:
        why = unmet_requirements()
        if why:
            raise NodeError("cannot run a real node here: " + "; ".join(why))
        self._lock_fd = os.open(LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.log("real node: another test run holds the node; waiting for it")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        sweep(self.log)
        self.dir = test_dir / "node"
        for sub in ("pki", "logs", "cni/net.d", "cni/ipam", "kubelet", "pod-logs", "volume-plugins", "volumes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        state = {
            "dir": str(self.dir),
            "sysctls": {n: _read_sysctl(n) for n in SYSCTLS},
            "created_paths": [p for p in HOST_PATHS if not Path(p).exists()],
        }
        _save_state(state)
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE)
        # Nothing that enters from the bridge leaves through another interface (mangle runs before
        # kube-proxy's filter rules, which could otherwise accept it first).
        for tool in ("iptables", "ip6tables"):
            if shutil.which(tool):
                _quiet(tool, "-w", "-t", "mangle", "-N", GUARD_CHAIN)
                _run(tool, "-w", "-t", "mangle", "-A", GUARD_CHAIN, "-o", BRIDGE, "-j", "RETURN")
                _run(tool, "-w", "-t", "mangle", "-A", GUARD_CHAIN, "-j", "DROP")
                _run(tool, "-w", "-t", "mangle", "-I", "FORWARD", "1", "-i", BRIDGE, "-j", GUARD_CHAIN)

    # ---- components: after the control plane is up ---------------------------------------------

    def start(self, cp: ControlPlane, pki: Any, timeout: float = 180.0) -> None:
        assert self.dir is not None, "prepare_host first"
        self._cp = cp
        t0 = time.monotonic()
        deadline = t0 + timeout
        d = self.dir
        kubelet_cert = pki.issue("kubelet-serving", NODE_NAME, server=True, dns=[NODE_NAME], ips=[NODE_IP])
        node_client = pki.issue("node-client", f"system:node:{NODE_NAME}", ["system:nodes"], client=True)
        proxy_client = pki.issue("kube-proxy", "system:kube-proxy", client=True)
        from tests.k8s.cluster import _kubeconfig

        ca = pki.ca_crt_path
        assert cp.server
        (d / "kubelet.kubeconfig").write_text(_kubeconfig(cp.server, ca, cert=node_client[0], key=node_client[1]))
        (d / "kube-proxy.kubeconfig").write_text(_kubeconfig(cp.server, ca, cert=proxy_client[0], key=proxy_client[1]))

        self._start_containerd(deadline)
        self.timings["containerd"] = round(time.monotonic() - t0, 2)
        self.import_archive(pause_image_archive(self.cache))
        self.timings["pause-image"] = round(time.monotonic() - t0, 2)
        self._write_cni_config()
        self._start_kubelet(cp, kubelet_cert, deadline)
        self.timings["node-ready"] = round(time.monotonic() - t0, 2)
        self._start_kube_proxy(cp)
        self._start_coredns(cp, deadline)
        self.timings["dns-ready"] = round(time.monotonic() - t0, 2)

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        assert self.dir is not None
        log = self.dir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            p = subprocess.Popen(
                [str(a) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        self.procs[name] = p
        return p

    def log_tail(self, name: str, n: int = 30) -> str:
        assert self.dir is not None
        try:
            return "\n".join((self.dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _check(self, name: str) -> None:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            raise NodeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    def _wait(self, what: str, pred: Callable[[], bool], deadline: float, proc: str) -> None:
        while True:
            self._check(proc)
            try:
                if pred():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise NodeError(f"timed out waiting for {what}; {proc} log:\n{self.log_tail(proc)}")
            time.sleep(0.3)

    # containerd -------------------------------------------------------------------------------

    def _start_containerd(self, deadline: float) -> None:
        assert self.dir is not None
        root = self.cache / "containerd"  # image content and snapshots survive runs
        root.mkdir(parents=True, exist_ok=True)
        CONTAINERD_STATE.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "containerd.toml"
        cfg.write_text(f"""version = 2
root = "{root}"
state = "{CONTAINERD_STATE}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{CONTAINERD_SOCKET}"
[ttrpc]
  address = "{CONTAINERD_STATE}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: a negative oom_score_adj cannot be written.
  restrict_oom_score_adj = true
  enable_selinux = false
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.dir / "cni" / "net.d"}"
    max_conf_num = 1
""")
        self._spawn("containerd", ["containerd", "--config", cfg, "--log-level", "warn"])
        self._wait(
            "the containerd socket",
            lambda: _run("ctr", "--address", str(CONTAINERD_SOCKET), "version", timeout=5).returncode == 0,
            deadline,
            "containerd",
        )

    def ctr(self, *args: str, timeout: float = 600, input_path: Path | None = None) -> subprocess.CompletedProcess:
        cmd = ["ctr", "--address", str(CONTAINERD_SOCKET), "-n", "k8s.io", *args]
        if input_path is not None:
            with open(input_path, "rb") as f:
                return subprocess.run(cmd, stdin=f, capture_output=True, text=True, timeout=timeout)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def has_image(self, ref: str) -> bool:
        res = self.ctr("images", "ls", "-q")
        return ref in res.stdout.split()

    def import_archive(self, archive: Path) -> None:
        res = self.ctr("images", "import", str(archive))
        if res.returncode != 0:
            raise NodeError(f"ctr images import {archive} failed: {res.stderr.strip()}")

    def _write_cni_config(self) -> None:
        assert self.dir is not None
        conf = {
            "cniVersion": "0.4.0",
            "name": "lsbert",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": NODE_CIDR, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.dir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.dir / "cni" / "net.d" / "10-lsbert.conflist").write_text(json.dumps(conf, indent=1))

    # kubelet ----------------------------------------------------------------------------------

    def _start_kubelet(self, cp: ControlPlane, serving: tuple[Path, Path], deadline: float) -> None:
        from tests.k8s.cluster import free_port

        assert self.dir is not None
        d = self.dir
        (d / "resolv.conf").write_text("")  # pods with dnsPolicy Default get no host resolver
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": free_port(),
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "readOnlyPort": 0,
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {
                "x509": {"clientCAFile": str(cp.ca_file)},
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "podLogsDir": str(d / "pod-logs"),
            "volumePluginDir": str(d / "volume-plugins"),
            "clusterDNS": [DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(d / "resolv.conf"),
            "registerNode": True,
            "registerWithTaints": [REAL_NODE_TAINT, GPU_TAINT],
            "maxPods": 40,
            "serializeImagePulls": False,
            "evictionHard": {
                "memory.available": "50Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 99,
            "imageGCLowThresholdPercent": 98,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "shutdownGracePeriod": "0s",
            "localStorageCapacityIsolation": True,
            "enableDebuggingHandlers": True,
            "logging": {"verbosity": 1},
        }
        (d / "kubelet.yaml").write_text(json.dumps(cfg, indent=1))
        labels = f"{GPU_LABEL}=true,lsbert.test/pool=real"
        self._spawn(
            "kubelet",
            [
                cp.binary("kubelet"),
                f"--config={d / 'kubelet.yaml'}",
                f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                f"--root-dir={d / 'kubelet'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={labels}",
                "--v=1",
            ],
        )
        from kubernetes import client

        with cp.api_client() as api:
            core = client.CoreV1Api(api)

            def ready() -> bool:
                n = core.read_node(NODE_NAME)
                return any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))

            self._wait(f"node {NODE_NAME} Ready", ready, deadline, "kubelet")
            # The GPU as an extended resource: the node offers it, the scheduler counts it, nothing backs it.
            patch = [{"op": "add", "path": f"/status/capacity/{GPU_RESOURCE.replace('/', '~1')}", "value": "1"}]
            core.patch_node_status(NODE_NAME, patch)  # a list body is sent as a JSON patch

            def gpu_allocatable() -> bool:
                n = core.read_node(NODE_NAME)
                return (n.status.allocatable or {}).get(GPU_RESOURCE) == "1"

            self._wait("the node's nvidia.com/gpu allocatable", gpu_allocatable, deadline, "kubelet")

    # kube-proxy -------------------------------------------------------------------------------

    def _start_kube_proxy(self, cp: ControlPlane) -> None:
        from tests.k8s.cluster import free_port

        assert self.dir is not None
        state = _load_state()
        state["kube_proxy"] = str(cp.binary("kube-proxy"))
        _save_state(state)
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "mode": "iptables",
            "clusterCIDR": NODE_CIDR,
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Every Service hop is masqueraded: replies come back through the host even between two pods of
            # the bridge, so no br_netfilter module is needed.
            "iptables": {
                "masqueradeAll": True,
                "localhostNodePorts": False,
                "syncPeriod": "30s",
                "minSyncPeriod": "0s",
            },
            # Leave the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(cfg, indent=1))
        self._spawn("kube-proxy", [cp.binary("kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"])

    # CoreDNS ----------------------------------------------------------------------------------

    def _start_coredns(self, cp: ControlPlane, deadline: float) -> None:
        from kubernetes import client

        from tests.k8s.cluster import free_port

        assert self.dir is not None
        health, ready = free_port(), free_port()
        (self.dir / "Corefile").write_text(f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {cp.kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
    loadbalance
}}
.:53 {{
    bind {NODE_IP}
    errors
}}
""")
        self._spawn("coredns", [cp.binary("coredns"), "-conf", self.dir / "Corefile"])
        with cp.api_client() as api:
            core = client.CoreV1Api(api)
            ports = [
                client.V1ServicePort(name="dns", port=53, protocol="UDP", target_port=53),
                client.V1ServicePort(name="dns-tcp", port=53, protocol="TCP", target_port=53),
            ]
            core.create_namespaced_service(
                "kube-system",
                client.V1Service(
                    metadata=client.V1ObjectMeta(name="kube-dns", labels={"k8s-app": "kube-dns"}),
                    spec=client.V1ServiceSpec(cluster_ip=DNS_IP, ports=ports),
                ),
            )
            # No selector: the endpoints are the CoreDNS process on the node's address.
            client.DiscoveryV1Api(api).create_namespaced_endpoint_slice(
                "kube-system",
                client.V1EndpointSlice(
                    metadata=client.V1ObjectMeta(
                        name="kube-dns-node",
                        labels={
                            "kubernetes.io/service-name": "kube-dns",
                            "endpointslice.kubernetes.io/managed-by": "lsbert-tests",
                        },
                    ),
                    address_type="IPv4",
                    endpoints=[
                        client.V1Endpoint(addresses=[NODE_IP], conditions=client.V1EndpointConditions(ready=True))
                    ],
                    ports=[
                        client.DiscoveryV1EndpointPort(name="dns", port=53, protocol="UDP"),
                        client.DiscoveryV1EndpointPort(name="dns-tcp", port=53, protocol="TCP"),
                    ],
                ),
            )
        import urllib.request

        def is_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{ready}/ready", timeout=2) as r:
                return r.status == 200

        self._wait("CoreDNS ready", is_ready, deadline, "coredns")

    # ---- images -------------------------------------------------------------------------------

    def ensure_image(self, ref: str, archive_writer: Callable[[Path], None]) -> None:
        """Import ``ref`` unless containerd has it: ``archive_writer(path)`` writes a docker/OCI archive."""
        if self.has_image(ref):
            return
        assert self.dir is not None
        tmp = self.dir / "image.tar"
        archive_writer(tmp)
        try:
            self.import_archive(tmp)
        finally:
            tmp.unlink(missing_ok=True)

    # ---- teardown -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove every pod, stop the components, undo every host change. Idempotent."""
        cp, self._cp = self._cp, None
        if cp is not None and "kubelet" in self.procs and self.procs["kubelet"].poll() is None:
            try:
                self._drain(cp)
            except Exception as e:  # the sweep below removes whatever is left
                self.log(f"real node: drain failed ({e!r}); killing what is left")
        for name in ("coredns", "kube-proxy", "kubelet"):
            self._terminate(name)
        if "containerd" in self.procs:
            self._remove_containers()
            self._terminate("containerd")
        self.procs.clear()
        if self.dir is not None:
            sweep(self.log)
            self.dir = None
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _drain(self, cp: ControlPlane) -> None:
        from kubernetes import client

        with cp.api_client() as api:
            core = client.CoreV1Api(api)
            for pod in core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE_NAME}").items:
                try:
                    core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
                except client.ApiException:
                    pass
        # The kubelet stops the sandboxes (CNI DEL) once the pods are gone.
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if not self.ctr("containers", "ls", "-q", timeout=10).stdout.split():
                return
            time.sleep(0.5)

    def _remove_containers(self) -> None:
        try:
            for cid in self.ctr("tasks", "ls", "-q", timeout=10).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", cid, timeout=10)
            time.sleep(0.5)
            for cid in self.ctr("tasks", "ls", "-q", timeout=10).stdout.split():
                self.ctr("tasks", "delete", "-f", cid, timeout=10)
            for cid in self.ctr("containers", "ls", "-q", timeout=10).stdout.split():
                self.ctr("containers", "delete", cid, timeout=10)
        except (subprocess.TimeoutExpired, OSError) as e:
            self.log(f"real node: removing containers failed ({e!r})")

    def _terminate(self, name: str, grace: float = 10.0) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
