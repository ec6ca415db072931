"""hlora: federated fine-tuning of language models with LoRA adapters of heterogeneous ranks."""

__version__ = "0.1.0"
