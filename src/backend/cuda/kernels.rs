//! The embedded kernel sources, their NVRTC compilation (once per process and architecture),
//! and typed launchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::error::CudaError;
use crate::checkpoint::DType;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Threads per block; the kernels' shared-memory reductions are sized for it.
pub const BLOCK: u32 = 256;

/// `delta_*` mode bits (kernels/phlora.cu): two 8-element groups per step with all loads first.
pub const DELTA_PAIRED: u32 = 1;
/// `delta_*` mode bits: each group's squares summed in f32 first (faster, not exact).
pub const DELTA_F32_PARTIALS: u32 = 2;

/// The single kernel file's name.
const FILE: &str = "phlora.cu";

fn source() -> &'static str {
    SOURCES
        .iter()
        .find(|(name, _)| *name == FILE)
        .map(|(_, src)| *src)
        .expect("build.rs embeds kernels/phlora.cu")
}

/// NVRTC options for a virtual architecture such as `compute_90` (PTX, which the driver
/// finishes for the exact chip when the module is loaded).
pub fn compile_options(arch: &str) -> CompileOptions {
    CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "-default-device".into(),
        ],
        ..CompileOptions::default()
    }
}

/// Compiles every embedded kernel file for `arch` (used by the CPU-side compile test too).
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, Ptx)>, CudaError> {
    SOURCES
        .iter()
        .map(|(name, src)| {
            cudarc::nvrtc::compile_ptx_with_opts(src, compile_options(arch))
                .map(|ptx| (*name, ptx))
                .map_err(|e| CudaError::compile(name, e))
        })
        .collect()
}

/// PTX text per architecture: NVRTC runs once per process for each.
fn ptx_for(arch: &str) -> Result<String, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(arch) {
        return Ok(p.clone());
    }
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source(), compile_options(arch))
        .map_err(|e| CudaError::compile(FILE, e))?
        .to_src();
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

/// The loaded kernels of one context.
pub struct Kernels {
    delta: HashMap<(DType, DType), CudaFunction>,
    sumsq: CudaFunction,
    to_f64: CudaFunction,
    to_f32: CudaFunction,
    gaussian: CudaFunction,
    factor_cast: CudaFunction,
    /// Blocks in a grid-stride launch: enough to fill the device several times over.
    max_blocks: u32,
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, arch: &str, sms: usize) -> Result<Kernels, CudaError> {
        let module = ctx.load_module(Ptx::from_src(ptx_for(arch)?))?;
        let f = |name: &str| module.load_function(name);
        let mut delta = HashMap::new();
        for b in [DType::F32, DType::F16, DType::BF16] {
            for t in [DType::F32, DType::F16, DType::BF16] {
                let name = format!(
                    "delta_{}_{}",
                    b.as_str().to_lowercase(),
                    t.as_str().to_lowercase()
                );
                delta.insert((b, t), f(&name)?);
            }
        }
        Ok(Kernels {
            delta,
            sumsq: f("sumsq_f32")?,
            to_f64: f("f32_to_f64")?,
            to_f32: f("f64_to_f32")?,
            gaussian: f("gaussian_fill")?,
            factor_cast: f("factor_cast")?,
            max_blocks: (sms.max(1) * 8) as u32,
        })
    }

    /// Grid-stride launch shape for `work` items per thread-slot.
    pub fn grid(&self, work: usize) -> LaunchConfig {
        let blocks = work
            .div_ceil(BLOCK as usize)
            .clamp(1, self.max_blocks as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// out[..n] = ft − base; returns the per-block partial (Σ out², non-finite count).
    #[allow(clippy::too_many_arguments)]
    pub fn delta(
        &self,
        stream: &Arc<CudaStream>,
        base: &CudaSlice<u8>,
        base_dtype: DType,
        ft: &CudaSlice<u8>,
        ft_dtype: DType,
        out: u64,
        n: usize,
        (ps, pb, slots): (u64, u64, usize),
        mode: u32,
    ) -> Result<usize, CudaError> {
        let func = &self.delta[&(base_dtype, ft_dtype)];
        // Eight elements per thread per step.
        let cfg = self.grid(n.div_ceil(8));
        let blocks = cfg.grid_dim.0 as usize;
        assert!(slots >= blocks, "{slots} partial slots for {blocks} blocks");
        let n = n as u64;
        let (b, _b) = base.device_ptr(stream);
        let (t, _t) = ft.device_ptr(stream);
        // SAFETY: base and ft hold n elements of their dtypes, out has room for n f32 and is
        // 16-byte aligned (the caller's offsets are multiples of 4 elements), and ps/pb point
        // at `slots` f64 and u32 partials, one per block of this grid at least (asserted).
        unsafe {
            stream
                .launch_builder(func)
                .arg(&b)
                .arg(&t)
                .arg(&out)
                .arg(&n)
                .arg(&ps)
                .arg(&pb)
                .arg(&mode)
                .launch(cfg)?;
        }
        Ok(blocks)
    }

    /// Per-block partial sums of x[..n]² in f64; returns the number of blocks used.
    pub fn sumsq(
        &self,
        stream: &Arc<CudaStream>,
        x: u64,
        n: usize,
        part_sum: &mut CudaSlice<f64>,
    ) -> Result<usize, CudaError> {
        let cfg = self.grid(n);
        let blocks = cfg.grid_dim.0 as usize;
        assert!(part_sum.len() >= blocks);
        let n = n as u64;
        let (ps, _ps) = part_sum.device_ptr_mut(stream);
        // SAFETY: x points at n f32 on this device; part_sum has a slot per block.
        unsafe {
            stream
                .launch_builder(&self.sumsq)
                .arg(&x)
                .arg(&n)
                .arg(&ps)
                .launch(cfg)?;
        }
        Ok(blocks)
    }

    /// y[..n] = x[..n] widened to f64.
    pub fn to_f64(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f64>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        assert!(y.len() >= n);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        let n = n as u64;
        // SAFETY: both buffers hold at least n elements (asserted).
        unsafe {
            stream
                .launch_builder(&self.to_f64)
                .arg(&xp)
                .arg(&yp)
                .arg(&n)
                .launch(self.grid(n as usize))?;
        }
        Ok(())
    }

    /// y[..n] = x[..n] rounded to f32.
    pub fn to_f32(
        &self,
        stream: &Arc<CudaStream>,
        x: &CudaSlice<f64>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let n = x.len();
        assert!(y.len() >= n);
        let (xp, _x) = x.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        let n = n as u64;
        // SAFETY: both buffers hold at least n elements (asserted).
        unsafe {
            stream
                .launch_builder(&self.to_f32)
                .arg(&xp)
                .arg(&yp)
                .arg(&n)
                .launch(self.grid(n as usize))?;
        }
        Ok(())
    }

    /// One LoRA factor tensor from a column-major rows×r `src` (see kernels/phlora.cu):
    /// `out` gets the encoded values (rows·r_out elements of `dtype`), `rounded` the same
    /// values in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn factor_cast(
        &self,
        stream: &Arc<CudaStream>,
        src: u64,
        rows: usize,
        r: usize,
        r_out: usize,
        scale: &CudaSlice<f32>,
        transpose_out: bool,
        dtype: DType,
        out: u64,
        rounded: u64,
    ) -> Result<(), CudaError> {
        assert!(scale.len() >= r && r <= r_out);
        let (sp, _s) = scale.device_ptr(stream);
        let (rows64, r32, r_out32) = (rows as u64, r as u32, r_out as u32);
        let t = u32::from(transpose_out);
        let code: u32 = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        };
        // SAFETY: src holds rows·r f32, out has room for rows·r_out elements of dtype and
        // rounded for as many f32; scale has r entries (asserted).
        unsafe {
            stream
                .launch_builder(&self.factor_cast)
                .arg(&src)
                .arg(&rows64)
                .arg(&r32)
                .arg(&r_out32)
                .arg(&sp)
                .arg(&t)
                .arg(&code)
                .arg(&out)
                .arg(&rounded)
                .launch(self.grid(rows * r_out))?;
        }
        Ok(())
    }

    /// out = standard normal samples, element i equal to the host's `rng::normal_at(seed, i)`.
    pub fn gaussian(
        &self,
        stream: &Arc<CudaStream>,
        out: &mut CudaSlice<f32>,
        seed: u64,
    ) -> Result<(), CudaError> {
        let n = out.len() as u64;
        let (o, _o) = out.device_ptr_mut(stream);
        // SAFETY: out holds n f32.
        unsafe {
            stream
                .launch_builder(&self.gaussian)
                .arg(&o)
                .arg(&n)
                .arg(&seed)
                .launch(self.grid(n as usize))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether libnvrtc can be loaded; CI sets PHLORA_REQUIRE_NVRTC so that a missing library
    /// fails there instead of skipping.
    fn nvrtc_or_skip() -> bool {
        // SAFETY: only tries to dlopen the library.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return true;
        }
        assert!(
            std::env::var_os("PHLORA_REQUIRE_NVRTC").is_none(),
            "PHLORA_REQUIRE_NVRTC is set, but libnvrtc is not on the library path"
        );
        eprintln!("SKIPPED: libnvrtc not found, kernels not compiled (`.ci/run` installs it)");
        false
    }

    fn kernel_names() -> Vec<String> {
        let mut names: Vec<String> = [
            "sumsq_f32",
            "f32_to_f64",
            "f64_to_f32",
            "gaussian_fill",
            "factor_cast",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for b in ["f32", "f16", "bf16"] {
            for f in ["f32", "f16", "bf16"] {
                names.push(format!("delta_{b}_{f}"));
            }
        }
        names
    }

    #[test]
    fn every_kernel_compiles_with_nvrtc_for_ampere_and_hopper() {
        if !nvrtc_or_skip() {
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            let compiled = compile_all(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let ptx: String = compiled.iter().map(|(_, p)| p.to_src()).collect();
            for name in kernel_names() {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{arch}: kernel {name} missing from the PTX"
                );
            }
        }
    }

    #[test]
    fn a_kernel_that_does_not_compile_is_reported_with_the_compiler_log() {
        if !nvrtc_or_skip() {
            return;
        }
        let err = cudarc::nvrtc::compile_ptx_with_opts(
            "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
            compile_options("compute_80"),
        )
        .map_err(|e| CudaError::compile("broken.cu", e))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("broken.cu") && err.contains("undefined_name"),
            "{err}"
        );
    }
}
