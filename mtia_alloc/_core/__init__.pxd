# mtia_alloc._core: Cython declarations of the C++ core, one .pxd per header of src_cpp/
# that the binding uses (src_cpp/X.h -> mtia_alloc/_core/X.pxd). Declarations only: no
# code, no policy. Cimported by mtia_alloc/_C.pyx; there is no Python package here.
