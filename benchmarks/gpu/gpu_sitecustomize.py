"""Peak-memory report for the GPU check, and its throughput runs without checkpoints, with train.py left as it is.

benchmarks/gpu/gpu_train_check.sh copies this file to <dir>/sitecustomize.py and puts <dir> first on
PYTHONPATH for its training runs, with GTC_MEMLOG=<file>. Python imports sitecustomize at start-up, so
every process of the run gets an atexit hook; the training processes (argv[0] ending in train.py)
append one JSON line at exit: torch.cuda.max_memory_allocated / max_memory_reserved when CUDA was used,
and the process' peak RSS. A run killed by its timeout writes nothing. Any sitecustomize this one
shadows (e.g. the distribution's) is run afterwards, so nothing else changes.

With GTC_NO_SAVE=1 (the bf16 and FP8 throughput stages) ``Checkpointer.save`` of parallel/state/checkpoint.py
writes nothing and says so: configs/small.yaml's checkpoint is ~16.5 GB, minutes of a 15-minute lease, and
the stages that check saving, resuming and exporting use a small config instead.
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


class _NoSave:
    """A meta-path finder that, once parallel.state.checkpoint is imported, replaces Checkpointer.save."""

    name = "parallel.state.checkpoint"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)

            def save(saver, engine, out_dir, step, *args, **kwargs):
                saver.last_stall_s = 0.0
                print(f"gpu check: the checkpoint of step {step} is not written (GTC_NO_SAVE)", flush=True)
                return module.checkpoint_root(out_dir) / module.checkpoint_name(step)

            module.Checkpointer.save = save

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("GTC_NO_SAVE") == "1":
    sys.meta_path.insert(0, _NoSave())

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
