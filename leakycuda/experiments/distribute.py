"""Spreading one experiment's runs over processes: the ranks of a ``torchrun`` launch, or the shards of a scheduler's
job array (``--shard i/n``); part files, resuming, and merging the parts into the one result.

Every experiment describes its work as a plan: a list of :class:`Job` (a key, a cost, and the job it warm-starts
from, if any) and a ``train(indices, emit)`` that trains the jobs ``indices`` of the plan (as ensembles where it can)
and calls ``emit(i, record)`` with each run's JSON record as soon as it has one. :func:`run_plan` then

- in one process: trains every job and returns the records in plan order;
- on a shard i of n, or a rank r of a ``torch.distributed`` group of n: takes its share of the plan (:func:`assign`:
  the same deterministic split for both, balanced by cost, a warm-start chain kept together), writes each record to
  its part file ``OUT/parts/<name>.shard-i-of-n.json`` / ``<name>.rank-r-of-n.json`` as it comes (so a rerun skips
  what is there), and returns None; except rank 0 of a group, which gathers every rank's records and returns them
  in plan order, so that it writes the one result as a single process would.

:func:`merge` puts the part files of the shards back together (``leakycuda merge OUT PART...``).
"""
import dataclasses
import json
import os
import re
import time
import traceback

from .. import _json
from .. import _validate as check
from .._env import machine_info
from ..train import one_process

__all__ = ["Job", "PartError", "RunsFailed", "assign", "chains", "check_shard", "execute", "merge", "parse_shard",
           "part_path", "read_parts", "run_plan", "world", "write_merged"]

#: The marker of a part file, and its format's version.
PART_FORMAT = "leakycuda-part-1"


@dataclasses.dataclass(frozen=True)
class Job:
    """One run of an experiment's plan. ``key``: unique in the plan (it names the run in logs and part files);
    ``cost``: its relative cost (layers x steps), which balances the split; ``after``: the key of an earlier job
    whose trained model this one starts from (the two then run on the same rank or shard), or None."""

    key: str
    cost: float = 1.0
    after: object = None


class RunsFailed(RuntimeError):
    """Some ranks of a distributed run failed; the message names each one, its error and the runs it held that did
    not finish. The runs that finished are in the part files, and a rerun of the same command trains only the rest."""


class PartError(ValueError):
    """Part files that do not merge (of different experiments or configs, missing or duplicate shards, unfinished)."""


def parse_shard(text, name="--shard"):
    """ "i/n" -> (i, n) with 1 <= i <= n (ValueError "<name> must be ..., got ..." otherwise)."""
    expect = "i/n with integers 1 <= i <= n (shard i of n, e.g. 2/3)"
    if isinstance(text, tuple) and len(text) == 2:
        i, n = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text) if isinstance(text, str) else None
        if m is None:
            check.fail(ValueError if isinstance(text, str) else TypeError, name, expect, repr(text))
        i, n = int(m.group(1)), int(m.group(2))
    if isinstance(i, bool) or isinstance(n, bool) or not isinstance(i, int) or not isinstance(n, int):
        check.fail(TypeError, name, expect, repr(text))
    if n < 1 or not 1 <= i <= n:
        check.fail(ValueError, name, expect, "%d/%d" % (i, n))
    return i, n


def check_shard(shard):
    """``shard`` of a run function: None (the whole plan), "i/n" or (i, n) -> None or (i, n); TypeError /
    ValueError naming ``shard`` otherwise."""
    return None if shard is None else parse_shard(shard, "shard")


def world():
    """(rank, size) of the initialised torch.distributed group, or None outside one (or in a group of one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def chains(jobs):
    """The plan's units: lists of job indices (in plan order) joined by warm starts, ordered by their first job."""
    index = {job.key: i for i, job in enumerate(jobs)}
    if len(index) != len(jobs):
        raise ValueError("the plan's job keys are not unique")
    root = list(range(len(jobs)))
    for i, job in enumerate(jobs):
        if job.after is not None:
            j = index.get(job.after)
            if j is None or j >= i:
                raise ValueError("job %r starts from %r, which is not an earlier job of the plan" % (job.key, job.after))
            root[i] = root[j]
    units = {}
    for i, r in enumerate(root):
        units.setdefault(r, []).append(i)
    return [units[r] for r in sorted(units)]


def assign(jobs, n):
    """The deterministic split of the plan ``jobs`` over n workers: [indices of worker 0, ..., of worker n-1], each
    in plan order. Longest processing time first: the chains (:func:`chains`), by falling total cost (ties in plan
    order), each go to the worker with the least cost so far (ties: the lowest index)."""
    units = chains(jobs)
    cost = [sum(float(jobs[i].cost) for i in u) for u in units]
    load, out = [0.0] * n, [[] for _ in range(n)]
    for u in sorted(range(len(units)), key=lambda u: (-cost[u], u)):
        w = min(range(n), key=lambda w: (load[w], w))
        load[w] += cost[u]
        out[w].extend(units[u])
    return [sorted(w) for w in out]


def part_path(out, name, kind, index, count):
    """OUT/parts/<name>.shard-i-of-n.json (i from 1) or <name>.rank-r-of-n.json (r from 0)."""
    return os.path.join(out, "parts", "%s.%s-%d-of-%d.json" % (name.replace("-", "_"), kind, index, count))


def _plain(obj):
    """The JSON form of a header (what two runs must agree on), for comparing."""
    return json.loads(_json.dumps(obj))


def _load_resume(path, name, header, keys, log):
    """{plan index: record} that the part file ``path`` holds for this plan and config (none when it is absent or
    of other settings, which the new part then replaces)."""
    if not os.path.exists(path):
        return {}
    try:
        part = _json.load(path)
    except (OSError, ValueError):
        part = None
    if not (isinstance(part, dict) and part.get("format") == PART_FORMAT and part.get("experiment") == name
            and part.get("header") == _plain(header) and part.get("plan") == keys):
        log("%s: %s is of other settings (or not a part file); this run replaces it" % (name, path))
        return {}
    where = {k: i for i, k in enumerate(keys)}
    return {where[k]: r for k, r in part.get("runs", {}).items() if k in where}


def _write_part(path, part):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    _json.dump(part, tmp, separators=(",", ":"))
    os.replace(tmp, path)  # a part file is whole or absent, even when the process is killed while writing


def run_plan(name, header, jobs, train, *, out, device="cpu", shard=None, log=print):
    """Trains the plan ``jobs`` of experiment ``name`` (see the module's doc) -> (the records in plan order, where
    they ran: None in one process, else a list with one dict per rank), or None where this process does not write
    the result (a shard; a rank other than 0).

    ``header``: the JSON-able settings the result depends on (experiment, config, seeds, sweep values, dtype); parts
    and reruns are matched on it. ``shard``: None or (i, n). In a torch.distributed group (and not a shard) the
    split is over its ranks. Resuming: a shard or rank skips the chains whose every run is in its part file from an
    earlier launch with the same header and plan (a chain that did not finish is trained again from its start: the
    part files keep records, not weights).
    """
    keys = [job.key for job in jobs]
    group = None if shard is not None else world()
    if shard is None and group is None:
        records = {}
        train(list(range(len(jobs))), records.__setitem__)
        return [records[i] for i in range(len(jobs))], None
    if shard is not None:
        kind, (index, count) = "shard", shard
        mine = assign(jobs, count)[index - 1]
    else:
        kind, (index, count) = "rank", group
        mine = assign(jobs, count)[index]
    path = part_path(out, name, kind, index, count)
    t0 = time.perf_counter()
    done = {i: r for i, r in _load_resume(path, name, header, keys, log).items() if i in set(mine)}
    todo = [i for unit in chains(jobs) if set(unit) <= set(mine) and not set(unit) <= set(done) for i in unit]
    part = {"format": PART_FORMAT, "experiment": name, "header": header, "plan": keys, "kind": kind, "index": index,
            "count": count, "jobs": [keys[i] for i in mine], "machine": machine_info(device), "seconds": 0.0,
            "runs": {keys[i]: done[i] for i in sorted(done)}}
    for i in todo:
        part["runs"].pop(keys[i], None)
    who = "%s %s" % (kind, "%d/%d" % (index, count) if kind == "shard" else "%d of %d" % (index, count))
    log("%s %s: %d of the %d runs (cost %.3g of %.3g)%s"
        % (name, who, len(mine), len(jobs), sum(jobs[i].cost for i in mine), sum(j.cost for j in jobs),
           "; %d already in %s" % (len(mine) - len(todo), path) if len(todo) < len(mine) else ""))

    def emit(i, record):
        part["runs"][keys[i]] = record
        part["seconds"] = time.perf_counter() - t0
        _write_part(path, part)

    error = None
    try:
        if todo:
            with one_process():  # a rank trains its own runs: no data parallelism inside fit
                train(todo, emit)
        _write_part(path, part)
    except Exception as e:  # noqa: BLE001 -- reported with the runs it held, below or by rank 0
        if kind == "shard":
            raise
        error = "%s: %s" % (type(e).__name__, " ".join(str(e).split()))
        log("%s %s failed: %s\n%s" % (name, who, error, traceback.format_exc()))
    if kind == "shard":
        log("%s %s: wrote %s" % (name, who, path))
        return None
    return _gather(name, index, count, part, error, keys, out)


def execute(name, header, jobs, train, *, out, device, shard, log, t0):
    """An experiment's run after its checks: :func:`run_plan`, then (where this process writes the result)
    ``get(name).finish(header, records, out=, log=, machine=, seconds=, parts=)`` (the header in its JSON form, as
    a merge of part files gives it) -> its result, or None on a shard
    or on a rank other than 0. ``t0``: the ``time.perf_counter()`` at which the run began (its "seconds")."""
    from .registry import get

    got = run_plan(name, header, jobs, train, out=out, device=device, shard=shard, log=log)
    if got is None:
        return None
    records, parts = got
    return get(name).finish(_plain(header), records, out=out, log=log, machine=machine_info(device),
                            seconds=time.perf_counter() - t0, parts=parts)


def _gather(name, rank, size, part, error, keys, out):
    """Rank 0 collects every rank's part -> records in plan order (None on other ranks); RunsFailed when any failed."""
    import torch.distributed as dist

    mine = {"runs": part["runs"], "jobs": part["jobs"], "error": error, "machine": part["machine"],
            "seconds": part["seconds"]}
    parts = [None] * size if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        if error is not None:
            raise RunsFailed("rank %d of %d: %s" % (rank, size, error))
        return None
    failed = [(r, p) for r, p in enumerate(parts) if p["error"] is not None]
    if failed:
        raise RunsFailed("; ".join(
            "rank %d of %d failed (%s) holding the runs %s" % (r, size, p["error"], ", ".join(
                repr(k) for k in p["jobs"] if k not in p["runs"])) for r, p in failed)
            + "; the other runs are kept in %s: rerun the same command to train only the rest"
            % os.path.join(out, "parts"))
    runs = {k: r for p in parts for k, r in p["runs"].items()}
    records = [runs[k] for k in keys]
    return records, [{"kind": "rank", "index": r, "count": size, "jobs": len(p["jobs"]), "seconds": p["seconds"],
                      "machine": p["machine"]} for r, p in enumerate(parts)]


def read_parts(paths):
    """The part files ``paths`` checked to be one whole plan -> (experiment name, header, records in plan order,
    [{kind, index, count, jobs, seconds, machine, file}]). PartError (one line, naming the file) when they are of
    different experiments or configs, when a shard is missing or given twice, or when a part did not finish."""
    from .registry import read_json

    if not paths:
        raise PartError("no part files given (the OUT/parts/<name>.shard-i-of-n.json files of the shards)")
    parts = []
    for path in paths:
        part = read_json(path, "PART", "a part file written by 'leakycuda reproduce ... --shard i/n'")
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT:
            raise PartError("%s is not a part file of leakycuda reproduce --shard (no format %r)" % (path, PART_FORMAT))
        parts.append((path, part))
    (p0, first), rest = parts[0], parts[1:]
    for path, part in rest:
        for key, what in (("experiment", "experiments"), ("kind", "kinds"), ("count", "numbers of shards"),
                          ("header", "configs"), ("plan", "plans")):
            if part.get(key) != first.get(key):
                diff = ""
                if key == "header":
                    names = sorted(k for k in set(first[key]) | set(part[key]) if first[key].get(k) != part[key].get(k))
                    diff = " (%s)" % ", ".join(names)
                    for k in names[:1]:
                        diff = " (%s: %s vs %s)" % (", ".join(names), _short(first[key].get(k)), _short(part[key].get(k)))
                elif key in ("experiment", "kind", "count"):
                    diff = " (%r vs %r)" % (first.get(key), part.get(key))
                raise PartError("%s and %s are parts of different %s%s" % (p0, path, what, diff))
    count, kind, seen = first["count"], first["kind"], {}
    for path, part in parts:
        if part["index"] in seen:
            raise PartError("%s %s of %d is given twice: %s and %s" % (kind, part["index"], count, seen[part["index"]],
                                                                        path))
        seen[part["index"]] = path
    want = range(1, count + 1) if kind == "shard" else range(count)
    missing = [i for i in want if i not in seen]
    if missing:
        raise PartError("missing %s %s of %d (given: %s)" % ("shards" if len(missing) > 1 else "shard",
                                                             ", ".join(map(str, missing)), count,
                                                             ", ".join(map(str, sorted(seen)))))
    runs = {}
    for path, part in parts:
        unfinished = [k for k in part["jobs"] if k not in part["runs"]]
        if unfinished:
            raise PartError("%s did not finish: %d of its %d runs are missing (%s); rerun that %s"
                            % (path, len(unfinished), len(part["jobs"]), ", ".join(map(repr, unfinished[:3]))
                               + (", ..." if len(unfinished) > 3 else ""), kind))
        runs.update({k: part["runs"][k] for k in part["jobs"]})
    missing = [k for k in first["plan"] if k not in runs]
    if missing:
        raise PartError("the parts do not cover the plan: no run %s" % ", ".join(map(repr, missing[:3])))
    info = [{"kind": kind, "index": part["index"], "count": count, "jobs": len(part["jobs"]),
             "seconds": part["seconds"], "machine": part["machine"], "file": os.path.basename(path)}
            for path, part in sorted(parts, key=lambda p: p[1]["index"])]
    return first["experiment"], first["header"], [runs[k] for k in first["plan"]], info


def _short(value, n=60):
    text = json.dumps(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def merge(out, paths, log=print):
    """Merges the part files ``paths`` of the shards of one run into ``out`` (the experiment's JSON and PNGs, as one
    process would write them; where each part ran is kept under "parts", "machine" is the first shard's and
    "seconds" the sum over the shards). Returns the experiment's result dict."""
    out = check.writable_path(out, "OUT", folder=True)
    return write_merged(out, read_parts([os.fspath(p) for p in paths]), log)


def write_merged(out, parts, log=print):
    """Writes the result of :func:`read_parts`' ``parts`` into the folder ``out`` (see :func:`merge`)."""
    from .registry import get

    name, header, records, info = parts
    return get(name).finish(header, records, out=out, log=log, machine=info[0]["machine"],
                            seconds=sum(p["seconds"] for p in info), parts=info)
