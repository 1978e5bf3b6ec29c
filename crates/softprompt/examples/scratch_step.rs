use softprompt::*;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let bb = load_backbone_with(
        "candle",
        ".cache/assets/SmolLM2-135M-Instruct.Q4_1.gguf",
        &BackendOptions::default(),
    )?;
    let d = bb.spec().hidden_size;
    let p = SoftPrompt::new(
        20,
        d,
        (0..20 * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 10000.0 - 0.05)
            .collect(),
    )?;
    let rows: Vec<BatchRow> = (0..8)
        .map(|r| {
            BatchRow::with_continuation(
                &(0..56u32)
                    .map(|i| 100 + (i * 37 + r * 11) % 5000)
                    .collect::<Vec<_>>(),
                &[300],
                0,
            )
        })
        .collect();
    let batch = Batch::from_rows(&rows, 0)?;
    let ps = [p];
    bb.loss_and_grad(&ps, &batch)?;
    for _ in 0..6 {
        let t = Instant::now();
        bb.loss(&ps, &batch)?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        bb.loss_and_grad(&ps, &batch)?;
        let g = t.elapsed().as_secs_f64();
        println!("loss (fwd, no grad) {f:.3}s  loss_and_grad {g:.3}s");
    }
    Ok(())
}
