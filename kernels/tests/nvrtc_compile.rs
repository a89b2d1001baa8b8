//! Compiles every kernel with NVRTC for every CI architecture (sm_80, sm_86, sm_89, sm_90a) and
//! fails on compiler errors or warnings, on register spills and stack frames the kernel's
//! source entry does not accept (`KernelSource::accepted_spill`, `accepted_stack`: each a
//! measured exception), and on warpgroup-MMA waits
//! ptxas had to inject (C7517: an intended asynchronous overlap lost).
//!
//! NVRTC compiles straight to a cubin (its built-in ptxas), and `-Xptxas -v` puts ptxas's
//! resource report in the program log, so spills are checked without a CUDA toolkit or a GPU:
//! only libnvrtc is needed (CI: the `nvidia-cuda-nvrtc==13.0.88` wheel, see .ci/run).
//! Without libnvrtc the test is skipped with a message on a developer machine and fails in CI
//! (`CI=true`).
//!
//! With `FERROTUNE_CUBIN_DIR=DIR` the cubins are also written to `DIR/{module}.{target}.cubin`,
//! to read the machine code (`nvdisasm -c`, e.g. from the `nvidia-cuda-nvdisasm` wheel) — where
//! ptxas spilled, what a source change did to an inner loop; `FERROTUNE_KERNEL_SOURCE_DIR`
//! swaps in variant sources as everywhere else (docs/kernels.md).

use ferrotune_kernels::arch::CI_TARGETS;
use ferrotune_kernels::{nvrtc, ptxas, sources};

fn nvrtc_present_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !in_ci,
        "CI=true but libnvrtc was not found: .ci/run must `pip install nvidia-cuda-nvrtc==13.0.88` \
         and put its nvidia/cu13/lib directory on LD_LIBRARY_PATH"
    );
    eprintln!(
        "SKIPPED nvrtc_compile: libnvrtc not found. To run it: pip install \
         nvidia-cuda-nvrtc==13.0.88 and add its site-packages/nvidia/cu13/lib to LD_LIBRARY_PATH"
    );
    false
}

#[test]
fn every_kernel_compiles_for_every_ci_arch_without_spills() {
    if !nvrtc_present_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for src in sources::ALL {
        for arch in CI_TARGETS {
            let compiled = match nvrtc::compile(src, arch) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(e.to_string());
                    continue;
                }
            };
            let at = format!("{}.cu for {arch}", src.name);
            assert_eq!(&compiled.cubin[..4], b"\x7fELF", "{at}: not a cubin");
            if let Some(dir) = std::env::var_os("FERROTUNE_CUBIN_DIR") {
                let path = std::path::Path::new(&dir).join(format!("{}.{arch}.cubin", src.name));
                std::fs::write(&path, &compiled.cubin)
                    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            }
            if compiled.log.to_lowercase().contains("warning") {
                failures.push(format!("{at}: compiler warnings:\n{}", compiled.log));
            }
            // ptxas C7517: it had to wait for a warpgroup MMA where the code did not, so an
            // intended overlap of the asynchronous wgmma with other work is gone (only an info
            // line, unlike the serialisation warnings above).
            if compiled.log.contains("C7517") {
                failures.push(format!(
                    "{at}: ptxas injected a warpgroup wait (C7517):\n{}",
                    compiled.log
                ));
            }
            let funcs = ptxas::parse(&compiled.log);
            for entry in src.entries {
                match funcs.iter().find(|f| f.name == *entry) {
                    Some(f) => eprintln!(
                        "{at}: {entry}: {} registers, {} B stack",
                        f.registers.unwrap_or(0),
                        f.stack_frame_bytes
                    ),
                    None => failures.push(format!(
                        "{at}: no ptxas report for {entry}:\n{}",
                        compiled.log
                    )),
                }
            }
            for f in &funcs {
                let spill = f.spill_store_bytes + f.spill_load_bytes;
                if spill > src.accepted_spill_bytes(&f.name, &arch.nvrtc_target()) {
                    failures.push(format!(
                        "{at}: {} spills registers ({} B stores, {} B loads)",
                        f.name, f.spill_store_bytes, f.spill_load_bytes
                    ));
                }
                let accepted = src.accepted_stack_bytes(&f.name, &arch.nvrtc_target());
                if f.stack_frame_bytes > accepted {
                    failures.push(format!(
                        "{at}: {} uses a {} B stack frame (accepted: {accepted} B)",
                        f.name, f.stack_frame_bytes
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
