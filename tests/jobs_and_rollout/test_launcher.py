"""KubernetesLauncher on the real control plane (tests/k8s): real API server with RBAC and admission, the real
Job controller and scheduler, kwok playing the kubelet. The launcher always acts as a ServiceAccount bound to
exactly the Role jobs/README.md documents (tests/jobs_and_rollout/conftest.py)."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lsbert.launcher.base import RunPhase
from lsbert.launcher.kubernetes import KubernetesLauncher, KubernetesLaunchError
from lsbert.status import print_jobs
from tests.k8s.cluster import (
    ANNOTATION_DURATION,
    ANNOTATION_EXIT_CODE,
    ANNOTATION_MESSAGE,
    CPU_NODE,
    GPU_NODE,
    LABEL_FAIL,
)
from tests.support.polling import until, wait_until

pytestmark = pytest.mark.k8s

TIMEOUT = 60.0
IMAGE = "registry.invalid/lsbert/trainer:test"  # kwok never pulls or runs it
GPU_VALUES = {
    "image": IMAGE,
    "resources": {"requests": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": 1}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "env": [
        {"name": "LABEL_STUDIO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "ls", "key": "token"}}},
        {"name": "MODEL_DIR", "value": "/models"},
    ],
    "volumes": [{"name": "models", "emptyDir": {}}],
    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
}


def selector(project=None) -> str:
    s = "app.kubernetes.io/name=lsbert,app.kubernetes.io/component=trainer,app.kubernetes.io/instance=lsbert"
    return s + (f",lsbert.io/project={project}" if project is not None else "")


def jobs(ns, project=None, *, live_only=True) -> list:
    with ns.admin() as api:
        items = client.BatchV1Api(api).list_namespaced_job(ns.name, label_selector=selector(project)).items
    return [j for j in items if not (live_only and j.metadata.deletion_timestamp)]


def pods_of(ns, job_name) -> list:
    with ns.admin() as api:
        core = client.CoreV1Api(api)
        return core.list_namespaced_pod(ns.name, label_selector=f"batch.kubernetes.io/job-name={job_name}").items


def poll_until_finished(launcher, run, timeout=TIMEOUT):
    return wait_until(lambda: launcher.poll(run).phase.finished and run, timeout, f"run {run.run_id} to finish", 0.2)


def test_gpu_job_runs_on_the_gpu_node_and_succeeds(launcher_ns):
    sa = launcher_ns.sa_client()
    launcher = KubernetesLauncher(sa, launcher_ns.name, values=GPU_VALUES, release="lsbert")
    launcher.dry_run(3, "ft-0001")  # admission + strict field validation on the server, nothing created
    assert jobs(launcher_ns) == []

    run = launcher.launch(3, "ft-0001", ["--epochs", "1"])
    assert run.run_id == "lsbert-train-p3-0001" and run.project == 3 and run.version == "ft-0001"
    assert run.log == f"kubectl logs -f job/lsbert-train-p3-0001 -n {launcher_ns.name}"
    assert not run.phase.finished
    poll_until_finished(launcher, run)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    assert run.finished_at and run.started_at and run.finished_at >= run.started_at

    (job,) = jobs(launcher_ns, 3)
    assert job.metadata.labels["lsbert.io/version"] == "ft-0001"
    assert job.spec.backoff_limit == 2 and job.spec.ttl_seconds_after_finished == 86400
    (pod,) = pods_of(launcher_ns, run.run_id)
    assert pod.spec.node_name == GPU_NODE
    (container,) = pod.spec.containers
    assert container.args == ["--project", "3", "--version", "ft-0001", "--epochs", "1"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.security_context.run_as_non_root is True

    out = io.StringIO()
    assert print_jobs(launcher_ns.name, api_client=sa, out=out) == 0
    line = next(line for line in out.getvalue().splitlines() if "lsbert-train-p3-0001" in line)
    assert line.split()[1:4] == ["3", "ft-0001", "succeeded"]
    launcher.close()
    sa.close()


def test_cpu_job_without_gpu_lands_on_the_cpu_node(launcher_ns):
    with launcher_ns.sa_client() as sa:
        launcher = KubernetesLauncher(sa, launcher_ns.name, values={"image": IMAGE}, release="lsbert")
        run = launcher.launch(1, "ft-0001", [])
        poll_until_finished(launcher, run)
        assert run.phase is RunPhase.SUCCEEDED
        assert pods_of(launcher_ns, run.run_id)[0].spec.node_name == CPU_NODE


def test_failed_job_reports_reason_exit_code_and_last_log_line(launcher_ns, control_plane):
    values = {
        "image": IMAGE,
        "backoffLimit": 0,
        "podLabels": {LABEL_FAIL: "true"},
        "podAnnotations": {ANNOTATION_DURATION: "3s", ANNOTATION_EXIT_CODE: "3", ANNOTATION_MESSAGE: "termination"},
    }
    with launcher_ns.sa_client() as sa:
        launcher = KubernetesLauncher(sa, launcher_ns.name, values=values, release="lsbert")
        run = launcher.launch(7, "ft-0002", [])
        pod = wait_until(lambda: (pods_of(launcher_ns, run.run_id) or [None])[0], TIMEOUT, "the trainer pod")
        text = "epoch 1/3\nloading tasks\nTrainingError: no labelled tasks in project 7\n"
        control_plane.set_pod_log(launcher_ns.name, pod.metadata.name, text)
        with launcher_ns.admin() as api:
            core = client.CoreV1Api(api)
            wait_until(
                lambda: core.read_namespaced_pod_log(pod.metadata.name, launcher_ns.name) == text,
                15,
                "kwok to serve the pod log",
                0.2,
            )
        poll_until_finished(launcher, run)
    assert run.phase is RunPhase.FAILED
    # The template's podFailurePolicy fails the Job at the trainer's first non-zero exit (no retries).
    assert run.message.startswith("PodFailurePolicy: ")
    assert "exit code 3" in run.message
    assert run.message.endswith("TrainingError: no labelled tasks in project 7")
    assert run.finished_at is not None


def test_forbidden_requests_are_refused_and_surface_clearly(launcher_ns):
    with launcher_ns.sa_client() as sa:
        apps, core = client.AppsV1Api(sa), client.CoreV1Api(sa)
        deployment = client.V1Deployment.from_dict(
            {
                "metadata": {"name": "sneaky"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "metadata": {"labels": {"a": "b"}},
                        "spec": {"containers": [{"name": "c", "image": IMAGE}]},
                    },
                },
            }
        )
        with pytest.raises(ApiException) as exc:
            apps.create_namespaced_deployment(launcher_ns.name, deployment)
        assert exc.value.status == 403
        with pytest.raises(ApiException) as exc:
            core.list_namespaced_secret(launcher_ns.name)
        assert exc.value.status == 403
        with pytest.raises(ApiException) as exc:
            core.read_namespaced_secret("anything", launcher_ns.name)
        assert exc.value.status == 403

        # The same ServiceAccount has no grant in another namespace: the launcher says so.
        launcher = KubernetesLauncher(sa, "default", values={"image": IMAGE}, release="lsbert")
        with pytest.raises(KubernetesLaunchError) as err:
            launcher.launch(1, "ft-0001", [])
        assert err.value.status == 403
        assert "forbidden" in str(err.value).lower() and "ServiceAccount" in str(err.value)
        with pytest.raises(KubernetesLaunchError):
            launcher.active_run(1)
        out = io.StringIO()
        assert print_jobs("default", api_client=sa, out=out) == 1
    assert jobs(launcher_ns) == []


def test_duplicate_and_restarted_launchers_adopt_the_active_job(launcher_ns):
    slow = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "30s"}}
    with launcher_ns.sa_client() as sa1, launcher_ns.sa_client() as sa2:
        first = KubernetesLauncher(sa1, launcher_ns.name, values=slow, release="lsbert")
        run = first.launch(5, "ft-0001", [])
        assert first.launch(5, "ft-0001", []).run_id == run.run_id  # the same run again
        # a "restarted predictor": a new launcher instance that knows nothing
        second = KubernetesLauncher(sa2, launcher_ns.name, values=slow, release="lsbert")
        adopted = second.active_run(5)
        assert adopted is not None and adopted.run_id == run.run_id and adopted.version == "ft-0001"
        assert not adopted.phase.finished
        # ... which is asked for a new version while the old run still trains: it adopts, never a 2nd Job
        again = second.launch(5, "ft-0002", [])
        assert (again.run_id, again.version) == (run.run_id, "ft-0001")
        assert second.active_run(6) is None
        assert len(jobs(launcher_ns, 5)) == 1
        wait_until(lambda: second.poll(adopted).phase is RunPhase.RUNNING, TIMEOUT, "the adopted run to run", 0.2)


def test_relaunch_of_a_finished_run_gets_409_and_adopts(launcher_ns):
    with launcher_ns.sa_client() as sa:
        launcher = KubernetesLauncher(sa, launcher_ns.name, values={"image": IMAGE}, release="lsbert")
        run = launcher.launch(6, "ft-0001", [])
        poll_until_finished(launcher, run)
        assert launcher.active_run(6) is None
        fresh = KubernetesLauncher(sa, launcher_ns.name, values={"image": IMAGE}, release="lsbert")
        again = fresh.launch(6, "ft-0001", [])
        assert again.run_id == run.run_id and again.phase is RunPhase.SUCCEEDED  # 409 -> adopted
        with pytest.raises(KubernetesLaunchError, match="already exists") as err:
            launcher.launch(6, "other-0001", [])  # same name, another version: refused, not adopted
        assert err.value.status == 409
    assert len(jobs(launcher_ns, 6)) == 1


def test_racing_replicas_end_with_one_active_job(launcher_ns):
    """Three replicas launch runs of one project at the same moment (each with its own reserved version):
    after their next poll all three follow the same Job and it is the only one left."""
    slow = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "30s"}}
    clients = [launcher_ns.sa_client() for _ in range(3)]
    launchers = [KubernetesLauncher(c, launcher_ns.name, values=slow, release="lsbert") for c in clients]
    for project in (20, 21, 22, 23):
        barrier = threading.Barrier(len(launchers))
        runs: list = [None] * len(launchers)

        def go(i, project=project, barrier=barrier, runs=runs):
            barrier.wait()
            runs[i] = launchers[i].launch(project, f"ft-{i + 1:04d}", [])

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(launchers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(runs)
        for launcher, run in zip(launchers, runs):
            launcher.poll(run)  # a replica that raced unseen resolves it here
        assert len({r.run_id for r in runs}) == 1, [r.run_id for r in runs]
        assert not any(r.phase.finished for r in runs)
        assert [j.metadata.name for j in jobs(launcher_ns, project)] == [runs[0].run_id]
    for c in clients:
        c.close()


def test_scheduler_start_training_job_success_on_finished_cycle(launcher_ns, tmp_path):
    """START_TRAINING -> Job -> (the trainer's promotion) -> success -> on_finished, with the real
    TrainingScheduler; a press during the run gives exactly one follow-up Job; a restarted scheduler
    adopts the running Job."""
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    finished: list = []

    async def on_finished(project, run):
        finished.append((project, run.version, run.phase))

    values = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "2s"}}

    async def scenario(sa):
        launcher = KubernetesLauncher(sa, launcher_ns.name, values=values, release="lsbert")
        scheduler = TrainingScheduler(
            launcher, store, every_n_updates=0, version_name="ft", poll_seconds=0.2, on_finished=on_finished
        )
        answer = await scheduler.handle_event("START_TRAINING", 4, {"project": {"id": 4}})
        assert answer["status"] in ("started", "accepted"), answer
        await until(lambda: scheduler.status().get("4", {}).get("active"))
        assert scheduler.status()["4"]["active"]["job"] == "lsbert-train-p4-0001"
        press = await scheduler.handle_event("START_TRAINING", 4, {"project": {"id": 4}})
        assert press == {"status": "queued", "project": 4, "job": "lsbert-train-p4-0001"}
        await until(lambda: len(finished) == 2, 60)
        assert finished == [(4, "ft-0001", RunPhase.SUCCEEDED), (4, "ft-0002", RunPhase.SUCCEEDED)]
        await asyncio.sleep(0.5)
        assert scheduler.status()["4"]["runs_started"] == 2
        await scheduler.close()

        # a restarted predictor: a new scheduler + launcher adopt a Job that is running now
        slow_values = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "4s"}}
        slow = KubernetesLauncher(sa, launcher_ns.name, values=slow_values, release="lsbert")
        run = slow.launch(9, store.next_version(9, "ft"), [])  # another replica's run of project 9
        restarted = TrainingScheduler(
            KubernetesLauncher(sa, launcher_ns.name, values=values, release="lsbert"),
            store,
            every_n_updates=0,
            version_name="ft",
            poll_seconds=0.2,
            on_finished=on_finished,
        )
        answer = await restarted.handle_event("START_TRAINING", 9, {"project": {"id": 9}})
        assert answer == {"status": "queued", "project": 9, "job": run.run_id}
        await until(lambda: len(finished) == 4, 60)  # the adopted run, then the one follow-up
        assert finished[2:] == [(9, "ft-0001", RunPhase.SUCCEEDED), (9, "ft-0002", RunPhase.SUCCEEDED)]
        await restarted.close()

    with launcher_ns.sa_client() as sa:
        asyncio.run(scenario(sa))
    names = sorted(j.metadata.name for j in jobs(launcher_ns))
    assert names == ["lsbert-train-p4-0001", "lsbert-train-p4-0002", "lsbert-train-p9-0001", "lsbert-train-p9-0002"]


def test_job_body_round_trips_through_the_api_server(launcher_ns):
    """The server keeps every field the launcher sends (strict field validation rejects unknown ones)."""
    with launcher_ns.sa_client() as sa:
        launcher = KubernetesLauncher(sa, launcher_ns.name, values=GPU_VALUES, release="lsbert")
        sent = launcher.render(2, "ft-0003", ["--seed", "1"])
        got = sa.sanitize_for_serialization(launcher.dry_run(2, "ft-0003", ["--seed", "1"]))
    assert got["metadata"]["labels"] == sent["metadata"]["labels"]
    pod_sent, pod_got = sent["spec"]["template"]["spec"], got["spec"]["template"]["spec"]
    env_got = {e["name"]: e for e in pod_got["containers"][0]["env"]}
    assert list(env_got) == [e["name"] for e in pod_sent["containers"][0]["env"]]
    assert env_got["LABEL_STUDIO_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "ls", "key": "token"}}
    assert pod_got["containers"][0]["args"] == pod_sent["containers"][0]["args"]
    assert pod_got["tolerations"] == pod_sent["tolerations"]
    assert pod_got["securityContext"] == pod_sent["securityContext"]
    assert pod_got["containers"][0]["resources"] == pod_sent["containers"][0]["resources"]
    assert pod_got["volumes"][0]["name"] == "models"


def test_from_environment_with_kubeconfig_and_lsbert_status(launcher_ns, tmp_path, monkeypatch):
    """make_launcher(settings) outside a cluster: KUBECONFIG (a ServiceAccount token), namespace from its
    context; then `lsbert status --kubernetes` lists the Job."""
    import subprocess
    import sys

    import yaml

    from lsbert.serve import make_launcher
    from lsbert.settings import load_settings

    kubeconfig = launcher_ns.cp.service_account_kubeconfig(launcher_ns.name, launcher_ns.service_account)
    values = tmp_path / "job-values.yaml"
    values.write_text(yaml.safe_dump({"image": IMAGE, "backoffLimit": 0, "ttlSecondsAfterFinished": 300}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    settings = load_settings(training_launcher="kubernetes", job_values=str(values), release_name="demo")
    launcher = make_launcher(settings)
    assert launcher.namespace == launcher_ns.name and launcher.release == "demo"
    run = launcher.launch(11, "ft-0001", [])
    assert run.run_id == "demo-train-p11-0001"
    assert [r.run_id for r in launcher.active_runs()] == [run.run_id]
    poll_until_finished(launcher, run)
    assert run.phase is RunPhase.SUCCEEDED
    launcher.close()

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("POD_NAMESPACE", "KUBERNETES_SERVICE_HOST")}
    env["KUBECONFIG"] = str(kubeconfig)
    res = subprocess.run(
        [sys.executable, "-m", "lsbert", "status", "--kubernetes", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 1, res.stderr  # the predictor is not running; the Jobs are listed all the same
    line = next(line for line in res.stdout.splitlines() if "demo-train-p11-0001" in line)
    assert line.split()[1:4] == ["11", "ft-0001", "succeeded"], res.stdout


def test_two_replicas_start_one_job_per_annotation_count(launcher_ns, tmp_path):
    """Two predictor replicas (a scheduler and a launcher each, one store, one namespace) get Label Studio's
    captured ANNOTATION_CREATED events: the one that sees the count reach a multiple of N creates the Job,
    which carries that count; the other replica, given the same count, adopts the Job and asks for nothing."""
    from lsbert.launcher.jobspec import ANNOTATION_TRIGGER
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.store.local import LocalStore
    from tests.launcher.test_replicas import PROJECT, event, send

    slow = {"image": IMAGE, "podAnnotations": {ANNOTATION_DURATION: "30s"}}

    async def scenario():
        with launcher_ns.sa_client() as sa1, launcher_ns.sa_client() as sa2:
            store = LocalStore(tmp_path / "store")
            a, b = (
                TrainingScheduler(
                    KubernetesLauncher(sa, launcher_ns.name, values=slow, release="lsbert"),
                    store,
                    every_n_updates=4,
                    version_name="ft",
                    poll_seconds=0.2,
                )
                for sa in (sa1, sa2)
            )
            answers = [await send((a, b)[total % 2], event("ANNOTATION_CREATED", total)) for total in range(1, 5)]
            assert [x["status"] for x in answers[:3]] == ["ok"] * 3
            assert answers[3]["status"] in ("started", "accepted")  # the API call may outlast the 0.5 s budget
            await until(lambda: a.status()[str(PROJECT)]["active"] is not None, TIMEOUT)
            (job,) = jobs(launcher_ns, PROJECT)
            assert job.metadata.annotations[ANNOTATION_TRIGGER] == "annotations=4"
            duplicate = await send(b, event("ANNOTATION_CREATED", 4))
            assert duplicate == {"status": "queued", "project": PROJECT, "job": job.metadata.name}
            assert not b.status()[str(PROJECT)]["follow_up_pending"]
            assert [j.metadata.name for j in jobs(launcher_ns, PROJECT)] == [job.metadata.name]
            await a.close()
            await b.close()

    asyncio.run(scenario())
