"""`python -m mtia_alloc peer build` (issue 22, item 2): its failures are one line and exit
status 2 (no network, a missing or wrong --wheel), its pieces (pip command, symbol lists,
version script, compile commands) as plain functions, the emulated runtime's sources compile
and export what libc10_cuda.so imports (when g++ and CUDA 13 headers are here), and, when a
built peer is found, its figures on a shipped trace equal ours. No test uses the network."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from mtia_alloc.tools import peer_build as pb
from mtia_alloc.tools.bench_suite import _find_peer

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens

# what torch 2.13.0's libc10_cuda.so imports, versioned libcudart.so.13
TORCH_2_13_IMPORTS = """cudaDeviceCanAccessPeer cudaDeviceEnablePeerAccess cudaDeviceGetDefaultMemPool
cudaDeviceGetStreamPriorityRange cudaDeviceSynchronize cudaDriverGetVersion cudaEventCreateWithFlags cudaEventDestroy
cudaEventElapsedTime cudaEventQuery cudaEventRecord cudaEventSynchronize cudaFree cudaFreeAsync cudaGetDevice
cudaGetDeviceCount cudaGetDeviceProperties cudaGetDriverEntryPointByVersion cudaGetErrorName cudaGetErrorString
cudaGetLastError cudaGraphNodeGetDependencies cudaIpcCloseMemHandle cudaIpcGetMemHandle cudaIpcOpenMemHandle
cudaMalloc cudaMallocAsync cudaMemGetInfo cudaMemPoolGetAttribute cudaMemPoolSetAccess cudaMemPoolSetAttribute
cudaMemPoolTrimTo cudaMemcpy cudaMemcpyAsync cudaMemcpyPeerAsync cudaSetDevice cudaStreamCreateWithPriority
cudaStreamGetCaptureInfo cudaStreamIsCapturing cudaStreamQuery cudaStreamSynchronize cudaStreamWaitEvent
cudaThreadExchangeStreamCaptureMode""".split()


def cli(*args, env=None, timeout=300):
    e = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.pop("MTIA_TORCH_WHEEL", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "mtia_alloc", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("mtia_alloc: error: peer build: "), p.stderr
    return p.stderr


# ------------------------------------------------------------------ failures: one line, exit 2

def test_a_missing_wheel_is_one_line(tmp_path):
    err = one_error_line(cli("peer", "build", tmp_path / "b", "--wheel", tmp_path / "nope.whl"))
    assert f"--wheel: no file {tmp_path / 'nope.whl'}" in err


def test_a_missing_wheel_from_the_environment_is_one_line(tmp_path):
    err = one_error_line(cli("peer", "build", tmp_path / "b", env={"MTIA_TORCH_WHEEL": str(tmp_path / "x.whl")}))
    assert "no file" in err


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("objdump") and shutil.which("readelf")),
                    reason="the builder checks for its tools before it downloads")
def test_an_unreachable_index_is_one_line_that_names_the_wheel_workaround(tmp_path):
    err = one_error_line(cli("peer", "build", tmp_path / "b", "--index-url", UNREACHABLE_INDEX, timeout=600))
    assert "cannot download torch==2.13.0's CUDA wheel" in err and "--wheel PATH" in err, err
    assert "cannot be reached" in err, err
    assert (tmp_path / "b" / "build.log").is_file()


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("objdump") and shutil.which("readelf")),
                    reason="the builder checks for its tools before it opens the wheel")
def test_a_wheel_without_libc10_cuda_is_one_line(tmp_path):
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/__init__.py", "")
        z.writestr("torch/lib/libc10.so", "")
    err = one_error_line(cli("peer", "build", tmp_path / "b", "--wheel", wheel))
    assert "has no torch/lib/libc10_cuda.so" in err and "+cpu" in err, err
    not_a_zip = tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    not_a_zip.write_text("not a zip")
    err = one_error_line(cli("peer", "build", tmp_path / "b", "--wheel", not_a_zip))
    assert "cannot read the wheel" in err


def test_peer_without_a_subcommand_is_a_usage_error():
    p = cli("peer")
    assert p.returncode == 2 and p.stderr.startswith("mtia_alloc: error: ") and p.stderr.count("\n") == 1


# ------------------------------------------------------------------ the pieces

def test_pip_command_downloads_the_linux_cuda_wheel_isolated(monkeypatch):
    monkeypatch.delenv("PIP_CERT", raising=False)
    cmd = pb.pip_download_command("torch==2.13.0", "/d", python="py", machine="x86_64")
    assert cmd[:5] == ["py", "-m", "pip", "--isolated", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--dest") + 1] == "/d" and cmd[-1] == "torch==2.13.0"
    assert ["--platform", "manylinux_2_28_x86_64"] == cmd[cmd.index("--platform"):cmd.index("--platform") + 2]
    assert "--index-url" not in cmd and "--cert" not in cmd
    monkeypatch.setenv("PIP_CERT", "/ca.pem")
    cmd = pb.pip_download_command("torch==2.13.0", "/d", index_url="http://i/simple", python="py")
    assert cmd[cmd.index("--index-url") + 1] == "http://i/simple" and cmd[cmd.index("--cert") + 1] == "/ca.pem"


def test_pip_reads_no_configuration_file():
    env = pb.pip_environment({"PATH": "/bin", "PIP_CONFIG_FILE": "/etc/pip.conf"})
    assert env == {"PATH": "/bin", "PIP_CONFIG_FILE": os.devnull}


def test_pip_error_line_picks_the_last_error():
    out = ("Looking in indexes: http://x\nWARNING: Retrying ...\n"
           "ERROR: Could not find a version that satisfies the requirement torch==9.9 (from versions: none)\n"
           "ERROR: No matching distribution found for torch==9.9\n")
    assert pb.pip_error_line(out) == "No matching distribution found for torch==9.9"
    assert pb.pip_error_line("") == "no output"
    assert pb.pip_error_line("ERROR: Exception:\nERROR: something else\n") == "something else"
    refused = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError('<obj>: Failed to "
               "establish a new connection: [Errno 111] Connection refused')': /simple/torch/\n"
               "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/\n")
    assert pb.pip_error_line(refused) == ("the package index cannot be reached: Failed to establish a new "
                                          "connection: [Errno 111] Connection refused")
    assert len(pb.pip_error_line("ERROR: " + "x" * 500)) == 200


OBJDUMP = """
/x/libc10_cuda.so:     file format elf64-x86-64

DYNAMIC SYMBOL TABLE:
0000000000000000      DF *UND*\t0000000000000000 (libcudart.so.13) cudaMalloc
0000000000000000      DF *UND*\t0000000000000000 (libcudart.so.13) cudaFree
0000000000000000      DF *UND*\t0000000000000000 (GLIBC_2.2.5) malloc
0000000000000000      DF *UND*\t0000000000000000 (libcudart.so.13) cudaMalloc
0000000000012340 g    DF .text\t0000000000000010  Base        _ZN3c104cuda12device_countEv
"""


def test_symbol_lists_from_objdump():
    assert pb.parse_needed_symbols(OBJDUMP) == ["cudaFree", "cudaMalloc"]
    ours = ("0000000000000000 g    DO *ABS*\t0000000000000000  libcudart.so.13 libcudart.so.13\n"
            "00000000000036b0 g    DF .text\t00000000000006ff  libcudart.so.13 cudaMalloc\n"
            "0000000000000000      DF *UND*\t0000000000000000 (GLIBC_2.2.5) mmap\n")
    assert pb.parse_provided_symbols(ours) == ["cudaMalloc", "libcudart.so.13"]


def test_needed_libraries_from_readelf():
    text = (" 0x0000000000000001 (NEEDED)             Shared library: [libcudart.so.13]\n"
            " 0x0000000000000001 (NEEDED)             Shared library: [libc10.so]\n"
            " 0x000000000000000f (RPATH)              Library rpath: [$ORIGIN]\n")
    assert pb.parse_needed_libs(text) == ["libcudart.so.13", "libc10.so"]


def test_version_script_and_compile_commands(tmp_path):
    assert pb.version_script().startswith("libcudart.so.13 {") and "cuda*;" in pb.version_script()
    cmds = dict(pb.compile_commands(tmp_path, "/cuda/include", "/torch/include", cxx="c++"))
    runtime, nvml, harness = cmds["emulated CUDA runtime"], cmds["emulated NVML"], cmds["replay harness"]
    assert runtime[0] == "c++" and "-shared" in runtime and "-I/cuda/include" in runtime
    assert f"-Wl,--version-script={tmp_path / 'cudart.map'}" in runtime and "-Wl,-soname,libcudart.so.13" in runtime
    assert runtime[-1] == str(tmp_path / "lib" / "libcudart.so.13")
    assert nvml[-1] == str(tmp_path / "lib" / "libnvidia-ml.so.1") and "-Wl,-soname,libnvidia-ml.so.1" in nvml
    assert "-I/torch/include" in harness and "-Wl,-rpath,$ORIGIN/../lib" in harness
    assert harness[-1] == str(tmp_path / "bin" / "harness")
    for cmd in cmds.values():
        assert all(pathlib.Path(a).is_file() for a in cmd if a.endswith(".cpp")), cmd


def test_find_cuda_headers_checks_the_version(tmp_path):
    for name, version in (("cuda12", 12080), ("cuda13", 13000)):
        inc = tmp_path / name
        inc.mkdir()
        (inc / "cuda.h").write_text("")
        (inc / "cuda_runtime_api.h").write_text(f"#define CUDART_VERSION  {version}\n")
    assert pb.find_cuda_headers([str(tmp_path / "none"), str(tmp_path / "cuda12"), str(tmp_path / "cuda13")]) == \
        str(tmp_path / "cuda13")
    assert pb.find_cuda_headers([str(tmp_path / "cuda12")]) is None


def test_the_default_build_dir_is_where_bench_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MTIA_TORCH_PEER", raising=False)
    assert pb.default_build_dir() == str(tmp_path / "mtia_alloc" / "torch_peer")
    harness = tmp_path / "mtia_alloc" / "torch_peer" / "bin" / "harness"
    harness.parent.mkdir(parents=True)
    harness.write_text("#!/bin/sh\n")
    harness.chmod(0o755)
    assert _find_peer(None) == pb.default_build_dir()


# ------------------------------------------------------------------ the sources compile

CUDA_INCLUDE = pb.find_cuda_headers()


@pytest.mark.skipif(not shutil.which("g++") or CUDA_INCLUDE is None or not shutil.which("objdump"),
                    reason="needs g++, objdump and CUDA 13 headers")
def test_the_emulated_runtime_compiles_and_exports_what_libc10_cuda_imports(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "cudart.map").write_text(pb.version_script())
    cmds = dict(pb.compile_commands(tmp_path, CUDA_INCLUDE, "/unused"))
    for what in ("emulated CUDA runtime", "emulated NVML"):
        p = subprocess.run(cmds[what], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    dump = subprocess.run(["objdump", "-T", str(tmp_path / "lib" / "libcudart.so.13")], capture_output=True,
                          text=True).stdout
    assert not set(TORCH_2_13_IMPORTS) - set(pb.parse_provided_symbols(dump))
    nvml = subprocess.run(["objdump", "-T", str(tmp_path / "lib" / "libnvidia-ml.so.1")], capture_output=True,
                          text=True).stdout
    for name in ("nvmlInit_v2", "nvmlDeviceGetHandleByPciBusId_v2", "nvmlSystemGetCudaDriverVersion_v2"):
        assert name in nvml
    assert "nvmlDeviceGetGpuFabricInfoV" not in nvml


# ------------------------------------------------------------------ a built peer agrees with us

PEER = _find_peer(None)


@pytest.mark.skipif(PEER is None, reason="no built peer ($MTIA_TORCH_PEER, `peer build`'s folder, /tmp/tcap)")
@pytest.mark.parametrize("conf", ["expandable_segments:False", "expandable_segments:True"])
def test_a_built_peer_gives_our_peaks_and_device_allocations(conf):
    p = cli("replay", "resnet50_train", "--json", "--repeat", "2", "--conf", conf, "--compare-torch", PEER)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    ours, theirs = rows[:2], rows[2:]
    assert [r["mode"] for r in theirs] == ["torch.pass1", "torch.pass2"]
    for a, b in zip(ours, theirs):
        for key in ("events", "peak_requested_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
                    "num_device_alloc", "num_device_free", "num_ooms"):
            assert a[key] == b[key], (key, a, b)
    assert ours[0]["num_device_alloc"] > 0


@pytest.mark.skipif(PEER is None, reason="no built peer")
def test_a_built_peer_agrees_on_a_small_device_too():
    """3 GiB for gpt2_train's 4.8 GiB: flushes, retries and out-of-memory failures alike."""
    p = cli("replay", "gpt2_train", "--json", "--memory", "3GiB", "--allow-oom", "--compare-torch", PEER)
    assert p.returncode == 0, p.stderr
    ours, theirs = [json.loads(line) for line in p.stdout.splitlines()]
    assert ours["num_ooms"] > 0
    for key in ("peak_reserved_bytes", "num_device_alloc", "num_device_free", "num_alloc_retries", "num_ooms"):
        assert ours[key] == theirs[key], (key, ours, theirs)


@pytest.mark.skipif(PEER is None, reason="no built peer")
def test_a_built_peer_runs_the_synthetic_pair_loop_bench_reads():
    out = subprocess.run([os.path.join(PEER, "bin", "harness"), "synthetic", "--n", "20000", "--size", "4096"],
                         capture_output=True, text=True, timeout=300).stdout
    line = next(ln for ln in out.splitlines() if "thread_cpu_ns_per_pair:" in ln)
    assert float(line.split("thread_cpu_ns_per_pair:")[1].split()[0]) > 0


# ------------------------------------------------------------------ a whole build from a wheel at hand

def _wheel_at_hand():
    import glob
    found = [os.environ.get("MTIA_TORCH_WHEEL", "")]
    for folder in ("/tmp/tcap/wheels", os.path.join(pb.default_build_dir(), "wheels")):
        found += sorted(glob.glob(os.path.join(folder, "torch-2.13.0-*.whl")))
    return next((w for w in found if w and os.path.isfile(w) and "+cpu" not in w), None)


WHEEL = _wheel_at_hand()


@pytest.mark.skipif(WHEEL is None or CUDA_INCLUDE is None or not shutil.which("g++"),
                    reason="needs a torch 2.13.0 CUDA wheel at hand ($MTIA_TORCH_WHEEL), g++ and CUDA 13 headers")
def test_a_whole_build_from_a_wheel_agrees_with_us(tmp_path):
    build = tmp_path / "peer"
    p = cli("peer", "build", build, "--wheel", WHEEL, timeout=900)
    assert p.returncode == 0, p.stderr
    assert "peer build: done:" in p.stdout and (build / "bin" / "harness").is_file()
    assert len((build / "needed_cudart_symbols.txt").read_text().split()) == len(TORCH_2_13_IMPORTS)
    p = cli("replay", "gpt2_train", "--json", "--compare-torch", build)
    assert p.returncode == 0, p.stderr
    ours, theirs = [json.loads(line) for line in p.stdout.splitlines()]
    for key in ("events", "peak_requested_bytes", "peak_allocated_bytes", "peak_reserved_bytes", "num_device_alloc"):
        assert ours[key] == theirs[key], key
