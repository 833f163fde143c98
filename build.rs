//! Records the facts a benchmark report needs beside every figure: the CUDA arch list and
//! nvcc release the kernels were built with (from tritter-kernels-cuda's build metadata) and
//! the git revision of the tree (with `-dirty` when it has uncommitted changes).

use std::path::Path;
use std::process::Command;

fn main() {
    let archs =
        std::env::var("DEP_TRITTER_KERNELS_CUDA_ARCHS").unwrap_or_else(|_| "unknown".into());
    let nvcc = std::env::var("DEP_TRITTER_KERNELS_CUDA_NVCC").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=TRITTER_BUILD_CUDA_ARCHS={archs}");
    println!("cargo:rustc-env=TRITTER_BUILD_NVCC={nvcc}");
    println!("cargo:rustc-env=TRITTER_BUILD_GIT_REV={}", git_rev());
    println!("cargo:rerun-if-changed=build.rs");
    for p in [".git/HEAD", ".git/logs/HEAD", ".git/index"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-env-changed=TRITTER_GIT_REV");
}

/// `TRITTER_GIT_REV` if set (bundles built outside a checkout), else `git rev-parse`.
fn git_rev() -> String {
    if let Ok(rev) = std::env::var("TRITTER_GIT_REV") {
        return rev;
    }
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match run(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev}-dirty")
            } else {
                rev
            }
        }
        None => "unknown".into(),
    }
}
