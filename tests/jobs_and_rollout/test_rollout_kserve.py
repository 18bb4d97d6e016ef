"""ROLLOUT_STRATEGY=restart on the real control plane: the InferenceService CRD (real schema, pruning,
merge patch, optimistic concurrency) and a predictor Deployment rolled by the real Deployment controller
with kwok pods. There is no KServe controller here, so the test plays its part: it copies the predictor
annotation into the Deployment's pod template, as KServe's Standard mode does."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lsbert.rollout import kserve
from lsbert.rollout.kserve import ANNOTATION, RestartRollout, RolloutFailed, roll, rollout_finished
from tests.support.polling import until, wait_until

pytestmark = pytest.mark.k8s

TIMEOUT = 60.0
IMAGE = "registry.invalid/lsbert/predictor:test"


def isvc(name: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "annotations": {"serving.kserve.io/deploymentMode": "Standard"}},
        "spec": {
            "predictor": {
                "minReplicas": 1,
                "containers": [{"name": "kserve-container", "image": IMAGE, "args": ["serve", "--host", "0.0.0.0"]}],
            }
        },
    }


def predictor_deployment(
    name: str, *, annotation: str = "", replicas: int = 2, gpus: int = 0, deadline: int = 600
) -> client.V1Deployment:
    labels = {"app": name}
    container = {"name": "kserve-container", "image": IMAGE}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return client.V1Deployment.from_dict(
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "progressDeadlineSeconds": deadline,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": labels, "annotations": {ANNOTATION: annotation}},
                    "spec": {"containers": [container]},
                },
            },
        }
    )


def play_kserve(apps: client.AppsV1Api, co: client.CustomObjectsApi, ns: str, isvc_name: str) -> str:
    """What KServe's reconciler does with predictor annotations: copy them into the pod template."""
    got = co.get_namespaced_custom_object("serving.kserve.io", "v1beta1", ns, "inferenceservices", isvc_name)
    value = got["spec"]["predictor"]["annotations"][ANNOTATION]
    apps.patch_namespaced_deployment(
        f"{isvc_name}-predictor", ns, {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: value}}}}}
    )
    return value


@pytest.fixture()
def kserve_ns(launcher_ns):
    with launcher_ns.admin() as api:
        co, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
        co.create_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", launcher_ns.name, "inferenceservices", isvc("lsbert")
        )
        apps.create_namespaced_deployment(launcher_ns.name, predictor_deployment("lsbert-predictor"))
        yield launcher_ns, co, apps


def test_roll_patches_the_predictor_annotation_and_the_deployment_judges_completion(kserve_ns):
    ns, co, apps = kserve_ns
    with ns.sa_client() as sa:
        # the initial rollout of the Deployment, driven by the real controller and kwok
        wait_until(
            lambda: rollout_finished("lsbert-predictor", ns.name, api_client=sa), TIMEOUT, "the first rollout", 0.2
        )
        before = apps.read_namespaced_deployment("lsbert-predictor", ns.name)

        assert roll("lsbert", ns.name, "p3=ft-0004,p5=ft-0002", api_client=sa) is True
        got = co.get_namespaced_custom_object("serving.kserve.io", "v1beta1", ns.name, "inferenceservices", "lsbert")
        assert got["spec"]["predictor"]["annotations"] == {ANNOTATION: "p3=ft-0004,p5=ft-0002"}  # kept by the schema
        assert got["spec"]["predictor"]["containers"][0]["image"] == IMAGE  # merge patch left the rest alone
        assert roll("lsbert", ns.name, "p3=ft-0004,p5=ft-0002", api_client=sa) is False  # nothing to do

        # KServe has not updated the Deployment yet: the old, finished rollout is not mistaken for this one
        assert rollout_finished("lsbert-predictor", ns.name, api_client=sa) is True
        assert (
            rollout_finished("lsbert-predictor", ns.name, api_client=sa, checkpoint_id="p3=ft-0004,p5=ft-0002") is False
        )
        play_kserve(apps, co, ns.name, "lsbert")
        wait_until(
            lambda: rollout_finished("lsbert-predictor", ns.name, api_client=sa, checkpoint_id="p3=ft-0004,p5=ft-0002"),
            TIMEOUT,
            "the rollout to the new checkpoints",
            0.2,
        )
        after = apps.read_namespaced_deployment("lsbert-predictor", ns.name)
        assert after.metadata.generation > before.metadata.generation
        assert after.status.updated_replicas == after.status.available_replicas == 2
        assert rollout_finished("missing-predictor", ns.name, api_client=sa) is False

        # a stale resourceVersion is refused: two writers cannot interleave
        with pytest.raises(ApiException) as exc:
            roll("lsbert", ns.name, "p3=ft-0005", api_client=sa, resource_version=before.metadata.resource_version)
        assert exc.value.status == 409

        # the ServiceAccount may patch the InferenceService but not rewrite Deployments
        with pytest.raises(ApiException) as exc:
            client.AppsV1Api(sa).patch_namespaced_deployment("lsbert-predictor", ns.name, {"spec": {"replicas": 5}})
        assert exc.value.status == 403


def test_progress_deadline_exceeded_is_a_failure(kserve_ns):
    ns, _co, apps = kserve_ns
    # five GPUs per pod fit on no node: the rollout cannot progress and hits its deadline
    apps.create_namespaced_deployment(ns.name, predictor_deployment("stuck-predictor", replicas=1, gpus=5, deadline=1))
    with ns.sa_client() as sa:

        def failed():
            try:
                rollout_finished("stuck-predictor", ns.name, api_client=sa)
            except RolloutFailed as exc:
                return str(exc)
            return None

        message = wait_until(failed, TIMEOUT, "ProgressDeadlineExceeded", 0.3)
    assert "ProgressDeadlineExceeded" in message
    with pytest.raises(RolloutFailed):
        kserve.wait_for_rollout("stuck-predictor", ns.name, api_client=ns.admin(), timeout=5, interval=0.1)


def test_status_written_through_the_status_subresource_is_judged(kserve_ns):
    """Deployment status written through the status subresource, as a controller would. The Deployment is
    paused so the real controller leaves its Progressing condition alone (it may still rewrite the replica
    counts, to the same values: one kwok pod is up), and each check re-writes the status it expects."""
    ns, _co, apps = kserve_ns
    name = "paused-predictor"
    apps.create_namespaced_deployment(ns.name, predictor_deployment(name, replicas=1, annotation="p1=ft-0001"))
    apps.patch_namespaced_deployment(name, ns.name, {"spec": {"paused": True}})

    def write_status(reason: str, message: str) -> None:
        dep = apps.read_namespaced_deployment(name, ns.name)
        apps.patch_namespaced_deployment_status(
            name,
            ns.name,
            {
                "status": {
                    "observedGeneration": dep.metadata.generation,
                    "replicas": 1,
                    "updatedReplicas": 1,
                    "availableReplicas": 1,
                    "readyReplicas": 1,
                    "conditions": [
                        {
                            "type": "Progressing",
                            "reason": reason,
                            "message": message,
                            "status": "False" if reason == "ProgressDeadlineExceeded" else "True",
                        }
                    ],
                }
            },
        )

    with ns.sa_client() as sa:

        def judged_failed():
            write_status("ProgressDeadlineExceeded", f'ReplicaSet "{name}-x" has timed out progressing.')
            try:
                rollout_finished(name, ns.name, api_client=sa)
            except RolloutFailed as exc:
                return str(exc)
            return None

        assert "timed out progressing" in wait_until(judged_failed, TIMEOUT, "the failure to be read", 0.2)

        def judged_finished():
            write_status("NewReplicaSetAvailable", f'ReplicaSet "{name}-x" has successfully progressed.')
            return rollout_finished(name, ns.name, api_client=sa, checkpoint_id="p1=ft-0001")

        wait_until(judged_finished, TIMEOUT, "the finished rollout to be read", 0.2)
        assert rollout_finished(name, ns.name, api_client=sa, checkpoint_id="p1=ft-0002") is False


def test_restart_rollout_patches_once_per_change_and_follows_the_rollout(kserve_ns, tmp_path):
    from lsbert.store.local import LocalStore

    ns, co, apps = kserve_ns
    store = LocalStore(tmp_path / "store")

    def promote(project: int) -> str:
        version = store.next_version(project, "ft")
        src = tmp_path / f"ckpt-{project}-{version}"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"project": project}))
        store.save(project, version, src, {"metrics": {"accuracy": 0.9}})
        store.promote(project, version)
        return version

    async def scenario(sa):
        rollout = RestartRollout(sa, ns.name, "lsbert", store, poll_seconds=0.2, timeout=TIMEOUT)
        assert await rollout.on_run_finished(3, None) is None  # nothing promoted yet: no patch
        promote(3), promote(5)
        assert await rollout.on_run_finished(5, None) == "p3=ft-0001,p5=ft-0001"
        play_kserve(apps, co, ns.name, "lsbert")
        assert await asyncio.wait_for(rollout.wait(), TIMEOUT) == "finished"
        assert await rollout.on_run_finished(5, None) is None  # unchanged: no second rollout
        promote(3)
        assert await rollout.on_run_finished(3, None) == "p3=ft-0002,p5=ft-0001"
        play_kserve(apps, co, ns.name, "lsbert")
        assert await asyncio.wait_for(rollout.wait(), TIMEOUT) == "finished"
        rollout.close()

    with ns.sa_client() as sa:
        asyncio.run(scenario(sa))
    got = co.get_namespaced_custom_object("serving.kserve.io", "v1beta1", ns.name, "inferenceservices", "lsbert")
    assert got["spec"]["predictor"]["annotations"][ANNOTATION] == "p3=ft-0002,p5=ft-0001"


def test_scheduler_with_restart_rollout_as_on_finished(kserve_ns, tmp_path):
    """The restart strategy wired as the lead will: START_TRAINING -> Job -> the trainer promotes (played
    here: kwok runs no container) -> Job succeeds -> on_finished patches the InferenceService."""
    from lsbert.launcher.kubernetes import KubernetesLauncher
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.store.local import LocalStore
    from tests.k8s.cluster import ANNOTATION_DURATION

    ns, co, _apps = kserve_ns
    store = LocalStore(tmp_path / "store")

    async def scenario(sa):
        values = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "3s"}}
        launcher = KubernetesLauncher(sa, ns.name, values=values)
        rollout = RestartRollout(sa, ns.name, "lsbert", store, follow=False)
        scheduler = TrainingScheduler(
            launcher, store, every_n_updates=0, version_name="ft", poll_seconds=0.2, on_finished=rollout.on_run_finished
        )
        await scheduler.handle_event("START_TRAINING", 4, {"project": {"id": 4}})
        await until(lambda: scheduler.status().get("4", {}).get("active"))
        version = scheduler.status()["4"]["active"]["version"]
        src = tmp_path / "ckpt"
        src.mkdir()
        (src / "config.json").write_text("{}")
        store.save(4, version, src, {})
        store.promote(4, version)  # what `lsbert train` does at the very end of a good run
        assert current() is None  # nothing rolls before the run is over
        await until(lambda: (scheduler.status()["4"]["last"] or {}).get("phase") == "succeeded", TIMEOUT)
        await until(lambda: current() == "p4=ft-0001", 10)
        await scheduler.close()

    def current():
        got = co.get_namespaced_custom_object("serving.kserve.io", "v1beta1", ns.name, "inferenceservices", "lsbert")
        return (got["spec"]["predictor"].get("annotations") or {}).get(ANNOTATION)

    with ns.sa_client() as sa:
        asyncio.run(scenario(sa))
