"""A shortcut in coremltools' shape inference for ``reshape`` with a symbolic (flexible) length.

The prefill function's sequence length is a symbol, so a ``reshape`` with a ``-1`` there asks
coremltools to solve ``volume(x) = volume(shape)`` for that dimension, which it does with
``sympy.solve`` (~10-30 ms a call; 4-6 such reshapes per layer). In every one of them the unknown
is a single fresh symbol times known integers, i.e. ``unknown = volume(x) / k``, which sympy
evaluates directly. Measured on the 2-core VM, building the prefill ops (weights already
prepared): 0.5B linear 3.2 s -> 1.2 s, ane 2.3 s -> 1.5 s; small linear 0.9 s -> 0.4 s.
``fast_reshape_inference`` substitutes that case for the duration of a build and leaves every
other case to the original; ``tests/test_export_pipeline.py`` checks that both give the same
shapes and the same prefill function.
"""

from __future__ import annotations

import contextlib


def solve_single_unknown(left_volume, inshape):
    """``reshape.enforce_volumetric_constraint`` for the case of one symbolic entry in
    ``inshape`` (the others known integers, no -1) and a symbolic ``left_volume``; None for any
    other case. Same acceptance rules as the original: a zero solution, or one with symbols not
    in ``left_volume``, leaves the entry as it is; an integer solution becomes an int."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    shape = list(inshape)
    unknowns = [i for i, s in enumerate(shape) if is_symbolic(s)]
    if len(unknowns) != 1 or not is_symbolic(left_volume) or any(
            not is_symbolic(s) and int(s) == -1 for s in shape):
        return None
    (index,) = unknowns
    known = 1
    for i, s in enumerate(shape):
        if i != index:
            known *= int(s)
    if known == 0:
        return None
    value = left_volume / known
    if value != 0 and not (value.free_symbols - left_volume.free_symbols):
        try:
            shape[index] = int(value)
        except TypeError:  # still symbolic
            shape[index] = value
    return shape


@contextlib.contextmanager
def fast_reshape_inference():
    """Use ``solve_single_unknown`` for reshape shape inference inside the block."""
    from coremltools.converters.mil.mil.ops.defs.iOS15 import tensor_transformation as ops

    original = ops.reshape.__dict__.get("enforce_volumetric_constraint")
    if not isinstance(original, staticmethod):  # another coremltools: build the slow way
        yield
        return
    solve = original.__func__

    def enforce_volumetric_constraint(left_volume, inshape):
        shape = solve_single_unknown(left_volume, inshape)
        return shape if shape is not None else solve(left_volume, inshape)

    ops.reshape.enforce_volumetric_constraint = staticmethod(enforce_volumetric_constraint)
    try:
        yield
    finally:
        ops.reshape.enforce_volumetric_constraint = original
