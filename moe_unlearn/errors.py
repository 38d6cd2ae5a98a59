"""Exception classes. Each says what went wrong and what to do about it."""

from __future__ import annotations


class MoEUnlearnError(Exception):
    """Base class of every error this library raises on purpose."""


class NotAnMoEModel(MoEUnlearnError, TypeError):
    """The model has no MoE layer this library knows how to read."""


class UnsupportedFamily(MoEUnlearnError):
    """An MoE model of a family without an architecture adapter."""


class BadInputError(MoEUnlearnError, ValueError):
    """A user-supplied argument, file or dataset is unusable."""


class DataError(BadInputError):
    """Data could not be read or is empty / malformed."""


class TrainingDiverged(MoEUnlearnError, FloatingPointError):
    """A loss became NaN or infinite; nothing was written."""


class PatchError(MoEUnlearnError):
    """A patch does not match the model it is applied to."""


class BackendUnavailable(MoEUnlearnError, RuntimeError):
    """A kernel backend was requested explicitly but cannot run here."""


class MergeNotPossible(MoEUnlearnError, NotImplementedError):
    """An adapter whose output depends on each token (a routed LoRA mixture) cannot be folded into static weights."""
