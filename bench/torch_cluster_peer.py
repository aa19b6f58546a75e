"""torch-cluster's radius_graph as a neighbor-list peer, with or without the torch-cluster package installed.

PyG publishes torch-cluster wheels on its own index, not on PyPI, and none for torch 2.13; the PyPI sdist's
full build compiles nine operators (~15 min on 2 cores). For the benchmark only the radius operator matters,
so this builds just that one from the sdist with torch.utils.cpp_extension (CPU, plus CUDA when a CUDA
compiler is there): two or three source files, about a minute. The sdist travels with the GPU checks in
`.whl/` (bench/gpu/fetch_wheels.sh); nothing here is downloaded at run time.

    python bench/torch_cluster_peer.py build [SDIST]     # builds into build/torch_cluster_radius/, prints the time

`radius_graph()` returns a callable with radius_graph's meaning (edges between atoms of one structure closer
than r, no self loops) from whichever is available: the installed package first, else this build.
"""
from __future__ import annotations

import glob
import os
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "torch_cluster_radius"
OP_NAME = "torch_cluster_radius"


def sdist_path() -> Path | None:
    """The torch-cluster sdist: $HESSFORGE_TORCH_CLUSTER_SDIST, else the newest .whl/torch_cluster-*.tar.gz."""
    env = os.environ.get("HESSFORGE_TORCH_CLUSTER_SDIST")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"HESSFORGE_TORCH_CLUSTER_SDIST={env}: no such file")
        return Path(env)
    found = sorted(glob.glob(str(ROOT / ".whl" / "torch_cluster-*.tar.gz")))
    return Path(found[-1]) if found else None


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def build(sdist: Path, build_dir: Path = BUILD_DIR, verbose: bool = False) -> Path:
    """Unpack `sdist` and compile its radius operator into `build_dir`; loads it (torch.ops.torch_cluster.radius)
    and returns the library's path. Rebuilds only when sources or flags change (ninja)."""
    from torch.utils.cpp_extension import load

    # cpp_extension runs `ninja` from PATH: a venv's own ninja sits beside its python
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        tar.extractall(build_dir, filter="data")
    csrc = build_dir / top / "csrc"
    sources = [csrc / "radius.cpp", csrc / "cpu" / "radius_cpu.cpp"]
    flags = ["-O3"]
    cuda = _want_cuda()
    if cuda:
        sources.append(csrc / "cuda" / "radius_cuda.cu")
        flags.append("-DWITH_CUDA")
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:  # this GPU's architecture only: one nvcc pass
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{sdist} is not a torch-cluster sdist with a radius operator: missing {missing}")
    out = build_dir / ("cuda" if cuda else "cpu")
    out.mkdir(exist_ok=True)
    load(name=OP_NAME, sources=[str(s) for s in sources], extra_cflags=flags, extra_cuda_cflags=flags,
         build_directory=str(out), is_python_module=False, with_cuda=cuda, verbose=verbose)
    return out / f"{OP_NAME}.so"


def _op_loaded() -> bool:
    try:
        torch.ops.torch_cluster.radius
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_built() -> bool:
    """Loads a library built earlier by `build` (the CUDA one when a GPU is there), without compiling."""
    for kind in (["cuda"] if _want_cuda() else []) + ["cpu"]:
        lib = BUILD_DIR / kind / f"{OP_NAME}.so"
        if lib.is_file():
            torch.ops.load_library(str(lib))
            return True
    return False


def radius_graph():
    """A callable (pos, r, batch, max_num_neighbors) -> edge_index [2, E] using torch-cluster's radius kernel,
    or None when neither the package nor a build of its radius operator is there."""
    try:
        from torch_cluster import radius_graph as package_radius_graph

        return lambda pos, r, batch, max_num_neighbors: package_radius_graph(
            pos, r, batch=batch, loop=False, max_num_neighbors=max_num_neighbors)
    except ImportError:
        pass
    if not (_op_loaded() or _load_built()):
        return None

    def built_radius_graph(pos, r, batch, max_num_neighbors):
        # radius_graph's own steps: per-structure offsets of the sorted batch vector, the radius query of the
        # positions against themselves with one extra slot for the self pair, then the self pairs dropped.
        num_structures = int(batch[-1]) + 1 if batch.numel() else 0
        ptr = torch.bucketize(torch.arange(num_structures + 1, device=pos.device), batch)
        centre, other = torch.ops.torch_cluster.radius(pos, pos, ptr, ptr, float(r), max_num_neighbors + 1, 1)
        keep = centre != other
        return torch.stack([other[keep], centre[keep]])
    return built_radius_graph


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "build":
        sys.exit(__doc__)
    path = Path(sys.argv[2]) if len(sys.argv) > 2 else sdist_path()
    if path is None:
        sys.exit("no torch-cluster sdist: give its path, or run bench/gpu/fetch_wheels.sh to put one in .whl/")
    t0 = time.perf_counter()
    lib = build(path, verbose="-v" in sys.argv)
    print(f"built {lib} from {path.name} in {time.perf_counter() - t0:.0f} s (cuda: {_want_cuda()})")
