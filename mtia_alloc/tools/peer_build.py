"""`python -m mtia_alloc peer build [DIR]`: builds the PyTorch peer that `bench` and
`replay --compare-torch` compare with: PyTorch's own CUDACachingAllocator (the unmodified
libc10_cuda.so and libc10.so of torch's CUDA wheel from PyPI) running on an emulated CUDA
runtime, driven by a replay harness. Nothing here needs a GPU, a driver or a CUDA toolkit.

Steps: (1) the torch wheel: --wheel PATH (or $MTIA_TORCH_WHEEL), one already in DIR/wheels,
or `pip --isolated download --no-deps --only-binary=:all: --platform manylinux_2_28_<arch>`
with PIP_CONFIG_FILE=/dev/null (no pip configuration is read: local mirrors, find-links and
constraints can hand back the +cpu wheel, which has no libc10_cuda.so);
(2) libc10.so, libc10_cuda.so and the c10 headers are extracted from it; (3) the libcudart
symbols libc10_cuda.so imports are read with `objdump -T`; (4) CUDA 13 headers: $CUDA_HOME,
/usr/local/cuda-13*, /usr/local/cuda, else the nvidia-cuda-runtime and nvidia-cuda-crt
wheels; (5) g++ compiles the sources of tools/peer/ into DIR/lib/libcudart.so.13 (every
imported symbol checked present), DIR/lib/libnvidia-ml.so.1 and DIR/bin/harness; (6) a
smoke test. The build log is DIR/build.log.

Failures are InputError (exit status 2, one line): no network or no such wheel (with the
--wheel workaround), a wheel without libc10_cuda.so, no compiler, a failed compilation.

Owns: build, add_commands, default_build_dir, and the builder's pieces as plain functions
(pip_download_command, parse_needed_symbols, parse_needed_libs, version_script,
compile_commands, find_cuda_headers, pip_environment, pip_error_line). Relies on: tools.exit_status."""
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .exit_status import InputError

SOURCES = Path(__file__).resolve().parent / "peer"
DEFAULT_TORCH_VERSION = "2.13.0"
CUDART_SONAME = "libcudart.so.13"
# the headers-only fallback when no CUDA 13 toolkit is installed (include/ of nvidia/cu13)
HEADER_WHEELS = ("nvidia-cuda-runtime==13.0.96", "nvidia-cuda-crt==13.0.88")
TORCH_MEMBERS = ("torch/lib/libc10.so", "torch/lib/libc10_cuda.so", "torch/include/c10/",
                 "torch/include/torch/headeronly/")
WORKAROUND = ("download the wheel where you can (pip download --no-deps --only-binary=:all: --platform "
              "manylinux_2_28_x86_64 torch=={v}) and pass --wheel PATH (or set MTIA_TORCH_WHEEL)")


def default_build_dir():
    """Where `peer build` builds without DIR, and where `bench` looks for the peer:
    $XDG_CACHE_HOME/mtia_alloc/torch_peer (~/.cache/... by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mtia_alloc", "torch_peer")


def _platform_tags(machine=None):
    machine = machine or platform.machine()
    return [f"manylinux_2_28_{machine}", f"manylinux_2_17_{machine}", f"manylinux2014_{machine}"]


def pip_download_command(requirement, dest, index_url=None, python=None, machine=None):
    """The pip command that downloads one binary wheel for Linux (never the local +cpu build)."""
    cmd = [python or sys.executable, "-m", "pip", "--isolated", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--progress-bar", "off", "--disable-pip-version-check", "--retries", "2",
           "--timeout", "30"]
    for tag in _platform_tags(machine):
        cmd += ["--platform", tag]
    if index_url:
        cmd += ["--index-url", index_url]
    if os.environ.get("PIP_CERT"):  # --isolated ignores PIP_* variables: a CA bundle is passed on by hand
        cmd += ["--cert", os.environ["PIP_CERT"]]
    return cmd + [requirement]


_NO_SUCH_WHEEL = re.compile(r"No matching distribution found for \S+")
_NO_NETWORK = re.compile(r"Failed to establish a new connection: [^'\")]*|Temporary failure in name resolution|"
                         r"Name or service not known|Network is unreachable|Read timed out|ProxyError[^'\")]*|"
                         r"CERTIFICATE_VERIFY_FAILED[^'\")]*")


def pip_environment(environ=None):
    """pip's environment: PIP_CONFIG_FILE=/dev/null makes pip read no configuration file at
    all. --isolated alone still reads the global ones (/etc/pip.conf, /etc/xdg/pip/pip.conf),
    whose find-links, extra indexes and constraints can hand back a +cpu wheel."""
    env = dict(os.environ if environ is None else environ)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def pip_error_line(output):
    """What pip's output says about why it failed, in a few words: the index cannot be
    reached (and why), no such wheel, else its last ERROR line; shortened."""
    network, m = _NO_NETWORK.search(output), _NO_SUCH_WHEEL.search(output)
    if network:  # then pip also finds no wheel: the network is the reason
        line = f"the package index cannot be reached: {network[0].strip()}"
    elif m:
        line = m[0]
    else:
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        line = re.sub(r"^ERROR:\s*", "", errors[-1] if errors else (lines[-1] if lines else "no output"))
    return line if len(line) <= 200 else line[:197] + "..."


def parse_needed_symbols(objdump_text, soname=CUDART_SONAME):
    """Sorted names of the dynamic symbols `objdump -T` lists as undefined (*UND*) and
    versioned `soname` (what libc10_cuda.so imports from the CUDA runtime)."""
    out = set()
    for line in objdump_text.splitlines():
        if "*UND*" in line and f"({soname})" in line:
            out.add(line.split()[-1])
    return sorted(out)


def parse_provided_symbols(objdump_text, soname=CUDART_SONAME):
    """Names a library defines with the version `soname` (`objdump -T`, not *UND*)."""
    out = set()
    for line in objdump_text.splitlines():
        parts = line.split()
        if "*UND*" not in line and soname in parts and len(parts) >= 2 and parts[-2] == soname:
            out.add(parts[-1])
    return sorted(out)


def parse_needed_libs(readelf_text):
    """The NEEDED entries of `readelf -d`."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf_text)


def version_script(soname=CUDART_SONAME):
    """The linker version script of the emulated runtime: every exported cuda* symbol gets
    the version node libc10_cuda.so asks for."""
    return f"{soname} {{\n  global:\n    cuda*;\n  local:\n    *;\n}};\n"


def compile_commands(build, cuda_include, torch_include, cxx="g++", sources=SOURCES):
    """[(what, argv)] compiling the emulated runtime, the emulated NVML and the harness."""
    build, sources = Path(build), Path(sources)
    lib, flags = build / "lib", ["-O2", "-std=c++17", "-fPIC"]
    return [
        ("emulated CUDA runtime", [cxx, *flags, "-shared", "-fvisibility=hidden", f"-I{cuda_include}",
                                   str(sources / "emu_cudart.cpp"), f"-Wl,--version-script={build / 'cudart.map'}",
                                   f"-Wl,-soname,{CUDART_SONAME}", "-o", str(lib / CUDART_SONAME)]),
        ("emulated NVML", [cxx, *flags, "-shared", "-fvisibility=hidden", str(sources / "emu_nvml.cpp"),
                           "-Wl,-soname,libnvidia-ml.so.1", "-o", str(lib / "libnvidia-ml.so.1")]),
        ("replay harness", [cxx, "-O2", "-std=c++17", "-DNDEBUG", f"-I{torch_include}", f"-I{cuda_include}",
                            str(sources / "replay_harness.cpp"), f"-L{lib}", "-lc10_cuda", "-lc10",
                            f"-l:{CUDART_SONAME}", "-Wl,-rpath,$ORIGIN/../lib", "-o", str(build / "bin" / "harness")]),
    ]


def _is_cuda13(include):
    api = Path(include) / "cuda_runtime_api.h"
    if not (api.is_file() and (Path(include) / "cuda.h").is_file()):
        return False
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", api.read_text(errors="replace"))
    return bool(m) and 13000 <= int(m[1]) < 14000


def find_cuda_headers(candidates=None):
    """The include folder of an installed CUDA 13 toolkit, or None."""
    if candidates is None:
        roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
        roots += sorted((str(p) for p in Path("/usr/local").glob("cuda-13*")), reverse=True) + ["/usr/local/cuda"]
        candidates = [os.path.join(r, "include") for r in roots if r]
    return next((c for c in candidates if _is_cuda13(c)), None)


class _Log:
    def __init__(self, path, quiet=False):
        self.path, self.quiet = path, quiet
        self.file = open(path, "w", encoding="utf-8")

    def say(self, text):
        self.file.write(f"== {text}\n")
        self.file.flush()
        if not self.quiet:
            print(f"peer build: {text}", flush=True)

    def run(self, cmd, what, timeout=3600, env=None):
        self.file.write("$ " + " ".join(map(str, cmd)) + "\n")
        self.file.flush()
        try:
            proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
        except FileNotFoundError:
            raise InputError(f"peer build: {what}: {cmd[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise InputError(f"peer build: {what}: no answer after {timeout} s") from None
        self.file.write(proc.stdout + proc.stderr)
        self.file.flush()
        return proc


def _download(log, requirement, dest, index_url, what):
    log.say(f"downloading {requirement} with pip ({what})")
    proc = log.run(pip_download_command(requirement, dest, index_url), f"pip download {requirement}",
                   env=pip_environment())
    if proc.returncode != 0:
        return pip_error_line(proc.stdout + "\n" + proc.stderr)
    return None


def _find_torch_wheel(folder, version):
    for p in sorted(Path(folder).glob(f"torch-{version}-*.whl")):
        if "+cpu" not in p.name:
            return p
    return None


def _extract(wheel, dest, members):
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if any(n == m or (m.endswith("/") and n.startswith(m)) for m in members)]
            missing = [m for m in members if not any(n == m or n.startswith(m) for n in names)]
            if missing:
                return missing
            z.extractall(dest, names)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"peer build: cannot read the wheel {wheel}: {e}") from None
    return []


def _tool_output(log, cmd, what):
    proc = log.run(cmd, what)
    if proc.returncode != 0:
        raise InputError(f"peer build: {what} failed: {pip_error_line(proc.stderr or proc.stdout)}")
    return proc.stdout


def _first_error(text):
    for line in text.splitlines():
        if "error" in line:
            return line.strip()[:240]
    return (text.strip().splitlines() or ["no output"])[-1][:240]


def build(build_dir=None, wheel=None, torch_version=DEFAULT_TORCH_VERSION, index_url=None, cxx=None,
          header_source="auto", quiet=False):
    """Builds the peer into build_dir (see the module docstring); returns its path. Raises
    InputError (one line) when it cannot."""
    build = Path(build_dir or default_build_dir()).expanduser().resolve()
    wheel = wheel or os.environ.get("MTIA_TORCH_WHEEL") or None
    if wheel is not None and not Path(wheel).is_file():
        raise InputError(f"peer build: --wheel: no file {wheel}")
    if platform.system() != "Linux":
        raise InputError(f"peer build: the peer runs on Linux only (this is {platform.system()})")
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise InputError(f"peer build: no C++ compiler '{cxx}' (install g++, or set CXX)")
    for tool in ("objdump", "readelf"):
        if shutil.which(tool) is None:
            raise InputError(f"peer build: {tool} not found (install binutils)")
    for sub in ("wheels", "ext", "lib", "bin"):
        try:
            (build / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"peer build: cannot create {build / sub}: {e.strerror or e}") from None
    log = _Log(build / "build.log", quiet)
    log.say(f"building in {build} (log: {build / 'build.log'})")

    # 1. the torch wheel
    if wheel is None:
        wheel = _find_torch_wheel(build / "wheels", torch_version)
        if wheel is None:
            why = _download(log, f"torch=={torch_version}", build / "wheels", index_url,
                            "the CUDA build, about 530 MB")
            wheel = _find_torch_wheel(build / "wheels", torch_version)
            if why or wheel is None:
                why = why or "pip returned no CUDA wheel"
                raise InputError(f"peer build: cannot download torch=={torch_version}'s CUDA wheel ({why}): "
                                 + WORKAROUND.format(v=torch_version))
    log.say(f"torch wheel: {wheel}")

    # 2. the allocator's libraries and headers
    ext = build / "ext"
    missing = _extract(wheel, ext, TORCH_MEMBERS)
    if missing:
        raise InputError(f"peer build: {Path(wheel).name} has no {', '.join(missing)}: a CUDA build of torch "
                         f"for Linux is needed (the +cpu wheels have no libc10_cuda.so)")
    for name in ("libc10.so", "libc10_cuda.so"):
        shutil.copyfile(ext / "torch/lib" / name, build / "lib" / name)

    # 3. what libc10_cuda.so imports from the CUDA runtime
    c10_cuda = build / "lib" / "libc10_cuda.so"
    needed_libs = parse_needed_libs(_tool_output(log, ["readelf", "-d", c10_cuda], "readelf -d libc10_cuda.so"))
    if CUDART_SONAME not in needed_libs:
        other = next((n for n in needed_libs if n.startswith("libcudart")), "no libcudart")
        raise InputError(f"peer build: this libc10_cuda.so needs {other}; the emulated runtime implements "
                         f"{CUDART_SONAME} (CUDA 13 builds of torch, e.g. 2.13.0)")
    needed = parse_needed_symbols(_tool_output(log, ["objdump", "-T", c10_cuda], "objdump -T libc10_cuda.so"))
    (build / "needed_cudart_symbols.txt").write_text("\n".join(needed) + "\n")
    log.say(f"libc10_cuda.so imports {len(needed)} symbols of {CUDART_SONAME}")

    # 4. CUDA 13 headers
    cuda_include = None if header_source == "wheel" else find_cuda_headers()
    if cuda_include is None:
        for req in HEADER_WHEELS:
            name = req.split("==")[0].replace("-", "_")
            have = sorted((build / "wheels").glob(f"{name}-*.whl"))
            if not have:
                why = _download(log, req, build / "wheels", index_url, "CUDA 13 headers, a few MB")
                have = sorted((build / "wheels").glob(f"{name}-*.whl"))
                if why or not have:
                    raise InputError(f"peer build: no CUDA 13 toolkit here and cannot download {req} for its "
                                     f"headers ({why or 'no wheel'}): install the CUDA 13 toolkit's headers "
                                     f"(or set CUDA_HOME)")
            _extract(have[0], ext, ("nvidia/cu13/include/",))
        cuda_include = str(ext / "nvidia/cu13/include")
    log.say(f"CUDA headers: {cuda_include}")

    # 5. compile
    (build / "cudart.map").write_text(version_script())
    for what, cmd in compile_commands(build, cuda_include, ext / "torch/include", cxx):
        log.say(f"compiling the {what}")
        proc = log.run(cmd, f"compiling the {what}")
        if proc.returncode != 0:
            raise InputError(f"peer build: compiling the {what} failed: {_first_error(proc.stderr)} "
                             f"(full log: {build / 'build.log'})")
        if what == "emulated CUDA runtime":
            provided = parse_provided_symbols(_tool_output(log, ["objdump", "-T", build / "lib" / CUDART_SONAME],
                                                           "objdump -T libcudart.so.13"))
            lacking = sorted(set(needed) - set(provided))
            if lacking:
                raise InputError(f"peer build: this libc10_cuda.so imports CUDA runtime functions the emulated "
                                 f"runtime lacks: {', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")

    # 6. smoke test
    proc = log.run([build / "bin" / "harness", "synthetic", "--n", "20000", "--size", "4096"], "smoke test", 300)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        raise InputError(f"peer build: the harness does not run: {_first_error(proc.stderr or proc.stdout)} "
                         f"(full log: {build / 'build.log'})")
    log.say(f"done: {build / 'bin' / 'harness'} (python -m mtia_alloc bench --torch-build {build}, "
            f"or replay --compare-torch {build})")
    return build


def _build_cmd(args):
    build(args.dir, wheel=args.wheel, torch_version=args.torch_version, index_url=args.index_url,
          header_source="wheel" if args.headers_from_wheels else "auto")
    return 0


def add_commands(sub):
    """Adds `peer build` to the main parser's subcommands."""
    p = sub.add_parser("peer", help="build PyTorch's caching allocator as a CPU-only peer for bench and replay")
    psub = p.add_subparsers(dest="peer_command", required=True, metavar="{build}")
    b = psub.add_parser("build", help="download torch's CUDA wheel and build the peer harness (no GPU needed)")
    b.add_argument("dir", nargs="?", help=f"build folder (default: {default_build_dir()}, where bench looks)")
    b.add_argument("--wheel", metavar="PATH", help="use this torch wheel (a CUDA 13 Linux build) instead of "
                                                   "downloading one (default: $MTIA_TORCH_WHEEL)")
    b.add_argument("--torch-version", default=DEFAULT_TORCH_VERSION,
                   help=f"torch version to download (default {DEFAULT_TORCH_VERSION}; CUDA 13 builds only)")
    b.add_argument("--index-url", help="package index for pip (default: PyPI)")
    b.add_argument("--headers-from-wheels", action="store_true",
                   help="take the CUDA 13 headers from the nvidia-cuda-runtime/-crt wheels even when a toolkit "
                        "is installed")
    b.set_defaults(func=_build_cmd)
