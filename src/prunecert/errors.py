"""One exception hierarchy, so the CLI can turn any expected failure into a one-line message.

Every message names what is wrong: the file, the layer (index and name), the shape or the value.
"""


class PrunecertError(Exception):
    """Base of every error prunecert raises on purpose (bad input, unsupported model, ...)."""


class ModelFormatError(PrunecertError):
    """A model file is missing, truncated, not a model, or holds invalid values (NaN/Inf)."""


class UnsupportedLayerError(ModelFormatError):
    """A model contains an operator outside the IR (e.g. MaxPool, Sigmoid, a residual add)."""


class ShapeMismatchError(PrunecertError):
    """Consecutive operators, or an input, do not fit together."""


class PairingError(PrunecertError):
    """Two networks (original / pruned) cannot be paired neuron by neuron."""


class DataError(PrunecertError):
    """A data set is unknown, missing or malformed."""


class RegionError(PrunecertError):
    """An input region is invalid (eps < 0, outside the domain, wrong shape, NaN)."""


class ConfigError(PrunecertError):
    """An option value is invalid (keep count 0, tolerance <= 0, budget 0, ...)."""
