"""Child process for the store tests: runs store operations in a separate interpreter, optionally
SIGKILLing itself at the k-th fault-hook step (a crash at exactly that point: no cleanup, no finally).

    python _child.py '<json spec>'    run one operation in this process
    python _child.py serve            fork server: for each JSON spec line on stdin, fork a child that runs
                                      it, wait for it and answer {"status": waitpid status}; the imports
                                      and the S3 client are made once, so a kill costs milliseconds

Spec keys: uri, cache_dir, op and
  save-promote: project, name, source, kill_at (int|null), steps_file, version_file
  next-version: project, name, count, start_at (epoch seconds, to start several callers together)
  download:     project, version, kill_at, steps_file
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any], client: Any = None) -> Any:
    from lsbert.store import open_store
    from lsbert.store.s3 import S3Store

    if client is not None and spec["uri"].startswith("s3://"):
        store = S3Store(spec["uri"], cache_dir=Path(spec["cache_dir"]), client=client)
    else:
        store = open_store(spec["uri"], cache_dir=spec["cache_dir"])
    kill_at = spec.get("kill_at")
    steps_file = spec.get("steps_file")
    seen = [0]

    def hook(step: str) -> None:
        if steps_file:
            with open(steps_file, "a") as fh:
                fh.write(step + "\n")
        if kill_at is not None and seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        seen[0] += 1

    store.fault_hook = hook
    op = spec["op"]
    if op == "save-promote":
        version = store.next_version(spec["project"], spec["name"])
        Path(spec["version_file"]).write_text(version)
        store.save(spec["project"], version, Path(spec["source"]), {"metrics": {"f1": 0.9}, "by": "child"})
        store.promote(spec["project"], version)
        return version
    if op == "next-version":
        while time.time() < spec.get("start_at", 0):
            time.sleep(0.001)
        return [store.next_version(spec["project"], spec["name"]) for _ in range(spec["count"])]
    if op == "download":
        return str(store.local_path(spec["project"], spec["version"]))
    raise SystemExit(f"unknown op {op}")


def serve() -> None:
    import lsbert.store.local  # noqa: F401  (import once, before forking)
    from lsbert.store.s3util import make_client as _make_client

    client = _make_client() if os.environ.get("AWS_ENDPOINT_URL") else None
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(spec, client)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps({"status": status}) + "\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1] == "serve":
        serve()
    else:
        print(json.dumps(run(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
