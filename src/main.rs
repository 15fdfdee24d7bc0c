use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;

use clap::Parser;
use phlora::error::Error;
use tracing_subscriber::EnvFilter;

// The command line lives in the binary: arguments (cli), their validation into the library's
// settings (config), and one runner per command (commands). The library is the pipeline.
mod cli;
mod commands;
mod config;

fn main() -> ExitCode {
    bound_allocator();
    let cli = cli::Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    match commands::run(&cli) {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): nothing is wrong, and no one listens.
        Err(Error::ClosedPipe) => ExitCode::SUCCESS,
        Err(e @ Error::Interrupted(_)) => {
            phlora::say!("error: {e}");
            ExitCode::from(130)
        }
        Err(e) => {
            phlora::say!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "phlora=debug,warn",
        (false, _) => "phlora=trace,info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        // A message that cannot be written (stderr closed or full) is dropped: by default
        // tracing reports it with eprintln!, which panics on the same stderr.
        .log_internal_errors(false)
        .init();
}

/// glibc raises its mmap threshold after each large free, so the multi-MB sketches and
/// scratch of every tensor end up in arenas that fragment and grow with the model (measured:
/// +13 MB resident per Llama layer). A fixed 1 MiB threshold returns them to the OS on free.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_allocator() {
    // glibc's own tunable, when set, wins (for measuring other choices).
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return;
    }
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_allocator() {}

/// The system allocator, asking for transparent huge pages on large blocks (ΔW, sketches):
/// 512× fewer page faults when they are first touched and fewer TLB misses in the GEMMs.
struct HugePageHint;

const HUGE_MIN: usize = 4 << 20;

// SAFETY: every call forwards to `System` unchanged; the madvise hint does not touch memory
// contents and its failure is ignored.
unsafe impl GlobalAlloc for HugePageHint {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        hint_huge(p, layout.size());
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        hint_huge(p, layout.size());
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        hint_huge(p, new_size);
        p
    }
}

#[cfg(target_os = "linux")]
fn hint_huge(p: *mut u8, size: usize) {
    if p.is_null() || size < HUGE_MIN {
        return;
    }
    const HUGE: usize = 2 << 20;
    let start = (p as usize).next_multiple_of(HUGE);
    let end = (p as usize + size) / HUGE * HUGE;
    if end > start {
        // SAFETY: [start, end) lies inside the block just allocated; MADV_HUGEPAGE only
        // changes how the kernel backs it.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn hint_huge(_: *mut u8, _: usize) {}

#[global_allocator]
static GLOBAL: HugePageHint = HugePageHint;
