//! The CUDA simulator's own tests (`cudasim/`): its barriers, shuffles, atomics, dynamic
//! shared memory, the `mma` fragment layout, f16 conversions, the NaN fill, graph replay,
//! and the errors it must report (an overrun, a divergent barrier, lanes that exited,
//! mixed collectives, bad launches) without hanging and while staying usable.
//!
//! The process runs CUDA on the simulator (`FLINT_CUDA_SIM=1`, set here before anything
//! loads a driver), with a real GPU or without. The libraries come from `cargo build`
//! (`target/*/libflint_cudasim*.so`); where they are missing the tests print that they
//! skipped, unless FLINT_REQUIRE_CUDA is set (CI), where that fails.

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::ffi::{c_void, CString};
use std::sync::OnceLock;

const KERNELS: &str = include_str!("cudasim/kernels.cu");

struct Sim {
    module: sys::CUmodule,
    stream: sys::CUstream,
}
// SAFETY: driver handles, usable from any thread.
unsafe impl Send for Sim {}
unsafe impl Sync for Sim {}

fn sim(test: &str) -> Option<&'static Sim> {
    static S: OnceLock<Result<Sim, String>> = OnceLock::new();
    let s = S.get_or_init(|| {
        std::env::set_var("FLINT_CUDA_SIM", "1");
        if !flint::backend::cuda::driver_available() || !flint::backend::cuda::simulated() {
            return Err("the simulator's libraries were not found (cargo build --release builds them)".into());
        }
        let src = format!("{}\n{KERNELS}", flint::backend::cuda::SOURCES[0].1);
        let image = compile(&src).map_err(|e| format!("compile: {e}"))?;
        cu::init().map_err(|e| e.to_string())?;
        let dev = cu::device::get(0).map_err(|e| e.to_string())?;
        // SAFETY: the primary context of device 0, kept for the process.
        unsafe {
            let ctx = cu::primary_ctx::retain(dev).map_err(|e| e.to_string())?;
            cu::ctx::set_current(ctx).map_err(|e| e.to_string())?;
            let module = cu::module::load_data(image.as_ptr() as *const c_void).map_err(|e| e.to_string())?;
            let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(|e| e.to_string())?;
            Ok(Sim { module, stream })
        }
    });
    match s {
        Ok(s) => Some(s),
        Err(e) => {
            assert!(std::env::var_os("FLINT_REQUIRE_CUDA").is_none(), "{test}: the CUDA simulator is required (FLINT_REQUIRE_CUDA): {e}");
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

fn compile(src: &str) -> Result<Vec<u8>, String> {
    compile_with(src, &[])
}

fn compile_with(src: &str, extra: &[&str]) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result as nv, sys as nvs};
    let src = CString::new(src).unwrap();
    let prog = nv::create_program(&src, None).map_err(|e| e.to_string())?;
    // SAFETY: a live program; the buffers have the sizes NVRTC reports.
    unsafe {
        let opts: Vec<String> = ["--gpu-architecture=sm_90"].iter().chain(extra).map(|s| s.to_string()).collect();
        if let Err(e) = nv::compile_program(prog, &opts) {
            let log = nv::get_program_log(prog).map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>()).unwrap_or_default();
            return Err(format!("{e}: {log}"));
        }
        let mut size = 0;
        nvs::nvrtcGetCUBINSize(prog, &mut size);
        let mut bin = vec![0u8; size];
        nvs::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char);
        let _ = nv::destroy_program(prog);
        Ok(bin)
    }
}

fn func(s: &Sim, name: &str) -> sys::CUfunction {
    // SAFETY: the loaded module.
    unsafe { cu::module::get_function(s.module, CString::new(name).unwrap()) }.expect(name)
}

fn upload<T: Copy>(s: &Sim, v: &[T]) -> u64 {
    let bytes = std::mem::size_of_val(v).max(4);
    // SAFETY: a fresh allocation of the slice's size; the copy runs before returning.
    unsafe {
        let p = cu::malloc_sync(bytes).unwrap();
        if !v.is_empty() {
            cu::memcpy_htod_async(p, v, s.stream).unwrap();
        }
        p
    }
}

fn download<T: Copy + Default>(s: &Sim, p: u64, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    // SAFETY: `p` holds at least `n` values.
    unsafe {
        cu::memcpy_dtoh_async(&mut v, p, s.stream).unwrap();
        cu::stream::synchronize(s.stream).unwrap();
    }
    v
}

/// Launch with arguments given as byte images of the kernel's parameters.
fn launch(s: &Sim, name: &str, grid: u32, block: u32, shmem: u32, args: &mut [u64]) -> Result<(), String> {
    let f = func(s, name);
    let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
    // SAFETY: the arguments match the test kernels' parameters (checked by the simulator).
    unsafe { cu::launch_kernel(f, (grid, 1, 1), (block, 1, 1), shmem, s.stream, &mut ptrs) }.map_err(|e| format!("{e}: {}", last_error()))
}

fn last_error() -> String {
    // The simulator's own words, through the export Flint's backend reads.
    let lib = unsafe { libloading::Library::new("libcuda.so") }.unwrap();
    let f: libloading::Symbol<unsafe extern "C" fn(*mut std::ffi::c_char, usize) -> usize> = unsafe { lib.get(b"flint_sim_last_error\0") }.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe { f(buf.as_mut_ptr() as *mut std::ffi::c_char, buf.len()) };
    buf.truncate(n.min(4095));
    String::from_utf8_lossy(&buf).into_owned()
}

fn f32a(x: f32) -> u64 {
    x.to_bits() as u64
}

#[test]
fn barriers_and_warp_reductions_sum_blocks() {
    let Some(s) = sim("barriers_and_warp_reductions_sum_blocks") else { return };
    // Block sizes from one warp to 1024 threads; the last block partial.
    for block in [32u32, 96, 256, 1024] {
        let n = block as usize * 5 - 7;
        let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let (px, py) = (upload(s, &x), upload(s, &vec![0f32; 5]));
        launch(s, "block_sums", 5, block, 0, &mut [px, py, n as u64]).unwrap();
        let y: Vec<f32> = download(s, py, 5);
        for (b, &got) in y.iter().enumerate() {
            let want: f32 = x[b * block as usize..((b + 1) * block as usize).min(n)].iter().sum();
            // Integers: every order of summation is exact.
            assert_eq!(got, want, "block {b} of {block} threads");
        }
    }
}

#[test]
fn shuffles_and_votes_follow_the_ptx_rules() {
    let Some(s) = sim("shuffles_and_votes_follow_the_ptx_rules") else { return };
    let x: Vec<i32> = (0..32).map(|i| i * 3 + 1).collect();
    for arg in [0i32, 1, 3, 5, 17, 31] {
        let (px, po) = (upload(s, &x), upload(s, &vec![0i32; 4 * 6 * 32 + 64]));
        launch(s, "shuffles", 1, 32, 0, &mut [px, po, arg as u32 as u64]).unwrap();
        let o: Vec<i32> = download(s, po, 4 * 6 * 32 + 64);
        for (w, width) in [1usize, 2, 4, 8, 16, 32].into_iter().enumerate() {
            for lane in 0..32usize {
                let seg = lane & !(width - 1);
                let a = arg as usize;
                let idx = seg + (a & (width - 1));
                let up = if lane - seg >= a { lane - a } else { lane };
                let down = if lane - seg + a < width { lane + a } else { lane };
                let xr = lane ^ a;
                let xor = if xr & !(width - 1) == seg { xr } else { lane };
                for (v, src) in [idx, up, down, xor].into_iter().enumerate() {
                    assert_eq!(o[(v * 6 + w) * 32 + lane], x[src], "variant {v}, width {width}, lane {lane}, arg {arg}");
                }
            }
        }
        let ballot = x.iter().enumerate().filter(|(_, &v)| v & 1 != 0).fold(0u32, |m, (l, _)| m | 1 << l);
        assert!(o[4 * 6 * 32..4 * 6 * 32 + 32].iter().all(|&b| b as u32 == ballot));
        // any(v == 7): lane 2 holds 7; all(v >= 0): yes.
        assert!(o[4 * 6 * 32 + 32..].iter().all(|&b| b == 3));
    }
}

#[test]
fn atomics_count_every_thread_of_every_block() {
    let Some(s) = sim("atomics_count_every_thread_of_every_block") else { return };
    let (c, f, m) = (upload(s, &[0i32]), upload(s, &[0f32]), upload(s, &[0u32]));
    launch(s, "atomics", 37, 128, 0, &mut [c, f, m]).unwrap();
    assert_eq!(download::<i32>(s, c, 1)[0], 37 * 128);
    assert_eq!(download::<f32>(s, f, 1)[0], 37.0 * 128.0 * 0.5);
    assert_eq!(download::<u32>(s, m, 1)[0], 37 * 128 - 1);
}

#[test]
fn dynamic_shared_memory_is_per_block() {
    let Some(s) = sim("dynamic_shared_memory_is_per_block") else { return };
    let x: Vec<f32> = (0..6 * 96).map(|i| i as f32).collect();
    let (px, py) = (upload(s, &x), upload(s, &vec![0f32; x.len()]));
    launch(s, "reverse_dyn", 6, 96, 96 * 4, &mut [px, py]).unwrap();
    let y: Vec<f32> = download(s, py, x.len());
    for b in 0..6 {
        for t in 0..96 {
            assert_eq!(y[b * 96 + t], x[b * 96 + 95 - t]);
        }
    }
}

#[test]
fn mma_fragments_follow_the_ptx_layout() {
    let Some(s) = sim("mma_fragments_follow_the_ptx_layout") else { return };
    let h = |v: f32| half::f16::from_f32(v);
    let a: Vec<half::f16> = (0..256).map(|i| h(((i * 7) % 23) as f32 / 8.0 - 1.0)).collect();
    let b: Vec<half::f16> = (0..128).map(|i| h(((i * 5) % 19) as f32 / 4.0 - 2.0)).collect();
    let c: Vec<f32> = (0..128).map(|i| i as f32 * 0.25).collect();
    let bits = |v: &[half::f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
    let (pa, pb, pc, pd) = (upload(s, &bits(&a)), upload(s, &bits(&b)), upload(s, &c), upload(s, &vec![0f32; 128]));
    launch(s, "mma_tile", 1, 32, 0, &mut [pa, pb, pc, pd]).unwrap();
    let d: Vec<f32> = download(s, pd, 128);
    for r in 0..16 {
        for n in 0..8 {
            let want: f64 = c[r * 8 + n] as f64 + (0..16).map(|k| a[r * 16 + k].to_f64() * b[k * 8 + n].to_f64()).sum::<f64>();
            // Values on a 1/32 grid: every partial sum is exact in f32.
            assert_eq!(d[r * 8 + n] as f64, want, "D[{r}][{n}]");
        }
    }
}

#[test]
fn f16_conversions_are_bit_exact() {
    let Some(s) = sim("f16_conversions_are_bit_exact") else { return };
    let mut f: Vec<u32> = vec![0, 0x8000_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0000, 0x3380_0000, 0x3300_0000, 0x3300_0001, 0x477f_e000, 0x477f_f000, 0x4780_0000, 0x3880_0000, 0x387f_c000, 0x387f_e000];
    let mut x: u64 = 0x1234_5678_9abc_def1;
    while f.len() < 200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.push(x as u32);
    }
    // Ties: f32 values exactly halfway between two halves, normal and subnormal.
    for hb in (0u32..0x7c00).step_by(97) {
        let lo = half::f16::from_bits(hb as u16).to_f32() as f64;
        let hi = half::f16::from_bits(hb as u16 + 1).to_f32() as f64;
        f.push((((lo + hi) / 2.0) as f32).to_bits());
    }
    let n = f.len();
    let (pf, ph, pfh) = (upload(s, &f), upload(s, &vec![0u16; n]), upload(s, &vec![0f32; 65536]));
    launch(s, "f16_convert", n.div_ceil(256) as u32, 256, 0, &mut [pf, ph, pfh, n as u64]).unwrap();
    let to_half: Vec<u16> = download(s, ph, n);
    let from_half: Vec<f32> = download(s, pfh, 65536);
    for (i, &bits) in f.iter().enumerate() {
        let v = f32::from_bits(bits);
        let want = half::f16::from_f32(v);
        if v.is_nan() {
            assert!(half::f16::from_bits(to_half[i]).is_nan(), "NaN {bits:#x}");
        } else {
            assert_eq!(to_half[i], want.to_bits(), "f2h({v:e} = {bits:#x})");
        }
    }
    for h in 0..65536u32 {
        let want = half::f16::from_bits(h as u16).to_f32();
        assert!(from_half[h as usize].to_bits() == want.to_bits() || want.is_nan() && from_half[h as usize].is_nan(), "h2f({h:#x})");
    }
}

#[test]
fn unwritten_memory_reads_as_nan() {
    let Some(s) = sim("unwritten_memory_reads_as_nan") else { return };
    // SAFETY: a fresh allocation, read back without a write.
    let p = unsafe { cu::malloc_sync(64 * 4) }.unwrap();
    assert!(download::<f32>(s, p, 64).iter().all(|v| v.is_nan()), "device memory starts as NaN");
    launch(s, "read_uninit", 1, 64, 0, &mut [p, 1]).unwrap();
    assert!(download::<f32>(s, p, 64).iter().all(|&v| v == 5.0));
    launch(s, "read_uninit", 1, 64, 0, &mut [p, 0]).unwrap();
    assert!(download::<f32>(s, p, 64).iter().all(|v| v.is_nan()), "shared memory starts as NaN");
}

#[test]
fn an_overrun_is_caught_and_the_simulator_goes_on() {
    let Some(s) = sim("an_overrun_is_caught_and_the_simulator_goes_on") else { return };
    let n = 1000usize;
    let (px, py) = (upload(s, &vec![1f32; n]), upload(s, &vec![0f32; n]));
    let e = launch(s, "overrun", 4, 256, 0, &mut [px, py, n as u64]).unwrap_err();
    assert!(e.contains("CUDA_ERROR_ILLEGAL_ADDRESS") || e.contains("illegal"), "{e}");
    assert!(e.contains("overrun") && e.contains("past the end of a 4000-byte allocation"), "{e}");
    // Still usable: a correct launch runs.
    launch(s, "scale", 4, 256, 0, &mut [py, f32a(2.0), n as u64]).unwrap();
    // y was 0, or 2 where a block ran before the fault: 0 * 2 + 1, 2 * 2 + 1.
    assert!(download::<f32>(s, py, n).iter().all(|&v| v == 1.0 || v == 5.0));
}

#[test]
fn deadlocks_and_divergence_are_reported_not_hung() {
    let Some(s) = sim("deadlocks_and_divergence_are_reported_not_hung") else { return };
    let y = upload(s, &vec![0f32; 64]);
    let e = launch(s, "divergent_barrier", 1, 64, 0, &mut [y]).unwrap_err();
    assert!(e.contains("divergent_barrier") && e.contains("__syncthreads"), "{e}");
    let e = launch(s, "exited_lanes", 1, 64, 0, &mut [y]).unwrap_err();
    assert!(e.contains("exited_lanes") && (e.contains("exited") || e.contains("deadlock")), "{e}");
    let e = launch(s, "mixed_collectives", 1, 32, 0, &mut [y]).unwrap_err();
    assert!(e.contains("mixed_collectives") && (e.contains("divergent warp collective") || e.contains("deadlock")), "{e}");
}

#[test]
fn bad_launches_are_refused_with_the_reason() {
    let Some(s) = sim("bad_launches_are_refused_with_the_reason") else { return };
    let y = upload(s, &vec![0f32; 64]);
    // An int where a pointer goes.
    let e = launch(s, "scale", 1, 64, 0, &mut [12345, f32a(1.0), 64]).unwrap_err();
    assert!(e.contains("parameter 0") && e.contains("not device memory"), "{e}");
    // Past __launch_bounds__(1024) and the block limit.
    let e = launch(s, "block_sums", 1, 2048, 0, &mut [y, y, 64]).unwrap_err();
    assert!(e.contains("too large"), "{e}");
    // A copy past an allocation's end.
    let mut big = vec![0f32; 65];
    // SAFETY: the simulator checks the device range and refuses.
    let r = unsafe { cu::memcpy_dtoh_async(&mut big, y, s.stream) };
    assert!(r.is_err());
    assert!(last_error().contains("not inside one device allocation"));
}

#[test]
fn graphs_replay_their_launches() {
    let Some(s) = sim("graphs_replay_their_launches") else { return };
    let n = 300usize;
    let x = upload(s, &vec![1f32; n]);
    // A stream of its own: the other tests' copies on a capturing stream would (rightly)
    // invalidate the capture.
    let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking).unwrap();
    // SAFETY: capture on this test's stream; the graph is destroyed below.
    unsafe {
        cu::stream::begin_capture(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
        for k in [2.0f32, 3.0] {
            let f = func(s, "scale");
            let mut args = [x, f32a(k), n as u64];
            let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
            cu::launch_kernel(f, (2, 1, 1), (256, 1, 1), 0, stream, &mut ptrs).unwrap();
        }
        let g = cu::stream::end_capture(stream).unwrap();
        // Captured, not run.
        assert!(download::<f32>(s, x, n).iter().all(|&v| v == 1.0));
        let exec = cu::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)).unwrap();
        cu::graph::launch(exec, stream).unwrap();
        assert!(download::<f32>(s, x, n).iter().all(|&v| v == (1.0 * 2.0 + 1.0) * 3.0 + 1.0));
        cu::graph::launch(exec, stream).unwrap();
        assert!(download::<f32>(s, x, n).iter().all(|&v| v == (10.0 * 2.0 + 1.0) * 3.0 + 1.0));
        let _ = cu::graph::exec_destroy(exec);
        let _ = cu::graph::destroy(g);
    }
}

#[test]
fn shared_memory_races_are_reported() {
    let Some(s) = sim("shared_memory_races_are_reported") else { return };
    // The same kernels, compiled for race checking.
    let src = format!("{}\n{KERNELS}", flint::backend::cuda::SOURCES[0].1);
    let image = compile_with(&src, &["-DFLINT_SIM_RACECHECK"]).unwrap();
    // SAFETY: a unit the simulator's NVRTC built; the stream is the test's.
    let m = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }.unwrap();
    let run = |name: &str, block: u32, sync: u64| -> Result<Vec<f32>, String> {
        let f = unsafe { cu::module::get_function(m, CString::new(name).unwrap()) }.unwrap();
        let y = upload(s, &vec![0f32; block as usize]);
        let mut args = [y, sync];
        let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        unsafe { cu::launch_kernel(f, (2, 1, 1), (block, 1, 1), 0, s.stream, &mut ptrs) }.map_err(|e| format!("{e}: {}", last_error()))?;
        Ok(download(s, y, block as usize))
    };
    let e = run("racy_neighbour", 64, 0).unwrap_err();
    assert!(e.contains("shared-memory race") && e.contains("racy_neighbour") && e.contains("static shared memory"), "{e}");
    let y = run("racy_neighbour", 64, 1).unwrap();
    assert!((0..64).all(|t| y[t] == ((t + 1) % 64) as f32));
    let e = run("racy_in_warp", 32, 0).unwrap_err();
    assert!(e.contains("shared-memory race") && e.contains("racy_in_warp"), "{e}");
    let y = run("racy_in_warp", 32, 1).unwrap();
    assert!((0..32).all(|t| y[t] == (t ^ 1) as f32));
    // The kernels of Flint's own test set, race-free: block sums (barriers and shuffles).
    let f = unsafe { cu::module::get_function(m, CString::new("block_sums").unwrap()) }.unwrap();
    let x = upload(s, &vec![1f32; 1000]);
    let y = upload(s, &vec![0f32; 4]);
    let mut args = [x, y, 1000u64];
    let mut ptrs: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
    unsafe { cu::launch_kernel(f, (4, 1, 1), (256, 1, 1), 0, s.stream, &mut ptrs) }.map_err(|e| format!("{e}: {}", last_error())).unwrap();
    assert_eq!(download::<f32>(s, y, 4), vec![256.0, 256.0, 256.0, 232.0]);
}

/// Units loaded, unloaded and loaded again are each their own (the dynamic loader knows
/// objects by path: a path used twice would hand back the unit loaded before).
#[test]
fn each_load_is_its_own_unit() {
    let Some(_) = sim("each_load_is_its_own_unit") else { return };
    let a = compile("extern \"C\" __global__ void only_in_a(float* y) { y[0] = 1.0f; }").unwrap();
    let b = compile("extern \"C\" __global__ void only_in_b(float* y) { y[0] = 2.0f; }").unwrap();
    for _ in 0..4 {
        for (image, name, other) in [(&a, "only_in_a", "only_in_b"), (&b, "only_in_b", "only_in_a")] {
            // SAFETY: units the simulator's NVRTC built; unloaded at once.
            unsafe {
                let m = cu::module::load_data(image.as_ptr() as *const c_void).unwrap();
                assert!(cu::module::get_function(m, CString::new(name).unwrap()).is_ok(), "{name}");
                assert!(cu::module::get_function(m, CString::new(other).unwrap()).is_err(), "{other}");
                cu::module::unload(m).unwrap();
            }
        }
    }
}
