//! Generates the agent API from proto/agent.proto with the pure-Rust protobuf
//! parser (no protoc needed).

use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let proto = "proto/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .inputs([proto])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generating the agent API from proto/agent.proto");
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&out.join(file));
    }
}

/// `include!` cannot take a file with inner attributes or docs (`#![allow(..)]`, `//!`); lib.rs
/// puts the allowances on the modules instead.
fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path).expect("reading generated code");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("#![") && !l.starts_with("//!"))
        .collect();
    fs::write(path, kept.join("\n")).expect("rewriting generated code");
}
