"""Check the wheels carried to the GPU machine (benchmarks/gpu/gpu_train_check.sh --prepare) before a
device call.

    python benchmarks/gpu/gpu_wheel_check.py .whl

Every wheel must install on CPython 3.12 / manylinux x86_64 (tags py3-none-any, py312-none-any or
cp312-cp312-manylinux*_x86_64), each distribution once, and every Requires-Dist (extras left out,
markers evaluated for Python 3.12 on Linux) must be met by another carried wheel, with its version, or be
a package the device image holds (/work/.library/device/KINDS.md, "Python packages already there";
versions known from its pip list are checked too). Exit 1 naming each problem.
"""
from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# The device image's packages (KINDS.md, read 2026-11-17); versions where its pip list gave them.
IMAGE = set(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0"}
TAG_OK = re.compile(r"^(py3-none-any|py312-none-any|cp312-cp312-manylinux[\w.]*_x86_64)$")


def main(folder: str) -> int:
    env = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython", extra="")
    problems, carried, metas = [], {}, {}
    for w in sorted(Path(folder).glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(w.name)
        tag_strs = {str(t) for t in tags}
        if not any(TAG_OK.match(t) for t in tag_strs):
            problems.append(f"{w.name}: no tag for CPython 3.12 manylinux x86_64 ({sorted(tag_strs)})")
        if name in carried:
            problems.append(f"{name}: two versions carried ({carried[name]} and {version})")
        carried[name] = version
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            metas[w.name] = Parser().parsestr(z.read(meta).decode())
    for whl, meta in metas.items():
        rp = meta.get("Requires-Python")
        if rp and not SpecifierSet(rp).contains("3.12.3"):
            problems.append(f"{whl}: Requires-Python {rp} excludes 3.12")
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue   # an extra, or another platform / Python
            n = canonicalize_name(req.name)
            if n in carried:
                if req.specifier and not req.specifier.contains(carried[n], prereleases=True):
                    problems.append(f"{whl}: needs {req}, carried {n} {carried[n]}")
            elif n in IMAGE:
                v = IMAGE_VERSIONS.get(n)
                if v and req.specifier and not req.specifier.contains(Version(v), prereleases=True):
                    problems.append(f"{whl}: needs {req}, the image has {n} {v}")
            else:
                problems.append(f"{whl}: needs {req}: neither carried nor in the image")
    total = sum(w.stat().st_size for w in Path(folder).glob("*.whl"))
    print(f"{len(carried)} wheels, {total / 2**20:.1f} MiB: "
          + ", ".join(f"{n} {v}" for n, v in sorted(carried.items())))
    for p in problems:
        print("PROBLEM: " + p)
    print("wheel check: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".whl"))
