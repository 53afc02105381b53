"""turbomind: the CUDA performance engine. Kernels in kernels/*.cu, compiled at run time through NVRTC."""
