"""Typed user errors. Library code raises these and never prints or exits; `mxptq.cli` maps
each to one stderr line and exit code 2. Anything else is an internal error and keeps its
traceback (exit 1)."""


class MxptqError(Exception):
    """Base of every *user* error: bad recipe, bad input file, missing data or model."""


class RecipeError(MxptqError):
    """The recipe is invalid. The message names the file and the TOML key."""


class FormatError(MxptqError):
    """An MX format that does not exist (unknown element format, width out of range...)."""


class ModelError(MxptqError):
    """The model cannot be found or loaded, or does not fit the recipe's selectors."""


class DataError(MxptqError):
    """Evaluation or calibration data is missing, empty or unusable."""


class CheckpointError(MxptqError):
    """A checkpoint directory (GPTQ per-layer or packed MX) is missing, corrupt or stale."""


class OutputError(MxptqError):
    """The output directory (--out, [output].dir) cannot be written: a file, or no permission."""
