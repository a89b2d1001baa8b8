//! Run-time compilation of the embedded sources with NVRTC, straight to a cubin for one exact
//! architecture (so the driver never JIT-compiles PTX at load time).

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use crate::arch::GpuArch;
use crate::sources::{compile_options, KernelSource};
use crate::KernelError;

/// Whether libnvrtc can be loaded (cudarc searches libnvrtc.so, .so.13, .so.12 on the loader
/// path). Checked before any NVRTC call, because cudarc panics when the library is missing.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn version() -> Result<(i32, i32), KernelError> {
    if !available() {
        return Err(KernelError::NvrtcMissing);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Nvrtc {
            call: "nvrtcVersion",
            detail: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// One compiled module: the cubin and the compiler's log (ptxas's resource report included).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn log_of(prog: sys::nvrtcProgram) -> String {
    // SAFETY: prog is a live program.
    match unsafe { result::get_program_log(prog) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes)
                .trim_end_matches('\0')
                .to_string()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// Compiles `source` for `arch` with [`compile_options`].
pub fn compile(source: &KernelSource, arch: GpuArch) -> Result<Compiled, KernelError> {
    if !available() {
        return Err(KernelError::NvrtcMissing);
    }
    let program = CString::new(source.program()).expect("kernel sources contain no NUL");
    let name = CString::new(format!("{}.cu", source.name)).expect("module names contain no NUL");
    let prog = result::create_program(&program, Some(name.as_c_str())).map_err(|e| {
        KernelError::Nvrtc {
            call: "nvrtcCreateProgram",
            detail: format!("{e:?}"),
        }
    })?;
    let options = compile_options(source, arch);
    // SAFETY: prog is live until destroy_program below, on every path.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = log_of(prog);
    let out = match compiled {
        Err(e) => Err(KernelError::Compile {
            module: source.name,
            target: arch.nvrtc_target(),
            log: format!("{log}\n({e:?}; options {options:?})"),
        }),
        Ok(()) => cubin_of(prog).map(|cubin| Compiled { cubin, log }),
    };
    // SAFETY: prog came from create_program and is destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, KernelError> {
    let err = |call: &'static str| {
        move |e: result::NvrtcError| KernelError::Nvrtc {
            call,
            detail: format!("{e:?}"),
        }
    };
    let mut size = 0usize;
    // SAFETY: prog compiled successfully for a real sm_ target, so it has a cubin.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(err("nvrtcGetCUBINSize"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes.
    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(err("nvrtcGetCUBIN"))?;
    if cubin.is_empty() {
        return Err(KernelError::Nvrtc {
            call: "nvrtcGetCUBIN",
            detail: "empty cubin".into(),
        });
    }
    Ok(cubin)
}

/// Human-readable compiler identity for cache keys.
pub fn compiler_id() -> Result<String, KernelError> {
    let (major, minor) = version()?;
    Ok(format!("nvrtc {major}.{minor}"))
}
