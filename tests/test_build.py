"""The extension's build: the core's symbols stay inside it.

setup.py compiles with -fvisibility=hidden -fno-semantic-interposition. Without them, every
call between core functions inside the -fPIC shared object goes through the GOT, as if
another library could replace the function, and the cached alloc+free pair costs about a
quarter more. A build that lost the flags would still pass every other test, so this
one looks at what the shared object exports."""
import ctypes

import mtia_alloc._C as C


def test_only_the_module_init_is_exported():
    lib = ctypes.CDLL(C.__file__)
    assert hasattr(lib, "PyInit__C")
    # mtia::thread_cpu_ns(), mtia::native_pair_loop(...) and mtia::oom_observers(): plain core
    # functions (the last one holds state the binding uses: it must stay the extension's own).
    for core_symbol in ("_ZN4mtia13thread_cpu_nsEv", "_ZN4mtia16native_pair_loopERNS_9AllocatorEimm",
                        "_ZN4mtia13oom_observersEv"):
        assert not hasattr(lib, core_symbol), f"{core_symbol} is exported: built without -fvisibility=hidden?"
