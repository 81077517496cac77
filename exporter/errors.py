"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class ExporterError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class ProfileError(ExporterError):
    """A device profile that is unknown or malformed."""


class ModelError(ExporterError):
    """A model that is missing, not local, or of an unsupported kind."""


class CalibrationError(ExporterError):
    """Calibration data that is missing, empty or too short."""


class BudgetError(ExporterError):
    """A compression ratio or budget that cannot be met."""


class ParityError(ExporterError):
    """The exported ONNX model disagrees with the PyTorch model beyond tolerance."""

    exit_code = 3


class TokenizerMismatchError(ExporterError):
    """The artifact's tokenizer, read by a runtime, encodes text differently from the source's."""

    exit_code = 3
