//! The conformance suite, once per backend compiled in.

#[cfg(feature = "candle")]
softprompt_tests::conformance_suite!(
    candle,
    |path| softprompt::load_backbone("candle", path, "cpu").unwrap(),
    gradients: true,
    generation: true
);

#[cfg(feature = "tch")]
softprompt_tests::conformance_suite!(
    tch,
    |path| softprompt::load_backbone("tch", path, "cpu").unwrap(),
    gradients: true,
    generation: true
);

#[cfg(feature = "ort")]
softprompt_tests::conformance_suite!(
    ort,
    |path| softprompt::load_backbone("ort", path, "cpu").unwrap(),
    gradients: false,
    generation: true
);
