// phlora's device kernels. Compiled at run time by NVRTC for the device's own architecture,
// with no CUDA headers at all (nothing to install at build time), so the few types and
// conversions needed are spelled out here, bit casts through inline PTX.
//
// Conventions: every kernel is extern "C"; lengths are element counts (u64); reductions write
// one partial per block, which the host adds in block order, so sums do not depend on timing.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define BLOCK 256

struct __attribute__((aligned(16))) V16 {
    u32 w[4];
};

__device__ __forceinline__ float bits_to_f32(u32 b) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(b));
    return f;
}

__device__ __forceinline__ u32 f32_to_bits(float f) {
    u32 b;
    asm("mov.b32 %0, %1;" : "=r"(b) : "f"(f));
    return b;
}

__device__ __forceinline__ float bf16_to_f32(u32 h) { return bits_to_f32((h & 0xffffu) << 16); }

__device__ __forceinline__ float f16_to_f32(u32 h) {
    float f;
    u16 s = (u16)(h & 0xffffu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
    return f;
}

__device__ __forceinline__ bool finite_f32(float f) {
    return (f32_to_bits(f) & 0x7f800000u) != 0x7f800000u;
}

// Input element types: 0 = f32, 1 = f16, 2 = bf16 (the values of the host's DTypeCode).
template <int D> struct In;

template <> struct In<0> {
    static __device__ __forceinline__ void load8(const void* p, u64 g, float* o) {
        const V16* q = (const V16*)p + 2 * g;
        V16 a = q[0], b = q[1];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            o[k] = bits_to_f32(a.w[k]);
            o[4 + k] = bits_to_f32(b.w[k]);
        }
    }
    static __device__ __forceinline__ float load1(const void* p, u64 i) {
        return ((const float*)p)[i];
    }
};

template <> struct In<1> {
    static __device__ __forceinline__ void load8(const void* p, u64 g, float* o) {
        V16 a = ((const V16*)p)[g];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            o[2 * k] = f16_to_f32(a.w[k]);
            o[2 * k + 1] = f16_to_f32(a.w[k] >> 16);
        }
    }
    static __device__ __forceinline__ float load1(const void* p, u64 i) {
        return f16_to_f32(((const u16*)p)[i]);
    }
};

template <> struct In<2> {
    static __device__ __forceinline__ void load8(const void* p, u64 g, float* o) {
        V16 a = ((const V16*)p)[g];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            o[2 * k] = bf16_to_f32(a.w[k]);
            o[2 * k + 1] = bf16_to_f32(a.w[k] >> 16);
        }
    }
    static __device__ __forceinline__ float load1(const void* p, u64 i) {
        return bf16_to_f32(((const u16*)p)[i]);
    }
};

// Adds this block's (sum, count) to slot blockIdx.x of the partial arrays.
__device__ __forceinline__ void block_reduce(double acc, u32 bad, double* part_sum, u32* part_bad) {
    __shared__ double s_sum[BLOCK];
    __shared__ u32 s_bad[BLOCK];
    s_sum[threadIdx.x] = acc;
    s_bad[threadIdx.x] = bad;
    __syncthreads();
    for (int w = BLOCK / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) {
            s_sum[threadIdx.x] += s_sum[threadIdx.x + w];
            s_bad[threadIdx.x] += s_bad[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        part_sum[blockIdx.x] = s_sum[0];
        if (part_bad) part_bad[blockIdx.x] = s_bad[0];
    }
}

// out = ft − base in f32, n elements; per block: Σ out² (finite elements, in f64) and the
// count of non-finite elements. The pointers must be 16-byte aligned (fresh allocations and
// offsets that are multiples of 8 elements are).
// One group: 8 elements of each input → 8 of ΔW, accumulating Σ d² and non-finite count.
// Mode bits (uniform across the grid): DELTA_PAIRED = two groups per step with all loads
// first; DELTA_F32_PARTIALS = each group's 8 squares summed in f32 before the f64 total (faster
// but not exact), else exact f64 squares added as a tree (short dependency chains).
#define DELTA_PAIRED 1u
#define DELTA_F32_PARTIALS 2u

__device__ __forceinline__ void delta_group(const float* a, const float* b, float* out_group,
                                            double& acc, u32& bad, u32 mode) {
    V16 o0, o1;
    float d[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        d[k] = b[k] - a[k];
        if (!finite_f32(d[k])) bad++;
        if (k < 4) o0.w[k] = f32_to_bits(d[k]);
        else o1.w[k - 4] = f32_to_bits(d[k]);
    }
    if (mode & DELTA_F32_PARTIALS) {
        float s8 = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++)
            if (finite_f32(d[k])) s8 = fmaf(d[k], d[k], s8);
        acc += (double)s8;
    } else {
        // A float times a float is exact in f64.
        double p[8];
#pragma unroll
        for (int k = 0; k < 8; k++) p[k] = finite_f32(d[k]) ? (double)d[k] * (double)d[k] : 0.0;
        acc += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
    V16* o = (V16*)out_group;
    o[0] = o0;
    o[1] = o1;
}

// out = ft − base in f32, n elements; per block: Σ out² (finite elements, in f64) and the
// count of non-finite elements. The pointers must be 16-byte aligned (fresh allocations and
// offsets that are multiples of 8 elements are).
template <int DB, int DF>
__device__ __forceinline__ void delta_body(const void* base, const void* ft, float* out, u64 n,
                                           double* part_sum, u32* part_bad, u32 mode) {
    double acc = 0.0;
    u32 bad = 0;
    const u64 stride = (u64)gridDim.x * BLOCK;
    const u64 first = (u64)blockIdx.x * BLOCK + threadIdx.x;
    const u64 groups = n / 8;
    u64 g = first;
    if (mode & DELTA_PAIRED) {
        for (; g + stride < groups; g += 2 * stride) {
            float a0[8], b0[8], a1[8], b1[8];
            In<DB>::load8(base, g, a0);
            In<DF>::load8(ft, g, b0);
            In<DB>::load8(base, g + stride, a1);
            In<DF>::load8(ft, g + stride, b1);
            delta_group(a0, b0, out + 8 * g, acc, bad, mode);
            delta_group(a1, b1, out + 8 * (g + stride), acc, bad, mode);
        }
    }
    for (; g < groups; g += stride) {
        float a0[8], b0[8];
        In<DB>::load8(base, g, a0);
        In<DF>::load8(ft, g, b0);
        delta_group(a0, b0, out + 8 * g, acc, bad, mode);
    }
    for (u64 i = groups * 8 + first; i < n; i += stride) {
        float d = In<DF>::load1(ft, i) - In<DB>::load1(base, i);
        if (finite_f32(d)) acc += (double)d * (double)d;
        else bad++;
        out[i] = d;
    }
    block_reduce(acc, bad, part_sum, part_bad);
}

#define DELTA(NAME, DB, DF)                                                                   \
    extern "C" __global__ void __launch_bounds__(BLOCK)                                      \
        NAME(const void* base, const void* ft, float* out, u64 n, double* part_sum,          \
             u32* part_bad, u32 mode) {                                                       \
        delta_body<DB, DF>(base, ft, out, n, part_sum, part_bad, mode);                       \
    }

// delta_<base>_<ft>
DELTA(delta_f32_f32, 0, 0)
DELTA(delta_f32_f16, 0, 1)
DELTA(delta_f32_bf16, 0, 2)
DELTA(delta_f16_f32, 1, 0)
DELTA(delta_f16_f16, 1, 1)
DELTA(delta_f16_bf16, 1, 2)
DELTA(delta_bf16_f32, 2, 0)
DELTA(delta_bf16_f16, 2, 1)
DELTA(delta_bf16_bf16, 2, 2)

// Σ x² in f64, one partial per block (the residual certificate).
extern "C" __global__ void __launch_bounds__(BLOCK) sumsq_f32(const float* x, u64 n, double* part_sum) {
    double acc = 0.0;
    const u64 stride = (u64)gridDim.x * BLOCK;
    for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        double v = (double)x[i];
        acc += v * v;
    }
    block_reduce(acc, 0, part_sum, 0);
}

extern "C" __global__ void __launch_bounds__(BLOCK) f32_to_f64(const float* x, double* y, u64 n) {
    const u64 stride = (u64)gridDim.x * BLOCK;
    for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) y[i] = (double)x[i];
}

extern "C" __global__ void __launch_bounds__(BLOCK) f64_to_f32(const double* x, float* y, u64 n) {
    const u64 stride = (u64)gridDim.x * BLOCK;
    for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) y[i] = (float)x[i];
}

// The host's rng::normal_at, element for element: a counter-based Box–Muller over SplitMix64,
// so a sketch is the same on every device and for every thread count.
__device__ __forceinline__ u64 splitmix64(u64* s) {
    *s += 0x9E3779B97F4A7C15ull;
    u64 z = *s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void __launch_bounds__(BLOCK) gaussian_fill(float* out, u64 n, u64 seed) {
    const u64 stride = (u64)gridDim.x * BLOCK;
    for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        u64 s = seed ^ ((i >> 1) * 0xD6E8FEB86659FD93ull);
        u64 x1 = splitmix64(&s);
        u64 x2 = splitmix64(&s);
        const double scale = 1.0 / 9007199254740992.0;  // 2^-53
        double u1 = 1.0 - (double)(x1 >> 11) * scale;
        double u2 = (double)(x2 >> 11) * scale;
        double r = sqrt(-2.0 * log(u1));
        double t = 6.283185307179586 * u2;
        out[i] = (float)((i & 1) ? r * sin(t) : r * cos(t));
    }
}

// LoRA factor tensors from a column-major rows×r source (U or V): out = src[:, k]·scale[k],
// zero for r ≤ k < r_out, rounded to the output dtype (0 = f32, 1 = f16, 2 = bf16, round to
// nearest even like the host's encoder) and written as a row-major tensor, [r_out, rows] when
// transpose_out is 0 and [rows, r_out] when it is 1. `rounded` gets the same values back in
// f32, in the same order, for the residual certificate.
extern "C" __global__ void __launch_bounds__(BLOCK)
    factor_cast(const float* src, u64 rows, u32 r, u32 r_out, const float* scale,
                u32 transpose_out, u32 dtype, void* out, float* rounded) {
    const u64 n = rows * (u64)r_out;
    const u64 stride = (u64)gridDim.x * BLOCK;
    for (u64 idx = (u64)blockIdx.x * BLOCK + threadIdx.x; idx < n; idx += stride) {
        u64 i, k;
        if (transpose_out) {
            i = idx / r_out;
            k = idx % r_out;
        } else {
            k = idx / rows;
            i = idx % rows;
        }
        float x = k < r ? src[k * rows + i] * scale[k] : 0.0f;
        float back;
        if (dtype == 0) {
            ((float*)out)[idx] = x;
            back = x;
        } else if (dtype == 1) {
            u16 h;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
            ((u16*)out)[idx] = h;
            back = f16_to_f32(h);
        } else {
            u32 b = f32_to_bits(x);
            u16 h;
            if ((b & 0x7fffffffu) > 0x7f800000u) {
                h = (u16)((b >> 16) | 0x40u);  // NaN stays a (quiet) NaN
            } else {
                h = (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
            }
            ((u16*)out)[idx] = h;
            back = bf16_to_f32(h);
        }
        rounded[idx] = back;
    }
}
