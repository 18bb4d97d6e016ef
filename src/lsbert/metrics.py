"""Prometheus metrics, on the default registry that KServe serves at ``GET /metrics``."""

from prometheus_client import Counter, Gauge, Histogram

REQUEST_SECONDS = Histogram(
    "lsbert_request_seconds",
    "Latency of Label Studio and inference requests",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BATCH_SIZE = Histogram(
    "lsbert_batch_size",
    "Texts per forward job on the inference worker",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
TASKS_PREDICTED = Counter("lsbert_tasks_predicted_total", "Tasks answered by /predict", ["outcome"])
SERVING_MODEL = Gauge(
    "lsbert_serving_model_info", "1 for the model version each project is served by", ["project", "version", "kind"]
)
WEBHOOK_EVENTS = Counter("lsbert_webhook_events_total", "Label Studio webhook events received", ["action"])
TRAINING_RUNS = Counter("lsbert_training_runs_total", "Training runs by outcome", ["outcome"])
MODEL_SWAPS = Counter("lsbert_model_swaps_total", "Hot swaps to a newly promoted checkpoint")
