from __future__ import annotations


class PipelineError(RuntimeError):
    """Root of everything the inference engine raises on purpose; the message is fit for the requester."""


class ModelLoadError(PipelineError):
    pass


class AdapterError(PipelineError):
    pass


class ExportError(PipelineError):
    """An ONNX export could not be built or its output directory cannot be used."""


class DoesNotFit(PipelineError):
    """The request cannot be generated within the device's memory, even alone and with every saving switched on."""
