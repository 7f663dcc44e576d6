"""Where the package meets other libraries' machinery rather than the method: bitsandbytes 4-bit loading, its checks
and CPU guard (quantization); several processes torn down cleanly at exit (teardown)."""
