// The library stands in for the CUDA driver: its SONAME is the driver's, so that once Flint
// has loaded it, cudarc's dlopen("libcuda.so") finds it instead of looking for a real one.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so");
}
