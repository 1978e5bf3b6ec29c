//! A missing ONNX Runtime library is a typed error that names the fix (its own test process:
//! the runtime is loaded once per process).

use std::path::PathBuf;

use softprompt_core::Error;
use softprompt_ort::{OrtBackbone, OrtOptions};

#[test]
fn a_missing_library_names_the_setup_commands() {
    std::env::set_var("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1");
    let cache = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
    let err = OrtBackbone::load(model, OrtOptions::new().with_cache_dir(cache.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Backend { .. }), "{err:?}");
    assert!(
        msg.contains("/nonexistent/libonnxruntime.so.1.31.1"),
        "{msg}"
    );
    assert!(
        msg.contains("tools/setup-python.sh") && msg.contains("tools/ort-env.sh"),
        "{msg}"
    );
    // reported before any export work
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}
