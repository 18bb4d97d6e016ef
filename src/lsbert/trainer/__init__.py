"""Fine-tuning: ``lsbert train`` (main), data set building (dataset), the training loop (loop), metrics,
the promotion gate (promotion) and the Label Studio data source (source)."""
