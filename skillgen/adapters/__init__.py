"""The team adapter registry: written by the trainer, read by the consumer and the bots. No torch."""
