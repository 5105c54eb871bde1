// The table of Triton kernels compiled ahead of time (generated: triton_variants.c, by
// `python -m trtllm_twotower.plugins.aot`). One or two rows per kernel variant: compiled with some
// arguments promised divisible by 16 (pointers: their address), then without any such promise.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char* key;            // "module.kernel(arg types)[constexprs]wN" (aot.variant_key)
    const int* divisible;       // runtime-argument indices promised divisible by 16
    int num_divisible;
    const char* function;       // the kernel's name in the cubin
    const unsigned char* cubin;
    unsigned long cubin_bytes;
    unsigned int shared_bytes;  // dynamic shared memory of a launch
    unsigned int num_warps;
} TwoTowerVariant;

extern const TwoTowerVariant twotower_variants[];
extern const int twotower_num_variants;

#ifdef __cplusplus
}
#endif
