//! Compiles every `kernels/*.cu` into a fatbin and generates `kernels.rs`, which embeds
//! each image as a `KernelImage` constant.
//!
//! * Feature `cuda` off: nothing CUDA is needed; every image is empty.
//! * Feature `cuda` on: nvcc is found through `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then the
//!   pip venv made by `scripts/setup-cuda.sh` (`TRITTER_CUDA_VENV` or a `.venv-cuda` folder
//!   in this crate or an ancestor), then `PATH`; no nvcc is a hard error naming the script.
//! * Targets: `-gencode` for each arch of `TRITTER_CUDA_ARCHS` (default `90,120`) as SASS,
//!   plus PTX of the highest arch so newer GPUs can JIT it.
//! * ptxas `--resource-usage` (registers, shared memory, spills) is written to
//!   `$OUT_DIR/resource-usage.txt` and to this script's stderr (kept by cargo in
//!   `target/*/build/tritter-kernels-cuda-*/stderr`); `TRITTER_CUDA_VERBOSE=1` also prints
//!   it as cargo warnings.
//! * A kernel is recompiled only when its source, a header, the flags or nvcc change
//!   (content hash stored beside the fatbin).
//! * Per-kernel extra flags: a line `// nvcc-flags: --use_fast_math` in the `.cu` file,
//!   allowed only where the kernel's accuracy test permits it (DESIGN.md section 2).

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "90,120";

struct Kernel {
    name: String,
    source: PathBuf,
    extra_flags: Vec<String>,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest_dir.join("kernels");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "TRITTER_CUDA_VENV",
        "TRITTER_CUDA_ARCHS",
        "TRITTER_CUDA_VERBOSE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let (kernels, headers) = discover(&kernel_dir);
    for path in kernels.iter().map(|k| &k.source).chain(headers.iter()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let archs = parse_archs(&env::var("TRITTER_CUDA_ARCHS").unwrap_or(DEFAULT_ARCHS.into()));

    let mut nvcc_version = String::from("none (feature `cuda` off)");
    if cuda {
        let nvcc = find_nvcc(&manifest_dir).unwrap_or_else(|| {
            panic!(
                "tritter-kernels-cuda: feature `cuda` is on but no nvcc was found \
                 (looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, the venv of \
                 scripts/setup-cuda.sh via $TRITTER_CUDA_VENV or .venv-cuda, and PATH). \
                 Run `scripts/setup-cuda.sh` from the workspace root to install the pinned \
                 CUDA 13.0 toolchain, or set NVCC=/path/to/nvcc."
            )
        });
        nvcc_version = nvcc_release(&nvcc);
        compile_all(
            &nvcc,
            &nvcc_version,
            &kernels,
            &headers,
            &kernel_dir,
            &archs,
            &out_dir,
        );
    }

    let arch_list = archs
        .iter()
        .map(|a| format!("sm_{a}"))
        .collect::<Vec<_>>()
        .join(",");
    write_bindings(&kernels, cuda, &out_dir, &arch_list, &nvcc_version);
    // Metadata for dependents' build scripts (DEP_TRITTER_KERNELS_CUDA_ARCHS, ..._NVCC).
    println!("cargo:archs={arch_list}");
    println!("cargo:nvcc={nvcc_version}");
}

/// `.cu` files are kernels (one fatbin each); `.cuh` files are shared headers.
fn discover(dir: &Path) -> (Vec<Kernel>, Vec<PathBuf>) {
    let mut kernels = Vec::new();
    let mut headers = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read kernel folder {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        match path.extension().and_then(|e| e.to_str()) {
            Some("cu") => {
                let text = fs::read_to_string(&path).unwrap();
                let extra_flags = text
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("// nvcc-flags:"))
                    .flat_map(|f| f.split_whitespace().map(str::to_owned))
                    .collect();
                let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                    "kernel file names must be snake_case, got {name}.cu"
                );
                kernels.push(Kernel {
                    name,
                    source: path,
                    extra_flags,
                });
            }
            Some("cuh") => headers.push(path),
            _ => {}
        }
    }
    (kernels, headers)
}

fn parse_archs(spec: &str) -> Vec<u32> {
    let mut archs: Vec<u32> = spec
        .split([',', ' ', ';'])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let digits = s
                .trim()
                .trim_start_matches("sm_")
                .trim_start_matches("compute_");
            digits.parse().unwrap_or_else(|_| {
                panic!("TRITTER_CUDA_ARCHS entry {s:?} is not an arch number like 90 or 120")
            })
        })
        .collect();
    assert!(
        !archs.is_empty(),
        "TRITTER_CUDA_ARCHS is empty; expected e.g. \"90,120\""
    );
    archs.sort_unstable();
    archs.dedup();
    archs
}

fn gencode_flags(archs: &[u32]) -> Vec<String> {
    let mut flags = Vec::new();
    for a in archs {
        flags.push("-gencode".into());
        flags.push(format!("arch=compute_{a},code=sm_{a}"));
    }
    let max = archs.iter().max().unwrap();
    flags.push("-gencode".into());
    flags.push(format!("arch=compute_{max},code=compute_{max}"));
    flags
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Some(p) = env::var_os("NVCC").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
        panic!("NVCC={} does not name a file", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join(exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut venvs: Vec<PathBuf> = env::var_os("TRITTER_CUDA_VENV")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    venvs.extend(manifest_dir.ancestors().map(|a| a.join(".venv-cuda")));
    for venv in venvs {
        if let Some(p) = nvcc_in_venv(&venv, exe) {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
}

/// pip puts nvcc at `<venv>/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`.
fn nvcc_in_venv(venv: &Path, exe: &str) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<_> = fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    pythons.sort();
    pythons.into_iter().rev().find_map(|py| {
        let p = py.join("site-packages/nvidia/cu13/bin").join(exe);
        p.is_file().then_some(p)
    })
}

fn nvcc_release(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("release ").nth(1))
        .map(|r| format!("nvcc {}", r.trim()))
        .unwrap_or_else(|| panic!("unexpected `nvcc --version` output: {text}"))
}

fn compile_all(
    nvcc: &Path,
    nvcc_version: &str,
    kernels: &[Kernel],
    headers: &[PathBuf],
    include_dir: &Path,
    archs: &[u32],
    out_dir: &Path,
) {
    let mut header_hasher = DefaultHasher::new();
    for h in headers {
        fs::read(h).unwrap().hash(&mut header_hasher);
    }
    let header_hash = header_hasher.finish();
    let gencode = gencode_flags(archs);

    // Kernels compile in parallel (nvcc is single-threaded per file).
    let jobs: usize = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(2)
        .max(1);
    let reports: Vec<(String, String)> = std::thread::scope(|scope| {
        let mut pending: Vec<_> = kernels.iter().collect();
        let mut reports = Vec::new();
        while !pending.is_empty() {
            let batch: Vec<_> = pending.drain(..pending.len().min(jobs)).collect();
            let handles: Vec<_> = batch
                .into_iter()
                .map(|k| {
                    let gencode = &gencode;
                    scope.spawn(move || {
                        compile_one(
                            nvcc,
                            nvcc_version,
                            k,
                            header_hash,
                            include_dir,
                            gencode,
                            out_dir,
                        )
                    })
                })
                .collect();
            reports.extend(handles.into_iter().map(|h| h.join().unwrap()));
        }
        reports
    });

    let mut all = String::new();
    for (name, report) in &reports {
        let _ = writeln!(all, "==== {name} ({nvcc_version}) ====\n{report}");
    }
    fs::write(out_dir.join("resource-usage.txt"), &all).unwrap();
    eprintln!("{all}");
    if env::var_os("TRITTER_CUDA_VERBOSE").is_some() {
        for line in all
            .lines()
            .filter(|l| l.contains("Used") || l.contains("spill") || l.contains("===="))
        {
            println!("cargo:warning={line}");
        }
    }
}

/// Compiles one kernel unless its content hash matches the last build; returns the
/// ptxas resource report.
fn compile_one(
    nvcc: &Path,
    nvcc_version: &str,
    k: &Kernel,
    header_hash: u64,
    include_dir: &Path,
    gencode: &[String],
    out_dir: &Path,
) -> (String, String) {
    let fatbin = out_dir.join(format!("{}.fatbin", k.name));
    let stamp = out_dir.join(format!("{}.hash", k.name));
    let report_path = out_dir.join(format!("{}.resources.txt", k.name));

    let mut args: Vec<String> = vec![
        "--fatbin".into(),
        "-O3".into(),
        "-std=c++17".into(),
        "--resource-usage".into(),
    ];
    args.extend(gencode.iter().cloned());
    args.extend(k.extra_flags.iter().cloned());
    args.push(format!("-I{}", include_dir.display()));

    let mut h = DefaultHasher::new();
    fs::read(&k.source).unwrap().hash(&mut h);
    header_hash.hash(&mut h);
    args.hash(&mut h);
    nvcc_version.hash(&mut h);
    let digest = format!("{:016x}", h.finish());
    if fatbin.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(digest.as_str()) {
        let report = fs::read_to_string(&report_path).unwrap_or_default();
        return (k.name.clone(), report);
    }

    let out = Command::new(nvcc)
        .args(&args)
        .arg("-o")
        .arg(&fatbin)
        .arg(&k.source)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", nvcc.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        panic!(
            "nvcc failed on {} ({}):\n{} {}\n{report}",
            k.source.display(),
            out.status,
            nvcc.display(),
            args.join(" ")
        );
    }
    fs::write(&report_path, &report).unwrap();
    fs::write(&stamp, &digest).unwrap();
    (k.name.clone(), report)
}

fn write_bindings(kernels: &[Kernel], cuda: bool, out_dir: &Path, archs: &str, nvcc: &str) {
    let mut code = String::from("// @generated by kernels-cuda/build.rs\n");
    let _ = writeln!(
        code,
        "/// Architectures the embedded fatbins were built for (SASS; PTX of the highest).\n\
         pub const CUDA_ARCHS: &str = {archs:?};\n\
         /// nvcc release that built the fatbins, or why none did.\n\
         pub const NVCC_VERSION: &str = {nvcc:?};\n"
    );
    for k in kernels {
        let konst = k.name.to_ascii_uppercase();
        let bytes = if cuda {
            format!(
                "include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}.fatbin\"))",
                k.name
            )
        } else {
            "&[]".into()
        };
        let _ = writeln!(
            code,
            "/// Fatbin of `kernels/{name}.cu` (empty without feature `cuda`).\n\
             pub const {konst}: KernelImage = KernelImage {{ name: {name:?}, fatbin: {bytes} }};",
            name = k.name
        );
    }
    let list = kernels
        .iter()
        .map(|k| k.name.to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        code,
        "\n/// Every embedded kernel image.\npub const ALL: &[KernelImage] = &[{list}];"
    );
    fs::write(out_dir.join("kernels.rs"), code).unwrap();
}
