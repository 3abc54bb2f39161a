//! Link settings of the nano-agent binary that depend on the target.
//!
//! The image's binary is a static PIE on musl (build/Dockerfile). Its relative relocations are
//! applied at every start, and the classic table (`.rela.dyn`, 24 bytes per pointer: about
//! 450 KiB) is read in full to do it, so all of it stayed in the agent's RSS. Packed relative
//! relocations (DT_RELR, GNU ld >= 2.38; musl >= 1.2.4 applies them, Rust's bundled musl is
//! 1.2.5) encode the same pointers in a few KiB, keeping the binary position independent.
//! glibc builds are left alone: their loader needs glibc >= 2.36 for DT_RELR.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        println!("cargo:rustc-link-arg-bin=nano-agent=-Wl,-z,pack-relative-relocs");
    }
}
