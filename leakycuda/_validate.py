"""Argument checks shared by the Python API and the command line: one check per kind of argument.

Every check returns the normalised value or raises TypeError (wrong type or dtype) or ValueError
(wrong value or shape) with a message "<name> must be <expected>, got <given>". The exception
carries ``expect`` and ``got`` so the command line can say the same thing about a flag.
"""
import math
import numbers
import os
import tempfile

import torch


def fail(cls, name, expect, got):
    """Raises cls("<name> must be <expect>, got <got>") with .name, .expect and .got attached."""
    err = cls("%s must be %s, got %s" % (name, expect, got))
    err.name, err.expect, err.got = name, expect, got
    raise err


def _what(what):
    return " (%s)" % what if what else ""


def integer(value, name, *, low=None, what=""):
    """An int (not a bool, not a float with an integral value) that is >= low."""
    expect = "an integer%s%s" % (" >= %d" % low if low is not None else "", _what(what))
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(TypeError, name, expect, "%r of type %s" % (value, type(value).__name__))
    if low is not None and value < low:
        fail(ValueError, name, expect, repr(int(value)))
    return int(value)


def real(value, name, *, low=None, strict=False, finite=True, what=""):
    """A finite float (a Python or NumPy real, or a one-element tensor) that is >= low (> low when strict)."""
    bound = ""
    if low is not None:
        bound = " %s %g" % (">" if strict else ">=", low)
    expect = "a %snumber%s%s" % ("finite " if finite else "", bound, _what(what))
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(TypeError, name, expect, "%r of type %s" % (value, type(value).__name__))
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        fail(ValueError, name, expect, repr(value))
    if low is not None and (value < low or (strict and value == low)):
        fail(ValueError, name, expect, repr(value))
    return value


def distinct(values, name, item, *, what="", sort=True):
    """A non-empty sequence of distinct values, each passed through ``item(value, "each value of <name>")``;
    returned as a tuple, sorted when ``sort`` (duplicates in a sweep would only run twice)."""
    expect = "a non-empty list of distinct values%s" % _what(what)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        fail(TypeError, name, expect, repr(values))
    out = [item(v, "each value of %s" % name) for v in values]
    if not out or len(set(out)) != len(out):
        fail(ValueError, name, expect, repr(list(values)))
    return tuple(sorted(out)) if sort else tuple(out)


def choice(value, name, allowed, *, what=""):
    """One of ``allowed`` (strings)."""
    if not isinstance(value, str) or value not in allowed:
        fail(ValueError, name, "one of %s%s" % (", ".join(map(repr, allowed)), _what(what)), repr(value))
    return value


def float_dtype(dtype, name="dtype"):
    """A floating-point torch.dtype (the data and the maths here are real-valued)."""
    if not isinstance(dtype, torch.dtype):
        fail(TypeError, name, "a torch floating dtype such as torch.float32", repr(dtype))
    if not dtype.is_floating_point:
        fail(TypeError, name, "a floating dtype (torch.float32 or torch.float64)", str(dtype))
    return dtype


def device(value, name="device"):
    """None, or a torch.device (or its string) that this torch can use: cpu, meta, or cuda[:i] when CUDA is there."""
    if value is None:
        return None
    expect = "a torch device such as 'cpu', 'cuda' or 'cuda:0'"
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        fail(TypeError, name, expect, repr(value))
    try:
        dev = torch.device(value) if not isinstance(value, int) else torch.device("cuda", value)
    except (RuntimeError, ValueError):
        fail(ValueError, name, expect, repr(value))
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(ValueError, name, "a device this torch can use (torch %s sees no CUDA device%s)"
                 % (torch.__version__, "; it is a CPU build" if torch.version.cuda is None else ""), repr(str(dev)))
        if dev.index is not None and dev.index >= count:
            fail(ValueError, name, "cuda:0..cuda:%d (torch sees %d CUDA device(s))" % (count - 1, count), repr(str(dev)))
    elif dev.type == "cpu" and dev.index not in (None, 0):
        fail(ValueError, name, "'cpu' (there is one CPU device)", repr(str(dev)))
    elif dev.type not in ("cpu", "meta"):
        fail(ValueError, name, "'cpu' or 'cuda[:i]' (leakycuda has CPU and CUDA kernels)", repr(str(dev)))
    return dev


def _real_leaves(value):
    """True when value is a real number (not a bool; a one-element real tensor or a real NumPy array counts) or a
    (nested) list / tuple of them."""
    if isinstance(value, (list, tuple)):
        return all(_real_leaves(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and (value.is_floating_point() or value.dtype in (torch.int32, torch.int64))
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # a NumPy array or scalar
    if kind is not None:
        return kind in ("i", "u", "f")
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def reals(value, name, expect, *, like):
    """A tensor (returned as it is; the op checks its shape, dtype and device), or real numbers (one, a (nested)
    list / tuple of them, or a real NumPy array) made a tensor of ``like``'s dtype on its device. ``expect``
    says what the argument is, e.g. "a tensor [L] or a list of L numbers (the layer steps)"."""
    if isinstance(value, torch.Tensor):
        return value
    given = repr(value) if len(repr(value)) <= 80 else repr(value)[:76] + " ..."
    if not _real_leaves(value):
        fail(TypeError, name, expect, "%s of type %s" % (given, type(value).__name__))
    try:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as e:  # a ragged list
        fail(ValueError, name, expect, "%s, which is not a regular array (%s)" % (given, e))


def tensor(value, name, hint):
    """A torch.Tensor; ``hint`` describes the expected shape, e.g. "[N, w]"."""
    if not isinstance(value, torch.Tensor):
        fail(TypeError, name, "a tensor %s" % hint, type(value).__name__)
    return value


def matrix(value, name, rows=None, cols=None, *, rows_name="N", cols_name="w"):
    """A 2-D tensor [rows, cols]; None leaves a size free."""
    tensor(value, name, "[%s, %s]" % (rows_name, cols_name))
    want = "[%s, %s]" % (rows_name if rows is None else "%s = %d" % (rows_name, rows),
                         cols_name if cols is None else "%s = %d" % (cols_name, cols))
    if value.dim() != 2 or (rows is not None and value.shape[0] != rows) or (cols is not None and value.shape[1] != cols):
        fail(ValueError, name, "a 2-d tensor %s" % want, "shape %s" % (list(value.shape),))
    return value


def finite(value, name, hint=""):
    """A tensor without NaN or inf (counted and located in the message)."""
    bad = ~torch.isfinite(value.detach())
    if value.is_floating_point() and bool(bad.any()):
        first = [int(i) for i in torch.nonzero(bad)[0]]
        fail(ValueError, name, "finite%s" % (" (%s)" % hint if hint else ""),
             "%d NaN or inf value(s), the first at index %s" % (int(bad.sum()), first))
    return value


def writable_path(path, name, *, folder):
    """A path where a file (folder=False) or a folder (folder=True) can be written; nothing is created.

    The deepest existing ancestor must be a folder in which this process can create files (tried
    with a temporary file, which also works for root, whom os.access always allows).
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        fail(TypeError, name, "a path (str or os.PathLike)", repr(path))
    path = os.fspath(path)
    what = "a writable %s path" % ("folder" if folder else "file")
    if not path:
        fail(ValueError, name, what, "''")
    full = os.path.abspath(path)
    if os.path.exists(full):
        if folder and not os.path.isdir(full):
            fail(ValueError, name, what, "%r, which is an existing file" % path)
        if not folder and os.path.isdir(full):
            fail(ValueError, name, what, "%r, which is an existing folder" % path)
    probe = full if folder and os.path.isdir(full) else os.path.dirname(full)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        fail(ValueError, name, what, "%r: %s is a file, not a folder" % (path, probe))
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        fail(ValueError, name, what, "%r: cannot write in %s (%s)" % (path, probe, e.strerror or e))
    return path
