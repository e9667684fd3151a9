"""Build skelemix and its compiled ops, ``skelemix._C``.

Install (torch must already be installed; the ops are compiled against it)::

    pip install --no-build-isolation -e .        # add -v to see the compiler

Knobs (environment variables), all printed at the start of a build:

    FORCE_CUDA=1           compile the CUDA kernels (needs nvcc and a CUDA build of torch; no GPU needed).
                           Without it, CUDA is compiled when a toolkit is found and torch is a CUDA build.
    SKELEMIX_FORCE_CPU=1   never compile CUDA.
    TORCH_CUDA_ARCH_LIST   e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPUs, else "8.0;9.0".
    CUDA_HOME, CUDA_PATH   CUDA toolkit root; default: found from nvcc (no export needed).
    MAX_JOBS               parallel compile jobs (ninja); each nvcc job needs a few GB of memory.
    DEBUG=1                -O0 -g instead of -O3.
    NVCC_FLAGS             extra nvcc flags.

torch is neither in build-system.requires nor pinned in install_requires: an isolated build would fetch some
other torch and compile against it (fairscale #305, flash-attention #958), and a pin would replace the user's
torch. When torch is not importable here (pip's default isolated build), a pure-Python package is built: the
ops fall back to the eager reference and ``python -m skelemix.info`` says how to build them.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def log(msg):
    print(f"skelemix build: {msg}", file=sys.stderr, flush=True)


def is_cuda_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def nvcc_top():
    """The toolkit root that nvcc itself reports (`#$ TOP=...`), which sees through wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH, else torch's own guess (nvcc's grandparent) if it really is a toolkit, else
    nvcc's TOP, else /usr/local/cuda. Done before importing torch.utils.cpp_extension, which reads it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], var
    nvcc = shutil.which("nvcc")
    if nvcc and is_cuda_root(os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "nvcc on PATH"
    top = nvcc_top()
    if is_cuda_root(top):
        return top, "nvcc --dryrun"
    if is_cuda_root("/usr/local/cuda"):
        return "/usr/local/cuda", "default"
    return None, "not found"


def nvidia_include_dirs():
    """Headers of the pip `nvidia` wheels (cusparse.h & co., which a bare toolkit may lack)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")):
                found.append(inc)
    return found


def default_arch_list(torch):
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    # No GPU visible: torch's _get_cuda_arch_flags would fail (IndexError), so pick A100 and H100.
    return ";".join(f"{major}.{minor}" for major, minor in caps) if caps else "8.0;9.0"


def cuda_decision(torch, cuda_home):
    """(with_cuda, why)."""
    force = env_flag("FORCE_CUDA")
    if env_flag("SKELEMIX_FORCE_CPU"):
        return False, "SKELEMIX_FORCE_CPU=1"
    problem = None
    if not torch.version.cuda:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if problem and force:
        sys.exit(f"skelemix build: FORCE_CUDA=1 but {problem}. Unset FORCE_CUDA for a CPU-only build.")
    if problem:
        return False, problem
    return True, "FORCE_CUDA=1" if force else "CUDA toolkit and CUDA torch found"


def extension_modules():
    """(ext_modules, cmdclass, options) for skelemix._C; nothing to build when torch is not importable."""
    try:
        import torch
    except ImportError as exc:
        log(f"torch is not importable here ({exc}), so the compiled ops are NOT built: this is a pure-Python "
            "install whose ops run the eager reference. pip builds in an isolated environment by default; to "
            "build the ops, install torch first and run: pip install --no-build-isolation -e .")
        return [], {}, {}

    cuda_home, cuda_home_from = find_cuda_home() if torch.version.cuda else (None, "torch is a CPU build")
    with_cuda, why = cuda_decision(torch, cuda_home)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list(torch))
    from torch.utils import cpp_extension  # after CUDA_HOME is set: it reads it at import

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported earlier with another guess

    debug = env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + [f'-DSKELEMIX_TORCH_VERSION="{torch.__version__}"']
    link = []
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for parallelises only when compiled with OpenMP; libgomp resolves to torch's copy.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = []
    extra = {"cxx": cxx}
    arch = ""
    if with_cuda:
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("WITH_CUDA", None))
        cxx.append(f'-DSKELEMIX_CUDA_ARCH_LIST="{arch}"')
        nvcc = opt + ["-lineinfo"] + os.environ.get("NVCC_FLAGS", "").split()
        for inc in nvidia_include_dirs():
            # After the toolkit's own headers, so its cuda_runtime.h keeps priority.
            cxx += ["-idirafter", inc]
            nvcc.append(f"-Xcompiler=-idirafter,{inc}")
        extra["nvcc"] = nvcc

    # One abi3 .so for every CPython >= torch's minimum (no pybind11; see csrc/skelemix.cpp).
    limited_api = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 6)
    Extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = Extension("skelemix._C", sources, define_macros=define_macros, extra_compile_args=extra,
                    extra_link_args=link, include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=limited_api)

    log(f"cpp=yes cuda={'yes' if with_cuda else 'no'} ({why}) CUDA_HOME={cuda_home or '-'} ({cuda_home_from}) "
        f"arch={arch or '-'} torch={torch.__version__} torch.version.cuda={torch.version.cuda} "
        f"python={sys.version.split()[0]} debug={int(debug)} MAX_JOBS={os.environ.get('MAX_JOBS', '-')} "
        f"limited_api={limited_api} openmp={'-fopenmp' in cxx} NVCC_FLAGS={os.environ.get('NVCC_FLAGS', '-')}")
    options = {}
    if limited_api:
        # Tag the wheel abi3 for the CPython that torch's Py_LIMITED_API names (0x030A0000 -> cp310).
        hexversion = int(getattr(cpp_extension, "min_supported_cpython", "0x03090000"), 16)
        options["bdist_wheel"] = {"py_limited_api": f"cp{hexversion >> 24}{(hexversion >> 16) & 0xFF}"}
    return [ext], {"build_ext": cpp_extension.BuildExtension}, options


ext_modules, cmdclass, options = extension_modules()

setup(
    name="skelemix",
    version=VERSION,
    description="SkeleMixCLR self-supervised skeleton action recognition with fused C++/CUDA/Triton ops",
    python_requires=">=3.9",
    packages=find_packages(include=["skelemix", "skelemix.*"]),
    package_data={"skelemix": ["configs/*.yaml", "layouts/*.yaml"]},
    # torch is required but deliberately not listed: see the module docstring.
    install_requires=["numpy", "pyyaml", "tqdm", "matplotlib", "tensorboard"],
    # export: python -m skelemix.export --format onnx (onnxscript is what torch.onnx's exporter needs, onnxruntime
    # checks the exported file); embed: t-SNE pictures (python -m skelemix.embed --plot tsne).
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton"],
                    "export": ["onnx", "onnxscript", "onnxruntime"], "embed": ["scikit-learn"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
    zip_safe=False,
)
