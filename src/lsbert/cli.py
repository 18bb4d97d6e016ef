"""The ``lsbert`` command: ``serve`` (the predictor), ``train`` (one training run), ``status``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lsbert serve", description="Start the predictor (KServe model server + Label Studio ML backend API)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; images use 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9090, help="HTTP port (default 9090)")
    args = parser.parse_args(argv)
    from lsbert.serve import serve

    return serve(host=args.host, port=args.port)


def _train(argv: list[str]) -> int:
    from lsbert.trainer.main import main as train_main

    return train_main(argv)


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lsbert status", description="Projects, serving versions and training runs.")
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:9090",
        help="a running predictor to ask (with BASIC_AUTH_USER/BASIC_AUTH_PASS from the environment when set)",
    )
    parser.add_argument("--kubernetes", action="store_true", help="also list training Jobs in the cluster")
    parser.add_argument("--namespace", default=None)
    args = parser.parse_args(argv)
    from lsbert.status import print_status

    return print_status(args.url, kubernetes=args.kubernetes, namespace=args.namespace)


COMMANDS = {"serve": _serve, "train": _train, "status": _status}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print(
            "usage: lsbert {serve,train,status} [options]\n\n"
            "  serve   start the predictor (Label Studio ML backend + KServe V1/V2)\n"
            "  train   fine-tune one project's model from its Label Studio annotations\n"
            "  status  projects, serving versions and training runs",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    from lsbert.settings import SettingsError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except SettingsError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
