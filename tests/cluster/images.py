"""lsbert's two container images, built from images/*/Dockerfile on a machine with no registry.

What it does, each step skipped when its result is already there:

1. installs the Debian packages it needs (docker.io, which brings containerd/ctr and runc; debootstrap);
2. starts a private Docker daemon: data under ``$LSBERT_CACHE/docker`` (the build cache survives runs),
   sockets, pid file and its own managed containerd under ``/run/lsbert-docker``, no bridge, no iptables,
   containers under the ``lsbert-docker`` cgroup; a daemon left over by a crashed run is swept first;
3. makes the base image from Debian packages (``debootstrap --variant=minbase`` bookworm with Python 3.11)
   carrying this host's CA bundle, so that pip inside the build trusts the same HTTPS proxy as pip here;
   tagged by a hash of its recipe;
4. builds both images with build arguments only (``PYTHON_IMAGE=<that base>``, ``TORCH_INDEX=cuda``),
   the legacy builder and the host network, tagged by a hash of every build input; the two Dockerfiles
   share their large layers, so the second build reuses the first's torch, dependencies and virtualenv;
5. stops the daemon and leaves no process, mount, socket or cgroup behind.

An unchanged rerun finds the stamp of its inputs hash and the images in the daemon's data directory, and
returns in well under a second without starting the daemon. ``load_into_containerd`` copies the images
into a node's containerd (``docker save | ctr images import``) unless that exact image is already there.

    python -m tests.cluster.images                      # build (or find) both images, print their tags
    python -m tests.cluster.images --report             # plus sizes, shared layers and disk use
    python -m tests.cluster.images --containerd SOCKET  # plus import into that containerd (k8s.io)
    python -m tests.cluster.images --sweep              # only clean up after a crashed run

Needs root (the daemon, debootstrap). Knobs: LSBERT_CACHE (default ~/.cache/lsbert), LSBERT_TORCH_INDEX
(default cuda: PyPI's torch; download.pytorch.org is not reachable from every machine),
LSBERT_DEBIAN_MIRROR (default http://deb.debian.org/debian).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "predictor": REPO_ROOT / "images" / "predictor" / "Dockerfile",
    "trainer": REPO_ROOT / "images" / "trainer" / "Dockerfile",
}
# The build context after .dockerignore: these files and trees, without byte-code and caches.
CONTEXT_FILES = (".dockerignore", "pyproject.toml", "README.md")
CONTEXT_TREES = ("src",)
CONTEXT_SKIP_DIRS = {"__pycache__", ".pytest_cache"}
CONTEXT_SKIP_SUFFIXES = (".pyc", ".pyo", ".pyd")

CACHE = Path(os.environ.get("LSBERT_CACHE") or Path.home() / ".cache" / "lsbert").expanduser()
DATA_ROOT = CACHE / "docker"
STATE = CACHE / "images"
# One stamp per built set of images (several checkouts of the repository may share this cache).
STAMPS = STATE / "stamps"
LOCK = STATE / "build.lock"
RUN_DIR = Path("/run/lsbert-docker")
EXEC_ROOT = RUN_DIR / "exec"
SOCKET = RUN_DIR / "docker.sock"
PIDFILE = RUN_DIR / "dockerd.pid"
CGROUP_PARENT = "lsbert-docker"
CGROUP_ROOT = Path("/sys/fs/cgroup")

TORCH_INDEX = os.environ.get("LSBERT_TORCH_INDEX", "cuda")
DEBIAN_MIRROR = os.environ.get("LSBERT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_PACKAGES = ("docker.io", "debootstrap")
# What the image builds need on top of a minimal Debian: Python 3.11 with venv, `python`, CA certificates,
# and groupadd/useradd (passwd) for the non-root user.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
BASE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"
# Bump when the way images are made changes without any input file changing.
RECIPE_VERSION = 1
# Refuse to start a cold build with less free disk than this (two images share ~6 GB; the build stage
# holds another copy of the virtualenv, and pip unpacks wheels on the side).
MIN_FREE_BYTES = 25 * 10**9

TAG_PREFIX = "test-"
# How many built sets stay (the newest): enough for a few checkouts or branches to take turns without
# rebuilding; each set whose dependencies differ holds its own ~6 GB virtualenv layer.
KEEP_BUILDS = int(os.environ.get("LSBERT_IMAGES_KEEP", "3"))
REPOS = ("lsbert-predictor", "lsbert-trainer", "lsbert-build", "lsbert-base")


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Images:
    """Tags of the two images (``lsbert-predictor:test-<hash>``); ``ids`` maps each tag to its image id."""

    predictor: str
    trainer: str
    ids: dict = field(default_factory=dict, compare=False)

    @property
    def tags(self) -> tuple[str, str]:
        return (self.predictor, self.trainer)


def log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    log(f"{what}: {time.monotonic() - start:.1f} s")


# ------------------------------------------------------------------------------------------ hashing
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def context_files(root: Path = REPO_ROOT) -> list[Path]:
    """The files the image builds read, relative to the repository root, in a stable order."""
    files = [Path("images/predictor/Dockerfile"), Path("images/trainer/Dockerfile")]
    files += [Path(name) for name in CONTEXT_FILES if (root / name).is_file()]
    for tree in CONTEXT_TREES:
        for dirpath, dirnames, filenames in os.walk(root / tree):
            dirnames[:] = sorted(d for d in dirnames if d not in CONTEXT_SKIP_DIRS)
            for name in sorted(filenames):
                if not name.endswith(CONTEXT_SKIP_SUFFIXES):
                    files.append((Path(dirpath) / name).relative_to(root))
    return files


def dockerfile_instructions(text: str) -> list[str]:
    """A Dockerfile's instructions, continuation lines joined, comments and blank lines dropped."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def inputs_hash(base_tag: str, torch_index: str = TORCH_INDEX, root: Path = REPO_ROOT) -> str:
    """Hash of everything an image build depends on: the files, the base image and the build arguments."""
    digest = hashlib.sha256(f"recipe={RECIPE_VERSION}\nbase={base_tag}\ntorch={torch_index}\n".encode())
    for rel in context_files(root):
        path = root / rel
        executable = os.access(path, os.X_OK)
        digest.update(f"{rel.as_posix()}\0{int(executable)}\0{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def host_ca_bundle() -> Path:
    """The CA bundle pip uses on this machine (PIP_CERT, pip's configuration, then the system's)."""
    candidates = [os.environ.get("PIP_CERT")]
    config_files = [
        Path("/etc/pip.conf"),
        Path("/etc/xdg/pip/pip.conf"),
        Path.home() / ".config" / "pip" / "pip.conf",
        Path.home() / ".pip" / "pip.conf",
    ]
    if os.environ.get("PIP_CONFIG_FILE"):
        config_files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    for conf in reversed(config_files):  # the most specific first
        parser = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(conf)
            for section in ("install", "global"):
                candidates.append(parser.get(section, "cert", fallback=None))
    candidates += [
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ImageBuildError("no CA bundle found (PIP_CERT, pip.conf 'cert', SSL_CERT_FILE or /etc/ssl/certs)")


def base_recipe(ca_bundle: Path) -> dict:
    return {
        "version": RECIPE_VERSION,
        "suite": BASE_SUITE,
        "variant": "minbase",
        "packages": list(BASE_PACKAGES),
        "env": list(BASE_ENV),
        "ca_bundle_sha256": _sha256_file(ca_bundle),
        "pip_conf": _pip_conf(),
    }


def _pip_conf() -> str:
    # The image's pip trusts the image's bundle (this host's), with this host's patience for big wheels.
    timeout = os.environ.get("PIP_DEFAULT_TIMEOUT", "180")
    return f"[global]\ncert = {CA_BUNDLE_IN_IMAGE}\ntimeout = {timeout}\n"


def base_tag(ca_bundle: Path) -> str:
    recipe = json.dumps(base_recipe(ca_bundle), sort_keys=True)
    return f"lsbert-base:{TAG_PREFIX}{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------ host setup
def _run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run(list(cmd), **kwargs)


def ensure_debian_packages(packages: Sequence[str] = DEBIAN_PACKAGES) -> None:
    """apt-get install what is missing (nothing when all are installed)."""
    missing = []
    for package in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(package)
    if not missing:
        return
    if os.geteuid() != 0:
        raise ImageBuildError(f"missing Debian packages {missing}; run as root or: apt-get install {' '.join(missing)}")
    with timed(f"apt-get install {' '.join(missing)}"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        _run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env, stdout=subprocess.DEVNULL
        )


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below the given directories, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            for root in roots:
                root_s = str(root)
                if point == root_s or point.startswith(root_s.rstrip("/") + "/"):
                    found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _unmount_all(*roots: Path) -> None:
    for _ in range(5):  # a mount can hide another at the same place
        points = _mounts_under(*roots)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = _mounts_under(*roots)
    if left:
        raise ImageBuildError(f"could not unmount {left}")


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting anything below (never follows a mount into the host)."""
    if not path.exists():
        return
    _unmount_all(path)
    shutil.rmtree(path)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; its parent has not collected it yet.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _terminate(pids: Sequence[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [pid for pid in pids if _alive(pid)]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 10)
        while any(_alive(pid) for pid in live) and time.monotonic() < deadline:
            time.sleep(0.2)


def _our_processes() -> list[int]:
    """Processes started by the private daemon: dockerd, its containerd and shims (they name RUN_DIR in
    their arguments) and whatever runs in its containers' cgroups."""
    pids = set()
    marker = str(RUN_DIR)
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and int(entry.name) != os.getpid()
            and any(arg.endswith(marker) or marker + "/" in arg for arg in _cmdline(int(entry.name))[1:])
        ):
            pids.add(int(entry.name))
    for top in _cgroup_dirs():
        for procs in top.glob("**/cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def _cgroup_dirs(max_depth: int = 4) -> list[Path]:
    """The daemon's parent cgroup in every hierarchy. It is not always at the top: runc places it below
    the cgroup the daemon itself runs in where that is not the root (seen for the memory controller)."""
    found = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        for dirpath, dirnames, _files in os.walk(hierarchy):
            if Path(dirpath).name == CGROUP_PARENT:
                found.append(Path(dirpath))
                dirnames.clear()
            elif Path(dirpath).relative_to(hierarchy).as_posix().count("/") >= max_depth - 1:
                dirnames.clear()
    return found


def _remove_cgroups() -> None:
    for top in _cgroup_dirs():
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def sweep() -> None:
    """Clean up after a private daemon: processes, mounts, sockets, cgroups. Safe to call any time the
    build lock is held (also when nothing is left)."""
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(PIDFILE.read_text().strip())
    if pid and _alive(pid) and str(EXEC_ROOT) in " ".join(_cmdline(pid)):
        _terminate([pid], grace=30)
    _terminate(_our_processes(), grace=10)
    _unmount_all(DATA_ROOT, RUN_DIR)
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    _remove_cgroups()


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One builder at a time on this machine (the private daemon and its paths are fixed)."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build to finish ({LOCK})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# ------------------------------------------------------------------------------------------ the daemon
class PrivateDocker:
    """A dockerd of our own, started and stopped around the work (hold build_lock while it lives)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.docker = shutil.which("docker", path="/usr/bin") or shutil.which("docker") or "docker"
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{SOCKET}",
            "DOCKER_BUILDKIT": "0",
            "DOCKER_CONFIG": str(RUN_DIR / "client"),
        }

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ImageBuildError("building the images needs root (a private dockerd, debootstrap)")
        ensure_debian_packages()
        sweep()
        for path in (RUN_DIR, EXEC_ROOT, DATA_ROOT, STATE, RUN_DIR / "client"):
            path.mkdir(parents=True, exist_ok=True)
        (RUN_DIR / "daemon.json").write_text("{}\n")
        log_path = STATE / "dockerd.log"
        cmd = [
            shutil.which("dockerd") or "/usr/sbin/dockerd",
            f"--config-file={RUN_DIR / 'daemon.json'}",  # not the host's /etc/docker/daemon.json
            f"--host=unix://{SOCKET}",
            f"--data-root={DATA_ROOT}",
            f"--exec-root={EXEC_ROOT}",
            f"--pidfile={PIDFILE}",
            f"--cgroup-parent={CGROUP_PARENT}",
            "--storage-driver=overlay2",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--log-level=warn",
        ]
        with timed("dockerd start"):
            with open(log_path, "wb") as out:
                self.proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
            deadline = time.monotonic() + 60
            while True:
                if self.proc.poll() is not None:
                    raise ImageBuildError(f"dockerd exited with {self.proc.returncode}:\n{_tail(log_path)}")
                if SOCKET.exists() and self.run("version", check=False, capture_output=True).returncode == 0:
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise ImageBuildError(f"dockerd did not answer within 60 s:\n{_tail(log_path)}")
                time.sleep(0.3)
        # Containers a crashed build left behind (builds remove their own).
        self.run("container", "prune", "--force", capture_output=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        sweep()

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", True)
        return subprocess.run([self.docker, *args], env=self.env, **kwargs)

    def out(self, *args: str) -> str:
        return self.run(*args, capture_output=True, text=True).stdout.strip()

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False, capture_output=True).returncode == 0

    def image_id(self, ref: str) -> str:
        return self.out("image", "inspect", "--format", "{{.Id}}", ref)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with timed("dockerd stop"):
            self.stop()


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ------------------------------------------------------------------------------------------ base image
def make_base_image(docker: PrivateDocker, tag: str, ca_bundle: Path) -> None:
    """debootstrap a minimal bookworm with Python and this host's CA bundle, and import it as `tag`."""
    rootfs = STATE / "rootfs.tmp"
    debs = STATE / "debootstrap-cache"
    debs.mkdir(parents=True, exist_ok=True)
    _remove_tree(rootfs)
    log_path = STATE / "debootstrap.log"
    try:
        with timed("debootstrap"), open(log_path, "wb") as out:
            result = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    f"--cache-dir={debs}",
                    BASE_SUITE,
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
            if result.returncode != 0:
                raise ImageBuildError(f"debootstrap failed ({result.returncode}):\n{_tail(log_path)}")
        _unmount_all(rootfs)  # debootstrap unmounts /proc and /sys itself; a failed run may not
        shutil.copyfile(ca_bundle, rootfs / CA_BUNDLE_IN_IMAGE.lstrip("/"))
        (rootfs / "etc" / "pip.conf").write_text(_pip_conf())
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for child in (rootfs / junk).glob("*"):
                if child.is_file() or child.is_symlink():
                    child.unlink()
        with timed(f"docker import {tag}"):
            changes = [arg for env in BASE_ENV for arg in ("--change", f"ENV {env}")]
            tar = subprocess.Popen(
                [
                    "tar",
                    "--numeric-owner",
                    "--xattrs",
                    "-C",
                    str(rootfs),
                    "--exclude=./dev/*",
                    "--exclude=./proc/*",
                    "--exclude=./sys/*",
                    "--exclude=./run/*",
                    "-cf",
                    "-",
                    ".",
                ],
                stdout=subprocess.PIPE,
            )
            try:
                docker.run(
                    "import",
                    *changes,
                    "--change",
                    'CMD ["python3"]',
                    "-",
                    tag,
                    stdin=tar.stdout,
                    stdout=subprocess.DEVNULL,
                )
            finally:
                tar.stdout.close()
                if tar.wait() != 0:
                    raise ImageBuildError(f"tar of the base rootfs failed ({tar.returncode})")
    finally:
        _remove_tree(rootfs)


# ------------------------------------------------------------------------------------------ the builds
def _build(
    docker: PrivateDocker, dockerfile: Path, tag: str, base: str, torch_index: str, target: str | None = None
) -> None:
    name = tag.split(":")[0]
    log_path = STATE / f"build-{name}.log"
    cmd = [
        "build",
        "--network",
        "host",
        "--force-rm",
        "--file",
        str(dockerfile),
        "--tag",
        tag,
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--build-arg",
        f"TORCH_INDEX={torch_index}",
    ]
    if target:
        cmd += ["--target", target]
    start = time.monotonic()
    with open(log_path, "wb") as out:
        result = docker.run(*cmd, str(REPO_ROOT), check=False, stdout=out, stderr=subprocess.STDOUT)
    text = log_path.read_text(errors="replace")
    if result.returncode != 0:
        raise ImageBuildError(f"docker build of {tag} failed ({result.returncode}), log {log_path}:\n{_tail(log_path)}")
    steps, cached = text.count("\nStep "), text.count("Using cache")
    log(f"built {tag}: {time.monotonic() - start:.1f} s ({cached} of {steps} steps from the cache)")


def _stamps() -> list[dict]:
    """Stamps of the built sets, newest first (the single images.json of earlier versions counts too, so
    that a checkout still running them keeps its images)."""
    stamps = []
    for path in [*STAMPS.glob("*.json"), STATE / "images.json"]:
        with contextlib.suppress(OSError, ValueError):
            stamps.append({**json.loads(path.read_text()), "_path": path})
    return sorted(stamps, key=lambda stamp: stamp.get("built", ""), reverse=True)


def superseded(tags: Sequence[str], stamps: Sequence[dict], keep_builds: int = KEEP_BUILDS) -> list[str]:
    """Which of our tags to remove: all but those of the newest `keep_builds` stamps (their images, build
    stage and base). Tags of other repositories, and tags not made here, are never touched."""
    keep: set[str] = set()
    for stamp in stamps[:keep_builds]:
        keep.update(stamp[key] for key in ("predictor", "trainer", "build_stage", "base") if key in stamp)
        if "hash" in stamp:
            keep.add(f"lsbert-build:{TAG_PREFIX}{stamp['hash'][:12]}")
    return [
        tag
        for tag in tags
        if ":" in tag and tag.split(":")[0] in REPOS and tag.split(":", 1)[1].startswith(TAG_PREFIX) and tag not in keep
    ]


def _remove_superseded(docker: PrivateDocker, keep_builds: int = KEEP_BUILDS) -> None:
    """Keep the newest `keep_builds` sets; drop our other tags and the dangling images they leave. Each
    kept set's build stage stays tagged, so its cache survives."""
    stamps = _stamps()
    for stamp in stamps[keep_builds:]:
        stamp["_path"].unlink(missing_ok=True)
    old = superseded(docker.out("images", "--format", "{{.Repository}}:{{.Tag}}").splitlines(), stamps, keep_builds)
    for ref in old:
        docker.run("rmi", ref, check=False, capture_output=True)
    docker.run("image", "prune", "--force", check=False, capture_output=True)
    if old:
        log(f"removed superseded images: {', '.join(old)}")


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def _stamp_path(digest: str) -> Path:
    return STAMPS / f"{digest[:12]}.json"


def _stamp_images(expected_hash: str) -> Images | None:
    """The images built from inputs with this hash, if their stamp says so and the daemon's data directory
    still holds them: no daemon needed to know."""
    try:
        stamp = json.loads(_stamp_path(expected_hash).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("hash") != expected_hash:
        return None
    images = Images(predictor=stamp["predictor"], trainer=stamp["trainer"], ids=stamp.get("ids", {}))
    return images if all(_in_data_root(tag, images.ids.get(tag, "")) for tag in images.tags) else None


def _in_data_root(tag: str, image_id: str) -> bool:
    store = DATA_ROOT / "image" / "overlay2"
    try:
        repos = json.loads((store / "repositories.json").read_text())["Repositories"]
    except (OSError, ValueError, KeyError):
        return False
    name = tag.split(":")[0]
    return (
        bool(image_id)
        and repos.get(name, {}).get(tag) == image_id
        and (store / "imagedb" / "content" / "sha256" / image_id.removeprefix("sha256:")).is_file()
    )


def ensure_images(torch_index: str = TORCH_INDEX) -> Images:
    """Both images, built if their inputs changed since the last build; their tags and ids."""
    start = time.monotonic()
    ca_bundle = host_ca_bundle()
    base = base_tag(ca_bundle)
    digest = inputs_hash(base, torch_index)
    found = _stamp_images(digest)
    if found:
        log(f"up to date: {found.predictor}, {found.trainer} ({time.monotonic() - start:.2f} s)")
        return found
    with build_lock():
        found = _stamp_images(digest)  # another process may have built them while we waited
        if found:
            return found
        images = Images(
            predictor=f"lsbert-predictor:{TAG_PREFIX}{digest[:12]}", trainer=f"lsbert-trainer:{TAG_PREFIX}{digest[:12]}"
        )
        build_stage = f"lsbert-build:{TAG_PREFIX}{digest[:12]}"
        with PrivateDocker() as docker:
            if not all(docker.has_image(tag) for tag in images.tags):
                free = _free_bytes(DATA_ROOT)
                if free < MIN_FREE_BYTES:  # older sets go first: only the newest stays for the build cache
                    _remove_superseded(docker, keep_builds=1)
                    free = _free_bytes(DATA_ROOT)
                if free < MIN_FREE_BYTES:
                    raise ImageBuildError(
                        f"{free / 1e9:.1f} GB free under {DATA_ROOT}; the builds need {MIN_FREE_BYTES / 1e9:.0f} GB"
                    )
                if docker.has_image(base):
                    log(f"base {base} present")
                else:
                    make_base_image(docker, base, ca_bundle)
                # The build stage is the same in both Dockerfiles; tagging it keeps its cache when the
                # older images are removed below.
                _build(docker, DOCKERFILES["predictor"], build_stage, base, torch_index, target="build")
                _build(docker, DOCKERFILES["predictor"], images.predictor, base, torch_index)
                _build(docker, DOCKERFILES["trainer"], images.trainer, base, torch_index)
            images = Images(images.predictor, images.trainer, ids={tag: docker.image_id(tag) for tag in images.tags})
            STAMPS.mkdir(parents=True, exist_ok=True)
            stamp = {
                "hash": digest,
                "predictor": images.predictor,
                "trainer": images.trainer,
                "ids": images.ids,
                "build_stage": build_stage,
                "base": base,
                "torch_index": torch_index,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.gmtime()),
            }
            _stamp_path(digest).write_text(json.dumps(stamp, indent=2) + "\n")
            _remove_superseded(docker)
    log(f"ready: {images.predictor}, {images.trainer} ({time.monotonic() - start:.1f} s)")
    return images


# ------------------------------------------------------------------------------------------ containerd
def containerd_ref(tag: str) -> str:
    """The name containerd (and the kubelet) use for a local tag such as lsbert-predictor:test-abc."""
    name = tag if "/" in tag.split(":")[0] else f"library/{tag}"
    return name if name.split("/")[0].count(".") else f"docker.io/{name}"


def _ctr(ctr: str, socket: Path, namespace: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([ctr, "--address", str(socket), "--namespace", namespace, *args], **kwargs, check=False)


def _config_digest_in_containerd(ctr: str, socket: Path, namespace: str, ref: str) -> str | None:
    listed = _ctr(ctr, socket, namespace, "images", "ls", capture_output=True, text=True)
    if listed.returncode != 0:
        raise ImageBuildError(f"ctr images ls failed on {socket}: {listed.stderr.strip()}")
    rows = [line.split() for line in listed.stdout.splitlines()[1:] if line.split() and line.split()[0] == ref]
    if not rows:
        return None
    digest = rows[0][2]
    for _ in range(2):  # an index first, then the manifest
        content = _ctr(ctr, socket, namespace, "content", "get", digest, capture_output=True)
        if content.returncode != 0:
            return None
        doc = json.loads(content.stdout)
        if "config" in doc:
            return doc["config"]["digest"]
        manifests = doc.get("manifests") or []
        if not manifests:
            return None
        digest = manifests[0]["digest"]
    return None


def load_into_containerd(
    socket: Path,
    namespace: str = "k8s.io",
    images: Images | None = None,
    ctr: str | None = None,
    snapshotter: str | None = None,
) -> list[str]:
    """Import both images into the containerd at `socket` unless that exact image (same config digest as
    the one built) is already there. Returns the containerd refs imported (empty when none was needed).
    Pods use the plain tags (``lsbert-predictor:test-...``) with imagePullPolicy Never or IfNotPresent."""
    images = images or ensure_images()
    ctr = ctr or shutil.which("ctr") or "/usr/bin/ctr"
    missing = [
        tag
        for tag in images.tags
        if _config_digest_in_containerd(ctr, socket, namespace, containerd_ref(tag)) != images.ids.get(tag)
    ]
    if not missing:
        log(f"containerd {socket} ({namespace}) has both images")
        _remove_older_in_containerd(ctr, socket, namespace, images)
        return []
    with build_lock(), PrivateDocker() as docker, timed(f"import {', '.join(missing)} into {socket}"):
        # One stream for both: their shared layers travel once.
        save = subprocess.Popen([docker.docker, "save", *missing], env=docker.env, stdout=subprocess.PIPE)
        args = ["images", "import"] + (["--snapshotter", snapshotter] if snapshotter else []) + ["-"]
        try:
            result = _ctr(ctr, socket, namespace, *args, stdin=save.stdout, capture_output=True, text=True)
        finally:
            save.stdout.close()
            save.wait()
        if save.returncode != 0 or result.returncode != 0:
            raise ImageBuildError(
                f"docker save | ctr images import failed ({save.returncode}/{result.returncode}): "
                f"{result.stderr.strip()[-2000:]}"
            )
    refs = [containerd_ref(tag) for tag in missing]
    for tag, ref in zip(missing, refs):
        if _config_digest_in_containerd(ctr, socket, namespace, ref) != images.ids.get(tag):
            raise ImageBuildError(f"{ref} is not in containerd {socket} after the import")
    _remove_older_in_containerd(ctr, socket, namespace, images)
    return refs


def older_in_containerd(refs: Sequence[str], images: Images) -> list[str]:
    """Which containerd refs are earlier builds of ours (any of our repositories, a test- tag, not ``images``'s)."""
    current = {containerd_ref(tag) for tag in images.tags}
    ours = {containerd_ref(f"{repo}:{TAG_PREFIX}").rsplit(":", 1)[0] for repo in REPOS}
    return [
        ref
        for ref in refs
        if ref not in current
        and ":" in ref
        and ref.rsplit(":", 1)[0] in ours
        and ref.rsplit(":", 1)[1].startswith(TAG_PREFIX)
    ]


def _remove_older_in_containerd(ctr: str, socket: Path, namespace: str, images: Images) -> None:
    """Only the images just imported stay: each earlier set holds ~6 GB (containerd collects their content
    and snapshots once no image names them)."""
    listed = _ctr(ctr, socket, namespace, "images", "ls", "--quiet", capture_output=True, text=True)
    old = older_in_containerd(listed.stdout.split(), images) if listed.returncode == 0 else []
    if old:
        # --sync: containerd collects the content and snapshots before returning (not whenever it gets to it,
        # which may be after the node is stopped)
        _ctr(ctr, socket, namespace, "images", "rm", "--sync", *old, capture_output=True, text=True)
        log(f"removed earlier images from containerd {socket}: {', '.join(old)}")


# ------------------------------------------------------------------------------------------ report
def _chain_ids(diff_ids: Sequence[str]) -> list[str]:
    chain: list[str] = []
    for diff in diff_ids:
        chain.append(diff if not chain else "sha256:" + hashlib.sha256(f"{chain[-1]} {diff}".encode()).hexdigest())
    return chain


def layer_report(images: Images) -> dict:
    """Sizes of both images, the layers they share (bytes), and the disk the daemon's data directory uses.
    Reads the data directory directly: no daemon needed."""
    store = DATA_ROOT / "image" / "overlay2"
    sizes: dict[str, dict[str, int]] = {}
    for tag in images.tags:
        config = json.loads(
            (store / "imagedb" / "content" / "sha256" / images.ids[tag].removeprefix("sha256:")).read_text()
        )
        layers = {}
        for chain in _chain_ids(config["rootfs"]["diff_ids"]):
            layers[chain] = int((store / "layerdb" / "sha256" / chain.removeprefix("sha256:") / "size").read_text())
        sizes[tag] = layers
    predictor, trainer = (sizes[tag] for tag in images.tags)
    shared = set(predictor) & set(trainer)
    du = subprocess.run(["du", "-sb", str(DATA_ROOT)], capture_output=True, text=True, check=False)
    return {
        "images": {tag: {"bytes": sum(layers.values()), "layers": len(layers)} for tag, layers in sizes.items()},
        "shared_layers": len(shared),
        "shared_bytes": sum(predictor[c] for c in shared),
        "unshared_bytes": {tag: sum(b for c, b in layers.items() if c not in shared) for tag, layers in sizes.items()},
        "data_root_bytes": int(du.stdout.split()[0]) if du.returncode == 0 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--containerd", type=Path, metavar="SOCKET", help="also import into this containerd")
    parser.add_argument("--namespace", default="k8s.io", help="containerd namespace (default k8s.io)")
    parser.add_argument("--report", action="store_true", help="print sizes, shared layers and disk use")
    parser.add_argument("--sweep", action="store_true", help="only clean up after a crashed run, then exit")
    args = parser.parse_args(argv)
    try:
        if args.sweep:
            with build_lock():
                sweep()
            return 0
        images = ensure_images()
        result: dict = {"predictor": images.predictor, "trainer": images.trainer}
        if args.containerd:
            result["imported"] = load_into_containerd(args.containerd, args.namespace, images)
        if args.report:
            result["report"] = layer_report(images)
    except ImageBuildError as exc:
        print(f"images: ERROR: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
