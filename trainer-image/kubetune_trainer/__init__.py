"""kubetune_trainer: the containerized fine-tuning trainer (one module per stage)."""
