"""Core ML side of mlx-distill: the numpy MIL reference interpreter (``converters.interpreter``),
and (later) the torch-free MIL builder, quantization and .mlpackage export."""

import logging as _logging
import sys as _sys


def _drop_expected_linux_warnings(record: _logging.LogRecord) -> bool:
    # coremltools warns at import that its macOS-only runtime libraries are absent. On Linux that
    # is the known state of affairs; our own commands say what needs macOS where it matters.
    return not record.getMessage().startswith("Failed to load _ML")


if _sys.platform.startswith("linux"):
    _logging.getLogger("coremltools").addFilter(_drop_expected_linux_warnings)
