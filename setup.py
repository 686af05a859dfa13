"""Builds mtia_alloc's extensions: mtia_alloc._C, the Cython binding compiled together with
the C++17 core in src_cpp/, and mtia_alloc.viz._pickle_reader, the snapshot pickle reader. MTIA_ALLOC_SANITIZE=1 builds it with
AddressSanitizer and UndefinedBehaviorSanitizer (used by .ci/run)."""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

sanitize = os.environ.get("MTIA_ALLOC_SANITIZE") == "1"
# Hidden visibility and no semantic interposition: the extension exports only its module
# init, so calls between core functions are direct (or inlined) instead of going through
# the GOT as if another library could replace them (tests/test_build.py checks).
compile_args = ["-std=c++17", "-O2" if sanitize else "-O3", "-fno-plt", "-fvisibility=hidden", "-fno-semantic-interposition",
                "-Wall", "-Wno-unused-function"]
link_args = ["-lpthread"]
if sanitize:
    flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    compile_args += flags
    link_args += flags

core_sources = sorted(glob.glob("src_cpp/*.cpp"))
# setuptools tracks no #include: a header, .pxd or .pxi change must rebuild the extension
# (every source of it: a changed class layout in a header affects every object file).
core_depends = sorted(glob.glob("src_cpp/*.h") + glob.glob("mtia_alloc/_core/*.pxd") + glob.glob("mtia_alloc/*.pxi"))

ext = Extension(
    "mtia_alloc._C",
    sources=["mtia_alloc/_C.pyx"] + core_sources,
    include_dirs=["src_cpp", "mtia_alloc"],
    depends=core_depends,
    language="c++",
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

# The snapshot pickle reader (viz.columns): a C extension of its own, no C++ core.
reader = Extension(
    "mtia_alloc.viz._pickle_reader",
    sources=["mtia_alloc/viz/_pickle_reader.pyx"],
    extra_compile_args=["-O2", "-fvisibility=hidden", "-Wno-unused-function"] + (flags if sanitize else []),
    extra_link_args=flags if sanitize else [],
)

setup(ext_modules=cythonize([ext, reader], language_level=3, compiler_directives={"embedsignature": True}))
