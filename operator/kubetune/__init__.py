"""kubetune: a Kubernetes operator and local runner for LLM fine-tuning jobs."""

__version__ = "0.1.0"
