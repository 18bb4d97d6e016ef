"""``lsbert status``: what a running predictor serves and trains, and (with --kubernetes) the Jobs."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Optional


def print_status(url: str, kubernetes: bool = False, namespace: Optional[str] = None) -> int:
    code = 0
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            health = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"predictor at {url}: unreachable ({exc})", file=sys.stderr)
        health, code = None, 1
    if health is not None:
        print(f"predictor {url}: {'ready' if health.get('ready') else 'loading'}; baseline {health.get('baseline')}")
        training = health.get("training") or {}
        serving = health.get("serving") or {}
        projects = sorted(set(training) | set(serving), key=lambda p: int(p))
        if not projects:
            print("  no projects yet")
        for project in projects:
            t = training.get(project, {})
            active = t.get("active")
            last = t.get("last")
            line = f"  project {project}: serving {serving.get(project, '-')}"
            if active:
                line += f"; training {active['version']} ({active['phase']})"
            elif last:
                line += f"; last run {last['version']} {last['phase']}"
                if last.get("message"):
                    line += f": {last['message']}"
            print(line)
    if kubernetes:
        from lsbert.launcher.kubernetes import print_jobs

        code = print_jobs(namespace) or code
    return code
