// Finds out at build time whether the qemu tests can run here, so that where they cannot
// they are reported as *ignored* (with the reason), never as passing.
//
// Sets `cfg(murmur_qemu)` when `qemu-system-x86_64` is installed (`MURMUR_QEMU`, or on
// `PATH`), or when `MURMUR_REQUIRE_QEMU=1` (CI): then the qemu tests run, and fail with a
// clear message if qemu is missing after all. The build reruns when a `PATH` directory
// changes (qemu installed or removed) or one of those variables does. The murmur crate's own
// build script includes this file, for its end-to-end qemu tests.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(murmur_qemu)");
    for var in ["MURMUR_REQUIRE_QEMU", "MURMUR_QEMU", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .filter(|d| d.is_dir())
        .collect();
    for dir in &dirs {
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    let installed = match std::env::var_os("MURMUR_QEMU") {
        Some(p) => PathBuf::from(p).is_file(),
        None => dirs.iter().any(|d| d.join("qemu-system-x86_64").is_file()),
    };
    let required = std::env::var("MURMUR_REQUIRE_QEMU").is_ok_and(|v| v == "1");
    if installed || required {
        println!("cargo::rustc-cfg=murmur_qemu");
    }
    if required && !installed {
        println!(
            "cargo::warning=MURMUR_REQUIRE_QEMU=1 but qemu-system-x86_64 is not installed: the qemu tests will fail"
        );
    }
}
