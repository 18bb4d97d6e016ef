"""A stand-in training command for scheduler tests: a real process that runs until the test releases it.

    python gate.py DIR --project P --version V [--fail]

Writes DIR/started-<version>-p<project>, waits for DIR/release-<version>, exits 0 (or 1 with --fail)."""

import argparse
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--project")
parser.add_argument("--version")
parser.add_argument("--fail", action="store_true")
args = parser.parse_args()
root = Path(args.dir)
(root / f"started-{args.version}-p{args.project}").write_text(args.project)
deadline = time.time() + 120
while not (root / f"release-{args.version}").exists() and time.time() < deadline:
    time.sleep(0.05)
if args.fail:
    print("training failed: the project has no labelled tasks", flush=True)
    sys.exit(1)
print("done", flush=True)
