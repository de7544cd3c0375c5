"""Strict JSON for every file leakycuda writes (dump, dumps) and the one reader of those files (load, loads).

JSON (RFC 8259) has no NaN or Infinity; Python's json module writes them as bare tokens that jq,
JavaScript and most other readers refuse. The convention (docs/DESIGN.md §3.4):

- Writing: every float that is not finite (NaN, inf, -inf) is written as null; nothing else changes.
  ``allow_nan=False`` then turns any value that slipped through into an error instead of a bad file.
- Reading: the NaN / Infinity tokens of files written before this convention still read as floats,
  and a null where leakycuda writes a number reads back as the float it stands for:

  - +inf under the keys of ``NULL_IS`` that map to inf, whose only non-finite value is +inf by
    definition: ``continue_above`` (RunConfig: inf = a sweep never warm-starts) and ``stationarity``,
    ``stationarity_max``, ``stationarity_total`` (diagnostics.Convergence: +inf where W_l = 0 but the
    critical-point residual is not);
  - NaN ("undefined": a test MSE without test points, a loss after a divergence, a slope that does not
    apply) under the other keys of ``NULL_IS``, and for a null among the numbers of a list (per-layer
    statistics, spectra, rho, per-member losses).

  A key's meaning covers everything below it (fig2.json's ``test_mse`` table {scheme: [[per seed]]}).
  Any other null stays None: it is an optional field (``refine``, ``rank``, ``cuda``, ...).
"""
import json
import math

INF, NAN = math.inf, math.nan

#: What a null under each key stands for when read back (a key absent here: None, or NaN inside a list of numbers).
NULL_IS = {
    "continue_above": INF, "stationarity": INF, "stationarity_max": INF, "stationarity_total": INF,
    "loss": NAN, "train_mse": NAN, "test_mse": NAN, "reg": NAN, "max_rho_Lt": NAN,
    "data_cost": NAN, "regularization": NAN, "grad_norm": NAN, "grad_norm_weight": NAN, "grad_norm_proj": NAN,
    "scale_slope": NAN, "balance_gap": NAN, "rank_median": NAN, "rank_min": NAN, "rank_max": NAN, "coi_min": NAN,
    "mean_share_mid": NAN,
}


def strict(obj):
    """``obj`` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kwargs):
    """Strict JSON text of ``obj`` (non-finite floats as null); ``kwargs`` go to :func:`json.dumps`."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def dump(obj, path, **kwargs):
    """Writes ``obj`` as strict JSON to ``path`` (a file name); returns ``path``."""
    text = dumps(obj, **kwargs)
    with open(path, "w") as f:
        f.write(text)
    return path


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric(values):
    """True for a (nested) list whose leaves are numbers or None, at least one of them a number."""
    found = False
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif _is_number(v):
            found = True
        elif v is not None:
            return False
    return found


def restore(obj, fill=None):
    """The inverse of :func:`strict` under the convention above: nulls back to inf or NaN where a number is meant."""
    if isinstance(obj, dict):
        return {k: restore(v, NULL_IS.get(k, fill)) for k, v in obj.items()}
    if isinstance(obj, list):
        inner = fill if fill is not None else (NAN if _numeric(obj) else None)
        return [restore(v, inner) for v in obj]
    return fill if obj is None and fill is not None else obj


def loads(text):
    """Parses JSON text written by leakycuda, strict or with the older NaN / Infinity tokens (see :func:`restore`)."""
    return restore(json.loads(text))


def load(path):
    """Reads a JSON file written by leakycuda (see :func:`loads`)."""
    with open(path) as f:
        return loads(f.read())
