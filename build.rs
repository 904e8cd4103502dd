// The murmur crate's build script: the qemu probe its end-to-end tests share with the
// activities crate (`activities/build.rs`), and the commit its binaries report
// (`murmur_build_info`, `murmur version`) as `MURMUR_COMMIT`: `git rev-parse --short=12 HEAD`,
// or `unknown` outside a git checkout (`MURMUR_COMMIT` set at build time wins, for packagers);
// and the host gateway's gRPC code from `proto/`.

mod qemu_probe {
    include!("activities/build.rs");

    pub fn run() {
        main();
    }
}

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The host gateway's gRPC code, from `proto/` with the pure-Rust `protox` compiler (no
/// `protoc` needed).
fn gateway_protos() {
    let proto = "proto/murmur/gateway/v1/gateway.proto";
    println!("cargo::rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compile the gateway protocol");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate the gateway's gRPC code");
}

fn main() {
    qemu_probe::run();
    gateway_protos();
    println!("cargo::rerun-if-env-changed=MURMUR_COMMIT");
    let commit = std::env::var("MURMUR_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        // A new commit moves HEAD's ref (or packed-refs); a checkout moves HEAD.
        println!("cargo::rerun-if-changed={git_dir}/HEAD");
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo::rerun-if-changed={git_dir}/{reference}");
        }
        println!("cargo::rerun-if-changed={git_dir}/packed-refs");
    }
    println!(
        "cargo::rustc-env=MURMUR_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}
