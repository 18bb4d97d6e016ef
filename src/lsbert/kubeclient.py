"""Kubernetes API client set-up shared by the Job launcher, the restart rollout and ``lsbert status``.

In a pod the ServiceAccount token is used (in-cluster config); elsewhere ``KUBECONFIG`` or
``~/.kube/config``. Only the ``kubernetes`` Python client is used, never ``kubectl``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lsbert.settings import SettingsError

REQUEST_TIMEOUT = (5, 30)  # connect, read (seconds) for every API call
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def load_api_client() -> Any:
    """An ApiClient from the in-cluster ServiceAccount, else from KUBECONFIG (or ~/.kube/config)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except ConfigException as in_cluster:
        path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=path, client_configuration=cfg)
        except (ConfigException, OSError, TypeError) as exc:
            raise SettingsError(
                f"no Kubernetes API configuration: not in a cluster ({in_cluster}) and {path} is unusable ({exc})"
            ) from None
    return client.ApiClient(cfg)


def resolve_namespace(explicit: Optional[str] = None) -> str:
    """explicit > POD_NAMESPACE > the pod's ServiceAccount namespace > the kubeconfig context's > default."""
    if explicit:
        return explicit
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        ns = (SA_DIR / "namespace").read_text().strip()
        if ns:
            return ns
    except OSError:
        pass
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(os.environ.get("KUBECONFIG") or "~/.kube/config")
        ns = (active or {}).get("context", {}).get("namespace")
        if ns:
            return str(ns)
    except Exception:  # no kubeconfig: the default namespace
        pass
    return "default"


def api_message(exc: BaseException) -> str:
    """One line for an API error: ``403 Forbidden: <the API server's message>``, or the exception itself."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        detail = ""
        try:
            detail = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            detail = (exc.body or "")[:300] if isinstance(exc.body, str) else ""
        return f"{exc.status} {exc.reason or ''}: {detail}".strip().rstrip(":")
    return f"{exc.__class__.__name__}: {exc}"
