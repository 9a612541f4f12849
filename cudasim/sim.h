// The CUDA simulator's device header: what Flint's kernels use of CUDA C++, for the host.
// The simulator's NVRTC (cudasim/nvrtc) puts it in front of the unchanged kernel source and
// compiles the unit with the system C++ compiler into a shared object; the simulated driver
// (cudasim/src) loads it and runs each CUDA thread as a fiber on the CPU.
//
// - threadIdx & co. read the running fiber's context (`__flint_cur`, set by the trampoline
//   and restored after every call that may switch fibers).
// - `__shared__` variables are `static thread_local`: all fibers of a block run on one OS
//   thread, so they share one copy, and blocks on other OS threads have their own. The
//   driver fills them with 0xff bytes (a NaN in every float format) before each block.
// - Barriers and warp intrinsics call into the driver (`__flint_api`), which switches fibers.
#pragma once
#define FLINT_SIM 1

#include <cmath>
#include <cstdint>
#include <cstdio> // printf, as device code has it
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };

// One CUDA thread's context; the driver's `ThreadCtx` (#[repr(C)]) is the same layout.
struct __flint_thread {
    uint3 tid;
    uint3 bid;
    dim3 bdim;
    dim3 gdim;
    void* dyn_smem;
};

// What the driver provides; its `Api` (#[repr(C)]) is the same layout.
struct __flint_api_t {
    void (*syncthreads)(void);
    // A warp collective: op, the lanes it names, this lane's input and output.
    void (*warp)(unsigned op, unsigned mask, const void* in, void* out);
    void (*trap)(const char* what);
    // Race checking: a load or store of `size` bytes of shared memory.
    void (*access)(const void* p, unsigned long size, int write);
};

// One kernel unit is one translation unit: these are its definitions (the driver sets
// `__flint_api` through dlsym when it loads the unit).
extern "C" {
__flint_api_t __flint_api;
}
thread_local __flint_thread* __flint_cur = nullptr;

#define threadIdx (__flint_cur->tid)
#define blockIdx (__flint_cur->bid)
#define blockDim (__flint_cur->bdim)
#define gridDim (__flint_cur->gdim)
#define warpSize 32

#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#ifdef __FLINT_SIM_SCAN
// The first pass (the preprocessor alone) finds the kernels by these markers.
#define __global__ __flint_global
#define __launch_bounds__(...) __flint_lb(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif

// ---- barriers and warp collectives (the fiber may switch inside these) ----------------
#define __FLINT_SWITCH(call)               \
    do {                                   \
        __flint_thread* __me = __flint_cur; \
        call;                              \
        __flint_cur = __me;                \
    } while (0)

inline void __syncthreads() { __FLINT_SWITCH(__flint_api.syncthreads()); }
inline void __trap() { __flint_api.trap("__trap()"); }

enum { __FLINT_SYNCWARP = 0, __FLINT_SHFL_IDX, __FLINT_SHFL_UP, __FLINT_SHFL_DOWN, __FLINT_SHFL_XOR,
       __FLINT_BALLOT, __FLINT_ANY, __FLINT_ALL, __FLINT_MMA_16816 };

struct __flint_shfl_in { unsigned long long v; int arg; int width; };

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    unsigned long long in = 0, out;
    __FLINT_SWITCH(__flint_api.warp(__FLINT_SYNCWARP, mask, &in, &out));
}

template <typename T>
inline T __flint_shfl(unsigned op, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    __flint_shfl_in in{0, arg, width};
    std::memcpy(&in.v, &v, sizeof(T));
    unsigned long long out;
    __FLINT_SWITCH(__flint_api.warp(op, mask, &in, &out));
    T r;
    std::memcpy(&r, &out, sizeof(T));
    return r;
}
template <typename T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return __flint_shfl(__FLINT_SHFL_IDX, m, v, src, w); }
template <typename T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return __flint_shfl(__FLINT_SHFL_UP, m, v, (int)d, w); }
template <typename T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return __flint_shfl(__FLINT_SHFL_DOWN, m, v, (int)d, w); }
template <typename T> inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) { return __flint_shfl(__FLINT_SHFL_XOR, m, v, x, w); }

inline unsigned __flint_vote(unsigned op, unsigned mask, int pred) {
    unsigned long long in = pred != 0, out;
    __FLINT_SWITCH(__flint_api.warp(op, mask, &in, &out));
    return (unsigned)out;
}
inline unsigned __ballot_sync(unsigned m, int p) { return __flint_vote(__FLINT_BALLOT, m, p); }
inline int __any_sync(unsigned m, int p) { return (int)__flint_vote(__FLINT_ANY, m, p); }
inline int __all_sync(unsigned m, int p) { return (int)__flint_vote(__FLINT_ALL, m, p); }

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 for the warp: d = a * b + c, with the
// PTX fragment layout (the driver gathers the 32 lanes' fragments and multiplies).
inline void __flint_mma_16816(float* d, const unsigned* a, const unsigned* b, const float* c) {
    struct { unsigned a[4]; unsigned b[2]; float c[4]; } in;
    std::memcpy(in.a, a, 16);
    std::memcpy(in.b, b, 8);
    std::memcpy(in.c, c, 16);
    float out[4];
    __FLINT_SWITCH(__flint_api.warp(__FLINT_MMA_16816, 0xffffffffu, &in, out));
    std::memcpy(d, out, 16);
}

// ---- memory: atomics and fences (blocks run on several OS threads) ----------------------
// Not instrumented by the race checker: atomics do not race.
#define __FLINT_NOTSAN __attribute__((no_sanitize_thread))
template <typename T> __FLINT_NOTSAN inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
__FLINT_NOTSAN inline float atomicAdd(float* p, float v) {
    unsigned* u = (unsigned*)p;
    unsigned old = __atomic_load_n(u, __ATOMIC_SEQ_CST), nw;
    do {
        float f;
        std::memcpy(&f, &old, 4);
        f += v;
        std::memcpy(&nw, &f, 4);
    } while (!__atomic_compare_exchange_n(u, &old, nw, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    float r;
    std::memcpy(&r, &old, 4);
    return r;
}
template <typename T> __FLINT_NOTSAN inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T> __FLINT_NOTSAN inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T, typename F> __FLINT_NOTSAN inline T __flint_atomic_rmw(T* p, F f) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(p, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
template <typename T> inline T atomicMax(T* p, T v) { return __flint_atomic_rmw(p, [v](T o) { return o < v ? v : o; }); }
template <typename T> inline T atomicMin(T* p, T v) { return __flint_atomic_rmw(p, [v](T o) { return v < o ? v : o; }); }
template <typename T> __FLINT_NOTSAN inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
__FLINT_NOTSAN inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__FLINT_NOTSAN inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// Loads that bypass L1 (cache-global): a plain load once fences order it.
template <typename T> __FLINT_NOTSAN inline T __ldcg(const T* p) { return *(const volatile T*)p; }
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---- bit casts and math -----------------------------------------------------------------
template <typename To, typename From> inline To __flint_bits(From f) {
    To t;
    std::memcpy(&t, &f, sizeof(To));
    return t;
}
inline float __int_as_float(int x) { return __flint_bits<float>(x); }
inline float __uint_as_float(unsigned x) { return __flint_bits<float>(x); }
inline int __float_as_int(float x) { return __flint_bits<int>(x); }
inline unsigned __float_as_uint(float x) { return __flint_bits<unsigned>(x); }
inline double __longlong_as_double(long long x) { return __flint_bits<double>(x); }
inline long long __double_as_longlong(double x) { return __flint_bits<long long>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
// CUDA's integer min/max overloads (by value: a conditional of two lvalues is an lvalue).
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// f16 conversions, bit-exact: round to nearest even (cvt.rn.f16.f32), and exact widening.
inline unsigned short __flint_f2h(float f) {
    const unsigned x = __flint_bits<unsigned>(f);
    const unsigned sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xffu;
    unsigned m = x & 0x7fffffu;
    if (e == 0xffu) return (unsigned short)(sign | 0x7c00u | (m ? 0x200u | (m >> 13) : 0u));
    const int ee = (int)e - 127 + 15;
    if (ee >= 31) return (unsigned short)(sign | 0x7c00u);
    if (ee <= 0) {
        if (ee < -10) return (unsigned short)sign;
        m |= 0x800000u;
        const int shift = 14 - ee;
        unsigned hm = m >> shift;
        const unsigned rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (hm & 1u))) hm++;
        return (unsigned short)(sign | hm);
    }
    const unsigned hm = m >> 13, rem = m & 0x1fffu;
    unsigned h = sign | ((unsigned)ee << 10) | hm;
    if (rem > 0x1000u || (rem == 0x1000u && (hm & 1u))) h++;
    return (unsigned short)h;
}
inline float __flint_h2f(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
    unsigned m = h & 0x3ffu, x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else {
            unsigned s = 0;
            while (!(m & 0x400u)) { m <<= 1; s++; }
            x = sign | ((113u - s) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    return __flint_bits<float>(x);
}

// ---- the kernel table the driver reads (the compiler's second pass appends the entries) ---
struct __flint_kernel {
    const char* name;
    void (*tramp)(void** params, __flint_thread* t);
    unsigned n_params;
    const unsigned* sizes;
    const unsigned char* is_ptr;
    unsigned max_threads;  // __launch_bounds__, or 1024
};

template <typename... A> struct __flint_sig {
    static constexpr unsigned n = sizeof...(A);
    static constexpr unsigned sizes[sizeof...(A) + 1] = {(unsigned)sizeof(A)..., 0u};
    static constexpr unsigned char is_ptr[sizeof...(A) + 1] = {(unsigned char)std::is_pointer<A>::value..., 0};
};
template <typename... A> __flint_sig<A...> __flint_sig_of(void (*)(A...)) { return {}; }

template <typename... A, std::size_t... I>
inline void __flint_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <typename... A> inline void __flint_call(void (*f)(A...), void** p) {
    __flint_invoke(f, p, std::index_sequence_for<A...>{});
}
template <auto F> void __flint_tramp(void** p, __flint_thread* t) {
    __flint_cur = t;
    __flint_call(F, p);
}
#define __FLINT_KERNEL(name, bounds)                                                                 \
    {#name, &__flint_tramp<&name>, decltype(__flint_sig_of(&name))::n, decltype(__flint_sig_of(&name))::sizes, \
     decltype(__flint_sig_of(&name))::is_ptr, (unsigned)(bounds)}

#ifdef __FLINT_RACECHECK
// ---- race checking (FLINT_CUDA_SIM_RACECHECK=1, or -DFLINT_SIM_RACECHECK) ------------------
// The unit is compiled with -fsanitize=thread and without its runtime: the instrumentation
// calls these for every load and store, and those inside the running block's shared memory
// (the unit's thread-local block, and the dynamic array) go to the driver, which keeps each
// word's last writer and reader with the barrier and warp-collective intervals they were in.
thread_local char* __flint_rc_lo;
thread_local unsigned long __flint_rc_n;
thread_local char* __flint_rc_dlo;
thread_local unsigned long __flint_rc_dn;
extern "C" {
__FLINT_NOTSAN void __flint_sim_block_begin(char* lo, unsigned long n, char* dlo, unsigned long dn) {
    __flint_rc_lo = lo;
    __flint_rc_n = n;
    __flint_rc_dlo = dlo;
    __flint_rc_dn = dn;
}
__FLINT_NOTSAN static inline void __flint_rc(void* p, unsigned long size, int write) {
    char* c = (char*)p;
    if (((unsigned long)(c - __flint_rc_lo) < __flint_rc_n || (unsigned long)(c - __flint_rc_dlo) < __flint_rc_dn) &&
        p != (void*)&__flint_cur)
        __flint_api.access(p, size, write);
}
#define __FLINT_TSAN_RW(n)                                                                      \
    __FLINT_NOTSAN void __tsan_read##n(void* p) { __flint_rc(p, n, 0); }                         \
    __FLINT_NOTSAN void __tsan_write##n(void* p) { __flint_rc(p, n, 1); }                        \
    __FLINT_NOTSAN void __tsan_unaligned_read##n(void* p) { __flint_rc(p, n, 0); }               \
    __FLINT_NOTSAN void __tsan_unaligned_write##n(void* p) { __flint_rc(p, n, 1); }
__FLINT_TSAN_RW(1)
__FLINT_TSAN_RW(2)
__FLINT_TSAN_RW(4)
__FLINT_TSAN_RW(8)
__FLINT_TSAN_RW(16)
// (GCC's own declarations of these, as it calls them.)
__FLINT_NOTSAN void __tsan_read_range(void* p, long n) { __flint_rc(p, (unsigned long)n, 0); }
__FLINT_NOTSAN void __tsan_write_range(void* p, long n) { __flint_rc(p, (unsigned long)n, 1); }
__FLINT_NOTSAN void __tsan_init() {}
__FLINT_NOTSAN void __tsan_func_entry(void*) {}
__FLINT_NOTSAN void __tsan_func_exit(void*) {}
__FLINT_NOTSAN void __tsan_vptr_update(void*, void*) {}
__FLINT_NOTSAN void __tsan_vptr_read(void*) {}
}
#endif
