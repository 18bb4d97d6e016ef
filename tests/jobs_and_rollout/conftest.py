"""Training Jobs (the launcher, the Job template) and the restart rollout (KServe) against the Kubernetes
control plane of tests/k8s (the Job template tests run offline). Fixtures: a namespace with the
launcher's Role (this conftest), the control plane (tests.k8s.plugin, loaded by tests/conftest.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

# The launcher's Role: exactly what KubernetesLauncher + the restart rollout need (jobs/README.md).
LAUNCHER_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods", "pods/log", "events"], "verbs": ["get", "list"]},
    {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
]


@dataclass
class LauncherNamespace:
    name: str
    service_account: str
    cp: object

    def sa_client(self):
        """An ApiClient acting as the namespace's launcher ServiceAccount (a fresh bound token)."""
        return self.cp.service_account_client(self.name, self.service_account)

    def admin(self):
        return self.cp.api_client()


def make_launcher_namespace(cp, prefix: str) -> LauncherNamespace:
    from kubernetes import client

    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.create_namespace(ns)
    sa = "lsbert-predictor"
    with cp.api_client() as api:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa)))
        rbac.create_namespaced_role(
            ns, client.V1Role.from_dict({"metadata": {"name": "lsbert-launcher"}, "rules": LAUNCHER_RULES})
        )
        rbac.create_namespaced_role_binding(
            ns,
            client.V1RoleBinding.from_dict(
                {
                    "metadata": {"name": "lsbert-launcher"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lsbert-launcher"},
                    "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
                }
            ),
        )
    return LauncherNamespace(ns, sa, cp)


@pytest.fixture()
def launcher_ns(control_plane) -> Iterator[LauncherNamespace]:
    yield make_launcher_namespace(control_plane, "lsb")
