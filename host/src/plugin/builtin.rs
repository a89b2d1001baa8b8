//! The built-in plugins, compiled to wasm32-wasip2 components by `build.rs` and embedded here.

/// A formatter that ships inside the binary.
pub struct Builtin {
    pub name: &'static str,
    pub wasm: &'static [u8],
}

/// Every built-in formatter, by its `--formatter` name.
pub const FORMATTERS: [Builtin; 4] = [
    Builtin {
        name: "alpaca",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/alpaca.wasm")),
    },
    Builtin {
        name: "chat",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/chat.wasm")),
    },
    Builtin {
        name: "text",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/text.wasm")),
    },
    Builtin {
        name: "prompt-completion",
        wasm: include_bytes!(concat!(env!("OUT_DIR"), "/prompt-completion.wasm")),
    },
];

/// The embedded component of built-in formatter `name`.
pub fn formatter(name: &str) -> Option<&'static [u8]> {
    FORMATTERS.iter().find(|b| b.name == name).map(|b| b.wasm)
}
