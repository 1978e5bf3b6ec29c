//! The conformance suite, once per backend compiled in.

#[cfg(feature = "candle")]
softprompt_tests::conformance_suite!(candle, |path| softprompt::load_backbone(
    "candle", path, "cpu"
)
.unwrap());
