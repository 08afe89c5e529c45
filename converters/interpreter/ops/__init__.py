"""Op implementations, one module per op family. Importing this package imports every module in
it, which fills ``registry.OPS``."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
