"""A numpy reference interpreter for Core ML ML Programs (runs on Linux, where Core ML cannot).

    from converters.interpreter import load_mlpackage
    model = load_mlpackage("student.mlpackage", function_name="decode")
    state = model.make_state()
    out = model.predict({"input_ids": ids, "pos": pos}, state=state)
"""

from converters.interpreter.model import MILModel, MILState, load_mlpackage
from converters.interpreter.package import MILLoadError
from converters.interpreter.registry import OPS, MILExecutionError

__all__ = ["MILModel", "MILState", "load_mlpackage", "MILLoadError", "MILExecutionError", "OPS"]
