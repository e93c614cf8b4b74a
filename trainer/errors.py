"""The trainer's one root exception."""


class TrainerError(RuntimeError):
    """Root of what the trainer raises on purpose; the message is fit for the person who asked."""
