"""One typed settings object, read once from the environment.

The names are those of HumanSignal's upstream ``bert_classifier`` example, so that its users feel at home;
lsbert's own additions are listed in the README. Invalid values stop the process at start with a message
naming the variable.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from typing import Optional

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class RolloutStrategy(str, Enum):
    HOT = "hot"  # the predictor swaps models in-process
    RESTART = "restart"  # the InferenceService is patched and KServe rolls the predictor pods


class LauncherKind(str, Enum):
    LOCAL = "local"
    KUBERNETES = "kubernetes"
    NONE = "none"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", populate_by_name=True)

    # --- upstream names -------------------------------------------------------------------------
    baseline_model_name: str = Field(
        "bert-base-multilingual-cased",
        description="Model id on the Hugging Face hub or a local directory; the starting point of every fine-tune.",
    )
    label_studio_url: Optional[str] = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST")
    )
    label_studio_api_key: Optional[SecretStr] = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN")
    )
    start_training_each_n_updates: int = Field(10, ge=0)
    max_concurrent_training_runs: int = Field(
        2, ge=0, description="Training runs at once across all projects (the rest wait in turn); 0 = no limit."
    )
    # 5e-5 (the top of the BERT paper's range) rather than upstream's 2e-5: with a few hundred annotations
    # 2e-5 left MiniLM at chance after 3 epochs (bench/loop.py), 5e-5 reached 0.76 held-out accuracy.
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    num_train_epochs: float = Field(3, gt=0, le=1000)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    finetuned_model_name: str = Field("finetuned_model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    basic_auth_user: Optional[str] = None
    basic_auth_pass: Optional[SecretStr] = None
    log_level: str = "INFO"
    workers: int = Field(1, ge=1)
    threads: int = Field(8, ge=1, le=256)
    hf_token: Optional[SecretStr] = None
    model_dir: str = Field(
        "models", description="Checkpoint store: a directory (e.g. a mounted PVC) or s3://bucket/prefix."
    )

    # --- lsbert additions -----------------------------------------------------------------------
    model_name: str = Field("lsbert", description="KServe model name (V1/V2 routes, readiness probe).")
    precision: Precision = Precision.AUTO
    max_length: int = Field(0, ge=0, description="Truncation length for inference; 0 = the model's maximum.")
    predict_batch_size: int = Field(64, ge=1, le=4096)
    multi_label_threshold: float = Field(0.5, gt=0, lt=1)
    max_loaded_models: int = Field(4, ge=1)
    text_url_allowed_hosts: str = Field(
        "", description="Comma-separated hosts besides Label Studio's that <Text valueType=url> links may point to."
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body accepted; a larger one gets 413 unread."
    )
    metrics_without_auth: bool = Field(
        False, description="Serve /metrics without basic auth (for a Prometheus that scrapes without credentials)."
    )
    model_load_wait_seconds: float = Field(
        60.0, ge=0, le=90, description="How long /predict waits for the baseline model still loading before 503."
    )
    torch_threads: int = Field(0, ge=0, description="Intra-op threads for torch; 0 = all available cores.")
    torch_compile: bool = Field(False, description="torch.compile served models on CUDA (slower model loads).")
    train_batch_size: int = Field(16, ge=1, le=4096)
    train_max_length: int = Field(256, ge=8, le=8192)
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 42
    promotion_margin: float = Field(0.0, ge=0, le=1)
    keep_versions: int = Field(5, ge=1)
    training_launcher: LauncherKind = LauncherKind.LOCAL
    rollout_poll_seconds: float = Field(30.0, gt=0)
    cache_dir: str = Field(".lsbert-cache", description="Where remote checkpoints are downloaded for serving.")
    head_enabled: bool = Field(
        True, description="Fit a light head on the baseline's embeddings from each project's annotations and serve it."
    )
    head_min_labels: int = Field(
        10, ge=2, le=100_000, description="Labelled examples before a project's embedding head is first assessed."
    )
    head_max_examples: int = Field(
        2000, ge=10, le=1_000_000, description="Labelled examples kept per project for its head (the newest)."
    )
    head_max_total_examples: int = Field(
        50_000, ge=10, le=10_000_000, description="Labelled examples kept for heads across all projects (the newest)."
    )

    # --- Kubernetes (set by the Helm chart) -----------------------------------------------------------
    rollout_strategy: RolloutStrategy = RolloutStrategy.HOT
    pod_namespace: Optional[str] = Field(None, description="Namespace for training Jobs (downward API).")
    isvc_name: Optional[str] = Field(None, description="The InferenceService to patch with ROLLOUT_STRATEGY=restart.")
    job_template: Optional[str] = Field(
        None, description="A training Job template file; unset = the one shipped in lsbert.launcher."
    )
    job_values: Optional[str] = Field(None, description="YAML file with the cluster-specific parts of training Jobs.")
    release_name: str = Field(
        "lsbert", description="Prefix of training Job names and value of their lsbert.io/release label."
    )
    job_owner_configmap: Optional[str] = Field(
        None, description="A ConfigMap in the Job namespace that owns every training Job (deleting it deletes them)."
    )
    training_pending_timeout: float = Field(
        900.0,
        ge=0,
        description="Seconds a training Job may stay without a running pod before it is failed; 0 = no limit.",
    )
    require_cuda: Optional[bool] = Field(
        None,
        description=(
            "Stop when CUDA is unusable although a GPU was assigned; unset = when NVIDIA_VISIBLE_DEVICES names devices."
        ),
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("label_studio_url")
    @classmethod
    def _url(cls, value: Optional[str]) -> Optional[str]:
        if value in (None, ""):
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value != 1:
            raise ValueError(
                "lsbert serves one model copy per process and keeps per-project training state in it; "
                "run more replicas (Kubernetes) instead of WORKERS > 1"
            )
        return value

    @model_validator(mode="after")
    def _basic_auth_pair(self) -> Settings:
        user, password = self.basic_auth_user, self.basic_auth_pass
        if bool(user) != bool(password and password.get_secret_value()):
            raise ValueError("BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together")
        return self

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)


class SettingsError(ValueError):
    """Invalid configuration; the message names each bad variable. The command line (``lsbert``) turns it
    into a message on stderr and exit code 2."""


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"]) or "settings"
            lines.append(f"  {loc.upper()}: {err['msg']}")
        raise SettingsError("invalid lsbert configuration:\n" + "\n".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
