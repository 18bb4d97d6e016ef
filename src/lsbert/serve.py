"""``lsbert serve``: wires the predictor process together and runs it.

One KServe model server whose FastAPI app also carries the Label Studio routes, the training scheduler
(with its launcher) and the rollout watcher. The server answers at once; the model becomes ready
(``/v1/models/<name>``) once the baseline is loaded and warmed up.

KServe's own entry points are used as far as they allow: ``ModelServer`` builds the data plane and the
model repository, ``register_model`` registers the model, ``setup_event_loop`` sizes the executor, and
``RESTServer`` (what ``ModelServer.start`` runs) creates the application with KServe's routes, middlewares
and error handlers. ``ModelServer.start`` itself cannot be used: it requires a model that is ready before
the server starts (lsbert loads it in the background, so probes get 503 rather than no answer) and always
binds 0.0.0.0 (the quickstart listens on loopback only).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lsbert import logs
from lsbert.gpu import CudaUnavailable, check_cuda
from lsbert.launcher.base import Launcher
from lsbert.settings import LauncherKind, RolloutStrategy, Settings, SettingsError, get_settings

if TYPE_CHECKING:  # imported when the server is built: kserve reads its settings from the environment at import
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.predictor.kserve_model import LsbertModel
    from lsbert.predictor.routes import LabelStudioEndpoints
    from lsbert.predictor.service import PredictorService
    from lsbert.rollout.kserve import RestartRollout
    from lsbert.rollout.watcher import RolloutWatcher

log = logging.getLogger("lsbert")


def make_launcher(settings: Settings) -> Optional[Launcher]:
    if settings.training_launcher is LauncherKind.NONE:
        return None
    if settings.training_launcher is LauncherKind.KUBERNETES:
        from lsbert.launcher.kubernetes import KubernetesLauncher

        return KubernetesLauncher.from_environment(settings)
    from lsbert.launcher.local import LocalLauncher

    return LocalLauncher(Path(settings.cache_dir) / "runs")


def _secrets(settings: Settings) -> list[str]:
    values = [settings.basic_auth_pass, settings.label_studio_api_key, settings.hf_token]
    secrets = [v.get_secret_value() for v in values if v is not None]
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        if os.environ.get(name):
            secrets.append(os.environ[name])
    return secrets


@dataclass
class Predictor:
    """The parts of one predictor process, built from the settings, before any server runs."""

    model: LsbertModel
    endpoints: LabelStudioEndpoints
    scheduler: Optional[TrainingScheduler]
    watcher: RolloutWatcher
    service: PredictorService
    restart: Optional[RestartRollout]


def build(settings: Settings) -> Predictor:
    """Everything but the HTTP server."""
    from lsbert.launcher.scheduler import TrainingScheduler
    from lsbert.model.runtime import select_runtime
    from lsbert.predictor.kserve_model import LsbertModel
    from lsbert.predictor.registry import ModelRegistry
    from lsbert.predictor.routes import LabelStudioEndpoints
    from lsbert.predictor.service import PredictorService
    from lsbert.rollout.kserve import RestartRollout
    from lsbert.rollout.watcher import RolloutWatcher
    from lsbert.store import open_store

    try:
        check_cuda(settings.require_cuda, "lsbert serve")
    except CudaUnavailable as exc:  # stops the process with the message, like any configuration error
        raise SettingsError(str(exc)) from None
    store = open_store(settings.model_dir, settings.cache_dir)
    runtime = select_runtime(settings.precision, settings.torch_threads, torch_compile=settings.torch_compile)
    registry = ModelRegistry(
        store,
        runtime,
        settings.baseline_model_name,
        max_loaded=settings.max_loaded_models,
        max_length=settings.max_length,
        batch_size=settings.predict_batch_size,
        hf_token=settings.hf_token.get_secret_value() if settings.hf_token else None,
    )
    api_key = settings.label_studio_api_key
    service = PredictorService(
        registry,
        threshold=settings.multi_label_threshold,
        label_studio_url=settings.label_studio_url,
        label_studio_api_key=api_key.get_secret_value() if api_key else None,
        cache_dir=Path(settings.cache_dir),
        url_allowed_hosts=[h.strip() for h in settings.text_url_allowed_hosts.split(",") if h.strip()],
    )
    if settings.head_enabled:
        service.attach_heads(_head_keeper(settings, service, store))
    watcher = RolloutWatcher(registry, store, settings.rollout_poll_seconds)
    launcher = make_launcher(settings)
    restart = None
    if settings.rollout_strategy is RolloutStrategy.RESTART:
        restart = RestartRollout.from_environment(settings, store, api_client=getattr(launcher, "api_client", None))
    scheduler = None
    if launcher is not None:
        scheduler = TrainingScheduler(
            launcher,
            store,
            every_n_updates=settings.start_training_each_n_updates,
            version_name=settings.finetuned_model_name,
            on_finished=restart.on_run_finished if restart is not None else watcher.notify,
            max_concurrent=settings.max_concurrent_training_runs,
            refuse=_training_refusal(settings),
        )
    endpoints = LabelStudioEndpoints(service, scheduler, store, load_wait_seconds=settings.model_load_wait_seconds)
    model = LsbertModel(settings.model_name, service)
    return Predictor(model, endpoints, scheduler, watcher, service, restart)


def _head_keeper(settings: Settings, service: PredictorService, store: Any) -> Any:
    from lsbert.predictor.heads import HeadKeeper

    url, key = settings.label_studio_url, settings.label_studio_api_key
    source = None
    if url and key:

        def source() -> Any:
            from lsbert.labelstudio.source import LabelStudioSource

            return LabelStudioSource(url, key.get_secret_value())

    return HeadKeeper(
        service,
        store,
        baseline=settings.baseline_model_name,
        min_labels=settings.head_min_labels,
        max_examples=settings.head_max_examples,
        max_total_examples=settings.head_max_total_examples,
        poll_seconds=settings.rollout_poll_seconds,
        source=source,
    )


def _training_refusal(settings: Settings) -> Optional[str]:
    """Why no training run could succeed with these settings (the trainer reads the annotations from
    Label Studio), or None."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        return (
            "training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the trainer reads the annotations from "
            "Label Studio"
        )
    return None


async def _load_and_start(
    predictor: Predictor, settings: Settings, host: str, port: int, background: list[asyncio.Task[Any]]
) -> None:
    """Load the baseline off the event loop, then start rolling out and adopting training runs."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, predictor.model.load)
    except Exception as exc:
        log.critical("cannot load the baseline model %s: %s", settings.baseline_model_name, exc)
        os._exit(3)
    # The hub is reachable at start (BASELINE_MODEL_NAME may be an id); never at request time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    log.info("ready: http://%s:%d (model %s)", host, port, settings.model_name)
    # With ROLLOUT_STRATEGY=restart, pods load the promoted versions at start and KServe rolls them;
    # the watcher still runs, so a replica never serves older than the pointers it can read.
    predictor.watcher.start()
    if predictor.service.heads is not None:
        predictor.service.heads.start()
    if predictor.restart is not None:
        background.append(loop.create_task(predictor.restart.run_forever(settings.rollout_poll_seconds)))
    if predictor.scheduler is not None:
        await predictor.scheduler.adopt_active_runs()


def serve(host: str = "127.0.0.1", port: int = 9090, settings: Optional[Settings] = None) -> int:
    settings = settings or get_settings()
    os.environ.setdefault("KSERVE_LOGLEVEL", settings.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import kserve  # noqa: F401  (parses argv at import; our flags are unknown to it and ignored)
    from kserve import ModelServer
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer
    from transformers.utils import logging as hf_logging

    from lsbert.predictor.auth import BasicAuth
    from lsbert.predictor.errors import install_kserve_error_handlers
    from lsbert.predictor.guard import Guard
    from lsbert.predictor.routes import register_label_studio_routes

    _quiet_deprecations()
    hf_logging.disable_progress_bar()
    predictor = build(settings)
    password = settings.basic_auth_pass.get_secret_value() if settings.basic_auth_pass else None
    auth = BasicAuth(settings.basic_auth_user, password)
    open_paths = ("/metrics",) if settings.metrics_without_auth else ()
    max_bytes = settings.max_request_bytes
    register_label_studio_routes(app, predictor.endpoints, auth)

    class Server(RESTServer):
        """KServe's REST server with lsbert's guard outermost and one-line logs for client errors."""

        def _add_middlewares(self, app: Any) -> None:
            super()._add_middlewares(app)
            app.add_middleware(Guard, auth=auth, max_bytes=max_bytes, open_paths=open_paths)

        def _add_exception_handlers(self, app: Any) -> None:
            super()._add_exception_handlers(app)
            install_kserve_error_handlers(app)

    server = ModelServer(
        http_port=port, enable_grpc=False, workers=1, max_asyncio_workers=settings.threads, enable_docs_url=False
    )
    logs.configure(settings.log_level, _secrets(settings))
    server.register_model(predictor.model)
    rest = Server(
        "kserve.model_server:app",
        server.dataplane,
        server.model_repository_extension,
        port,
        workers=1,
        grace_period=server.grace_period,
        timeout_keep_alive=server.timeout_keep_alive,
    )
    rest.config.host = host  # RESTServer always binds 0.0.0.0

    async def main() -> None:
        server.setup_event_loop()
        background: list[asyncio.Task[Any]] = []
        loader = asyncio.get_running_loop().create_task(_load_and_start(predictor, settings, host, port, background))
        try:
            await rest.start()
        finally:
            loader.cancel()
            for task in background:
                task.cancel()
            predictor.watcher.stop()
            if predictor.scheduler is not None:
                await predictor.scheduler.close()
            predictor.service.close()

    log.info(
        "lsbert %s starting on %s:%d; baseline %s; checkpoints in %s",
        _version(),
        host,
        port,
        settings.baseline_model_name,
        settings.model_dir,
    )
    asyncio.run(main())
    return 0


def _quiet_deprecations() -> None:
    """KServe answers with FastAPI's ORJSONResponse, which FastAPI deprecates: nothing an operator can act on."""
    import warnings

    warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lsbert")
    except PackageNotFoundError:
        return "dev"
