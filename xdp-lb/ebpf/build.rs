//! Rebuild the eBPF object when the linker changes (a new bpf-linker may emit different BTF).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found on PATH ({err}); run scripts/bootstrap.sh")
        }
    }
}
