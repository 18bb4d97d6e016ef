"""``lsbert status``: what a running predictor serves and trains, and (with --kubernetes) the Jobs."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, TextIO

from lsbert.kubeclient import REQUEST_TIMEOUT, api_message, load_api_client, resolve_namespace
from lsbert.launcher.base import RunPhase
from lsbert.launcher.jobspec import (
    APP_NAME,
    COMPONENT,
    LABEL_COMPONENT,
    LABEL_NAME,
    LABEL_PROJECT,
    age_key,
    condition,
    job_phase,
    job_version,
    label_selector,
    timestamp,
)
from lsbert.settings import SettingsError


def _health_request(url: str) -> urllib.request.Request:
    """GET /health, with the predictor's basic-auth credentials when they are in the environment (inside a
    predictor pod they are): without them /health says only whether the server is up and ready."""
    request = urllib.request.Request(url.rstrip("/") + "/health")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def print_status(url: str, kubernetes: bool = False, namespace: Optional[str] = None) -> int:
    code = 0
    try:
        with urllib.request.urlopen(_health_request(url), timeout=5) as resp:
            health = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"predictor at {url}: unreachable ({exc})", file=sys.stderr)
        health, code = None, 1
    if health is not None:
        state = "ready" if health.get("ready") else "loading"
        if "training" not in health:  # basic auth is on and this request had no (valid) credentials
            print(
                f"predictor {url}: {state}; projects and training hidden: basic auth is on, set "
                "BASIC_AUTH_USER and BASIC_AUTH_PASS to see them"
            )
        else:
            print(f"predictor {url}: {state}; baseline {health.get('baseline')}")
        training = health.get("training") or {}
        serving = health.get("serving") or {}
        projects = sorted(set(training) | set(serving), key=lambda p: int(p))
        if not projects and "training" in health:
            print("  no projects yet")
        for project in projects:
            t = training.get(project, {})
            active = t.get("active")
            last = t.get("last")
            line = f"  project {project}: serving {serving.get(project, '-')}"
            if active:
                line += f"; training {active['version']} ({active['phase']})"
                if active.get("message"):  # why it has not started: quota, scheduling, volume, image, ...
                    line += f": {active['message']}"
            elif last:
                line += f"; last run {last['version']} {last['phase']}"
                if last.get("message"):
                    line += f": {last['message']}"
            print(line)
    if kubernetes:
        code = print_jobs(namespace) or code
    return code


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def print_jobs(namespace: Optional[str] = None, *, api_client=None, out: Optional[TextIO] = None) -> int:
    """``lsbert status --kubernetes``: every lsbert training Job in the namespace, oldest first."""
    from kubernetes import client

    out = out or sys.stdout
    ns = namespace or "?"
    owns = api_client is None
    try:
        ns = resolve_namespace(namespace)
        if api_client is None:
            api_client = load_api_client()
        jobs = (
            client.BatchV1Api(api_client)
            .list_namespaced_job(
                ns,
                label_selector=label_selector({LABEL_NAME: APP_NAME, LABEL_COMPONENT: COMPONENT}),
                _request_timeout=REQUEST_TIMEOUT,
            )
            .items
        )
    except Exception as exc:
        why = str(exc) if isinstance(exc, SettingsError) else api_message(exc)
        print(f"training Jobs in namespace {ns}: cannot list them ({why})", file=sys.stderr)
        return 1
    finally:
        if owns and api_client is not None:
            api_client.close()
    if not jobs:
        print(f"no lsbert training Jobs in namespace {ns}", file=out)
        return 0
    now = time.time()
    rows: list[tuple[str, ...]] = [("JOB", "PROJECT", "VERSION", "PHASE", "AGE", "MESSAGE")]
    for job in sorted(jobs, key=age_key):
        phase = job_phase(job)
        message = ""
        if phase is RunPhase.FAILED:
            cond = condition(job, "Failed")
            message = f"{cond.reason}: {cond.message}"[:120]
        meta = job.metadata
        assert meta is not None  # the API server always sends metadata
        labels = meta.labels or {}
        rows.append(
            (
                str(meta.name),
                labels.get(LABEL_PROJECT, "?"),
                job_version(job),
                phase.value,
                _age(now - (timestamp(meta.creation_timestamp) or now)),
                message,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"training Jobs in namespace {ns}:", file=out)
    for row in rows:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5]))
        print(f"  {line}  {row[5]}" if row[5] else f"  {line}".rstrip(), file=out)
    return 0
