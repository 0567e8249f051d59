"""Peak-memory report for the GPU check, with train.py left as it is.

benchmarks/gpu/gpu_train_check.sh copies this file to <dir>/sitecustomize.py and puts <dir> first on
PYTHONPATH for its training runs, with GTC_MEMLOG=<file>. Python imports sitecustomize at start-up, so
every process of the run gets an atexit hook; the training processes (argv[0] ending in train.py)
append one JSON line at exit: torch.cuda.max_memory_allocated / max_memory_reserved when CUDA was used,
and the process' peak RSS. A run killed by its timeout writes nothing. Any sitecustomize this one
shadows (e.g. the distribution's) is run afterwards, so nothing else changes.
"""
import atexit
import json
import os
import sys


def _report():
    if not (sys.argv and sys.argv[0].endswith("train.py")):
        return
    rec = {"tag": os.environ.get("GTC_TAG"), "rank": os.environ.get("RANK"), "pid": os.getpid()}
    try:
        import resource

        rec["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception as e:  # noqa: BLE001 - a report, never a failure
        rec["rss_error"] = repr(e)
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            rec.update(device=torch.cuda.get_device_name(), max_allocated=torch.cuda.max_memory_allocated(),
                       max_reserved=torch.cuda.max_memory_reserved())
    except Exception as e:  # noqa: BLE001
        rec["cuda_error"] = repr(e)
    try:
        with open(os.environ["GTC_MEMLOG"], "a") as f:
            f.write(json.dumps(rec) + "\n")
    except Exception:  # noqa: BLE001
        pass


if os.environ.get("GTC_MEMLOG"):
    atexit.register(_report)

# chain to the sitecustomize this file shadows, if any
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(_d or ".", "sitecustomize.py")
    if os.path.abspath(_d or ".") != _here and os.path.isfile(_f):
        try:
            import runpy

            runpy.run_path(_f, run_name="sitecustomize")
        except Exception:  # noqa: BLE001
            pass
        break
