"""Builds the qdirty wheel with libqdirty inside it (setuptools-rust, no Python bindings).

The library crate is the Cargo package at the repository root (``../Cargo.toml``); an sdist
carries a copy of that Cargo workspace under ``crate/`` so that it builds on its own. The build
runs ``cargo rustc --lib --release --crate-type cdylib --locked`` on it (what ``cargo build
--release -p qdirty`` does for the library) and ships the result as ``qdirty/_libqdirty.abi3.so``,
which ``qdirty._ffi`` loads first.

``QDIRTY_PYTHON_SYSTEM_LIB=1`` at build time makes a wheel without the library (for a
distribution that packages libqdirty on its own): the package then loads the installed
``libqdirty.so.N``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, List, Tuple

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
#: The copy of the Cargo workspace inside an sdist.
SDIST_CRATE = "crate"
#: What of the Cargo workspace an sdist needs to build the library: the workspace manifest names
#: cli/ and testkit/ as members, fuzz/targets as a dev-dependency and benches/ as explicit
#: targets, so cargo reads those too.
WORKSPACE_FILES = ["Cargo.toml", "Cargo.lock", "build.rs", "README.md"]
WORKSPACE_DIRS = ["src", "cli/src", "testkit/src", "fuzz/targets/src", "benches"]
WORKSPACE_MEMBER_FILES = ["cli/Cargo.toml", "testkit/Cargo.toml", "fuzz/targets/Cargo.toml"]


def workspace() -> Path:
    """The Cargo workspace holding the qdirty crate: the sdist's copy, else the repository."""
    for root in (HERE / SDIST_CRATE, HERE.parent):
        manifest = root / "Cargo.toml"
        if manifest.is_file() and 'name = "qdirty"' in manifest.read_text(encoding="utf-8"):
            return root
    raise SystemExit(
        f"no qdirty Cargo package at {HERE.parent} or {HERE / SDIST_CRATE}: build the Python "
        "package from the qdirty repository (or its sdist), or set QDIRTY_PYTHON_SYSTEM_LIB=1 "
        "to build it without the library"
    )


class SdistWithCrate(sdist):
    """An sdist that carries the Cargo workspace, so that ``pip install qdirty-*.tar.gz`` and
    ``python -m build`` (which builds the wheel from the sdist) find the library's sources."""

    def make_release_tree(self, base_dir: str, files: List[str]) -> None:
        super().make_release_tree(base_dir, files)
        src = workspace()
        dst = Path(base_dir) / SDIST_CRATE
        ignore = shutil.ignore_patterns("target", "__pycache__", "*.pyc")
        for name in WORKSPACE_FILES + WORKSPACE_MEMBER_FILES:
            if (src / name).is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / name, dst / name)
        for name in WORKSPACE_DIRS:
            shutil.copytree(src / name, dst / name, ignore=ignore, dirs_exist_ok=True)
        for lic in src.glob("LICENSE*"):
            shutil.copy2(lic, dst / lic.name)


class FreshBuildPy(build_py):
    """Copies the package into an emptied build folder: an in-tree build (pip's default) reuses
    python/build/, where a module since removed from the sources would otherwise stay and be
    shipped."""

    def run(self) -> None:
        shutil.rmtree(Path(self.build_lib) / "qdirty", ignore_errors=True)
        super().run()


class PlatformWheel(bdist_wheel):
    """The wheel holds a C library loaded with ctypes, not an extension module: it suits every
    Python 3 on the platform it was built for (``py3-none-<platform>``)."""

    def get_tag(self) -> Tuple[str, str, str]:
        _python, _abi, plat = super().get_tag()
        if not self.distribution.has_ext_modules():
            return "py3", "none", "any"
        return "py3", "none", plat


def rust_extensions() -> List[Any]:
    if os.environ.get("QDIRTY_PYTHON_SYSTEM_LIB") == "1":
        return []
    from setuptools_rust import Binding, RustExtension, Strip

    manifest = workspace() / "Cargo.toml"
    return [
        RustExtension(
            "qdirty._libqdirty",
            path=os.path.relpath(manifest, HERE),
            binding=Binding.NoBinding,
            # A release build, even for editable installs; --locked: the Cargo.lock of the
            # repository, never a newer dependency resolved at build time.
            debug=False,
            args=["--locked"],
            # The release profile keeps line tables (debug = 1) for the C library's users;
            # the wheel does without them.
            strip=Strip.Debug,
            # Not a Python extension: the ABI-neutral file name, _libqdirty.abi3.so.
            py_limited_api=True,
        )
    ]


setup(
    rust_extensions=rust_extensions(),
    cmdclass={"sdist": SdistWithCrate, "build_py": FreshBuildPy, "bdist_wheel": PlatformWheel},
    zip_safe=False,
)
