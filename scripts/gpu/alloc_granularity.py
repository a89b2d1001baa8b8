# How much device memory do many small cuMemAlloc calls take? (driver API, no caching allocator)
import ctypes
cu = ctypes.CDLL("libcuda.so.1")
assert cu.cuInit(0) == 0
dev = ctypes.c_int(); cu.cuDeviceGet(ctypes.byref(dev), 0)
ctx = ctypes.c_void_p(); assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0
cu.cuCtxSetCurrent(ctx)
def free():
    f = ctypes.c_size_t(); t = ctypes.c_size_t(); cu.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)); return f.value
for size in [4, 8192, 917504, 3 << 20]:
    before = free(); ptrs = []
    for _ in range(200):
        p = ctypes.c_uint64(); assert cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size)) == 0; ptrs.append(p)
    used = before - free()
    print(f"200 x cuMemAlloc({size} B): {used/2**20:.1f} MiB used, {used/200/1024:.1f} KiB each")
    for p in ptrs: cu.cuMemFree_v2(p)
