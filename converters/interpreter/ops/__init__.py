"""Op implementations, one module per family; importing this package fills ``registry.OPS``."""

from converters.interpreter.ops import state  # noqa: F401
