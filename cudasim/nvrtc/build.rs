// Stands in for NVRTC: its SONAME is NVRTC's (see ../build.rs).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvrtc.so");
}
