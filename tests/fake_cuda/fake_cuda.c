// A stand-in for the CUDA driver (libcuda) on a machine without a GPU: it records every kernel
// launch (function, grid, block, shared memory, stream and the raw 8-byte argument slots) instead
// of running it, so tests can check what the plugin library would launch. Modules remember the
// image they were loaded from; functions their module and name.
#include <cuda.h>
#include <stdint.h>
#include <string.h>

#define MAX_MODULES 4096
#define MAX_LAUNCHES 65536
#define MAX_PARAMS 64

typedef struct {
    const void* image;
    char name[256];
    int module;
} FakeFunction;

typedef struct {
    int function;  // index into the functions, from 0
    unsigned grid[3], block[3], shared;
    uint64_t stream;
    int num_params;
    uint64_t params[MAX_PARAMS];
} FakeLaunch;

static const void* modules[MAX_MODULES];
static int num_modules;
static FakeFunction functions[MAX_MODULES];
static int num_functions;
static FakeLaunch launches[MAX_LAUNCHES];
static int num_launches;
static uintptr_t current_context = 0x1000;

void fake_reset(void) { num_launches = 0; }
void fake_set_context(uintptr_t context) { current_context = context; }
int fake_num_launches(void) { return num_launches; }
int fake_num_modules(void) { return num_modules; }
const FakeLaunch* fake_launch(int i) { return i >= 0 && i < num_launches ? &launches[i] : 0; }
const void* fake_function_image(int i) { return i >= 0 && i < num_functions ? functions[i].image : 0; }
const char* fake_function_name(int i) { return i >= 0 && i < num_functions ? functions[i].name : 0; }

CUresult cuCtxGetCurrent(CUcontext* context) {
    *context = (CUcontext)current_context;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* device) {
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice device) {
    (void)device;
    *value = attribute == CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN ? 232448 : 0;  // an H100's
    return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (num_modules == MAX_MODULES) return CUDA_ERROR_OUT_OF_MEMORY;
    modules[num_modules] = image;
    *module = (CUmodule)(uintptr_t)(++num_modules);
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
    if (num_functions == MAX_MODULES) return CUDA_ERROR_OUT_OF_MEMORY;
    FakeFunction* f = &functions[num_functions];
    f->module = (int)(uintptr_t)module - 1;
    f->image = modules[f->module];
    strncpy(f->name, name, sizeof f->name - 1);
    *function = (CUfunction)(uintptr_t)(++num_functions);
    return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction function, CUfunction_attribute attribute, int value) {
    (void)function, (void)attribute, (void)value;
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char** text) {
    *text = error == CUDA_SUCCESS ? "no error" : "fake driver error";
    return CUDA_SUCCESS;
}

// The argument list ends at its first NULL entry (the plugin library's launcher appends one).
CUresult cuLaunchKernel(CUfunction function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream stream, void** params, void** extra) {
    (void)extra;
    if (num_launches == MAX_LAUNCHES) return CUDA_ERROR_OUT_OF_MEMORY;
    FakeLaunch* l = &launches[num_launches++];
    l->function = (int)(uintptr_t)function - 1;
    l->grid[0] = gx, l->grid[1] = gy, l->grid[2] = gz;
    l->block[0] = bx, l->block[1] = by, l->block[2] = bz;
    l->shared = shared;
    l->stream = (uint64_t)(uintptr_t)stream;
    l->num_params = 0;
    for (int i = 0; params[i] != 0 && i < MAX_PARAMS; ++i) {
        memcpy(&l->params[i], params[i], 8);
        l->num_params = i + 1;
    }
    return CUDA_SUCCESS;
}
