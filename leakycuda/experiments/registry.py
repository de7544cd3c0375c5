"""The registry of experiments: every module of this package that defines ``EXPERIMENT`` is one, found by name."""
import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
from typing import Callable

from .. import _json
from .. import _validate as check

__all__ = ["Experiment", "experiments", "get", "read_json", "replot"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: ``leakycuda reproduce NAME`` (``leakycuda demo`` for the demo) and its replot.

    ``run(out, *, quick, device, dtype, seeds, progress, shard, ...)`` trains, measures and writes ``out``/NAME.json
    and the PNGs (on a shard, or a rank of a ``torchrun`` launch, its share of the runs: leakycuda.experiments.
    distribute); ``finish(header, records, *, out, log, machine, seconds, parts)`` writes the JSON and the PNGs from
    the run's header and its per-run records (what a run and ``leakycuda merge`` end with); ``plot(data, out, json_path)`` redraws the PNGs from that JSON; ``matches(data)`` says whether a
    result JSON is this experiment's, ``fields`` the fields its plot needs. ``kind``: "preset" (fixed full and quick forms), "sweep" (the paper's
    figures: sweeps with the run settings as command-line overrides) or "demo". ``full`` and ``quick`` say what
    the two forms run.
    """

    name: str
    run: Callable
    plot: Callable
    matches: Callable
    help: str
    kind: str = "preset"
    fields: tuple = ()
    full: str = ""
    quick: str = ""
    finish: Callable = None


_REGISTRY = {}


def experiments():
    """{name: Experiment} of every module in leakycuda.experiments that defines ``EXPERIMENT`` (in name order)."""
    if not _REGISTRY:
        package = importlib.import_module(__package__)
        found = {}
        for info in pkgutil.iter_modules(package.__path__):
            spec = getattr(importlib.import_module("%s.%s" % (__package__, info.name)), "EXPERIMENT", None)
            if isinstance(spec, Experiment):
                if spec.name in found:
                    raise RuntimeError("two experiment modules are named %r" % spec.name)
                found[spec.name] = spec
        _REGISTRY.update(sorted(found.items()))
    return dict(_REGISTRY)


def get(name):
    """The :class:`Experiment` called ``name``; ValueError naming the known ones otherwise."""
    known = experiments()
    if name not in known:
        check.fail(ValueError, "name", "one of %s" % ", ".join(known), repr(name))
    return known[name]


def read_json(path, name, expect):
    """The JSON in the file ``path`` (the argument ``name``), which should be ``expect``, read with leakycuda's
    strict-JSON reader: a missing file, a folder or text that is not JSON is refused naming the file
    (FileNotFoundError / ValueError)."""
    if not os.path.exists(path):
        check.fail(FileNotFoundError, name, expect, "%r, which does not exist" % path)
    if os.path.isdir(path):
        check.fail(ValueError, name, expect, "%r, which is a folder" % path)
    try:
        return _json.load(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        check.fail(ValueError, name, expect, "%r, which is not valid JSON (%s; truncated?)" % (path, e))


@contextlib.contextmanager
def _schema(path, name, expect, data, keys):
    """Checks that the dict ``data`` read from ``path`` has the fields ``keys``, then runs the body (which reads
    them), turning a KeyError / IndexError / TypeError there into a ValueError naming the file."""
    missing = [k for k in keys if k not in data]
    if missing:
        check.fail(ValueError, name, expect, "%r, which has no field %s" % (path, ", ".join(map(repr, missing))))
    try:
        yield
    except (KeyError, IndexError, TypeError) as e:
        check.fail(ValueError, name, expect, "%r, whose fields do not match (%s: %s)" % (path, type(e).__name__, e))


def replot(json_path, out=None):
    """Redraws the PNGs of a run from its JSON (fig1.json, fig2.json, demo.json with the history.json beside it,
    dln_rank.json, ...) into ``out`` (default: beside the JSON; a folder); returns {name: path}. A missing,
    truncated or non-JSON file, or one of another schema, is refused naming it (FileNotFoundError / ValueError)."""
    if isinstance(json_path, bytes) or not isinstance(json_path, (str, os.PathLike)):
        check.fail(TypeError, "json_path", "a path (str or os.PathLike) to a result JSON", repr(json_path))
    json_path = os.fspath(json_path)
    out = check.writable_path(os.path.dirname(os.path.abspath(json_path)) if out is None else out, "out",
                              folder=True)
    expect = "the JSON of a leakycuda run (%s)" % ", ".join("%s.json" % n.replace("-", "_") for n in experiments())
    data = read_json(json_path, "json_path", expect)
    spec = next((e for e in experiments().values() if isinstance(data, dict) and e.matches(data)), None)
    if spec is None:
        named = " (experiment %r)" % data["experiment"] if isinstance(data, dict) and "experiment" in data else ""
        check.fail(ValueError, "json_path", expect, "%r, which is none of them%s" % (json_path, named))
    with _schema(json_path, "json_path", "a %s result written by leakycuda" % spec.name, data, spec.fields):
        return spec.plot(data, out, json_path)
