"""Fine-tuning: the trainer service, hostile-input ingestion, LoRA training and the adapter registry.

Importing the package (or `trainer.commands`, `trainer.registry`, `trainer.ingest`) never imports torch, so the
bots can parse `/skill-train` and the consumer can resolve adapters without the training stack.
"""


class TrainerError(RuntimeError):
    """Root of what the trainer raises on purpose; the message is fit for the person who asked."""
