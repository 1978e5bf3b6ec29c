//! Gradient optimizers on host slices (SGD, AdamW, Adafactor), schedules and clipping.

use serde::{Deserialize, Serialize};
use softprompt_core::{Error, Optimizer, OptimizerKind, Result};

fn check_len(name: &str, params: &[f32], grads: &[f32], state: usize) -> Result<()> {
    if params.len() != grads.len() || (state != 0 && state != params.len()) {
        return Err(Error::Shape(format!(
            "{name}: {} parameters, {} gradients, state of {state}",
            params.len(),
            grads.len()
        )));
    }
    Ok(())
}

fn load<T: for<'de> Deserialize<'de>>(name: &str, state: &serde_json::Value) -> Result<T> {
    serde_json::from_value(state.clone())
        .map_err(|e| Error::InvalidArgument(format!("bad {name} state: {e}")))
}

fn to_json<T: Serialize>(x: &T) -> serde_json::Value {
    serde_json::to_value(x).expect("optimizer state serializes")
}

/// Stochastic gradient descent with optional momentum and L2 weight decay (PyTorch's `SGD`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sgd {
    /// Momentum factor (0 disables).
    pub momentum: f32,
    /// L2 penalty added to the gradient.
    pub weight_decay: f32,
    buf: Vec<f32>,
}

impl Sgd {
    /// Plain SGD.
    pub fn new() -> Self {
        Sgd {
            momentum: 0.0,
            weight_decay: 0.0,
            buf: Vec::new(),
        }
    }

    /// With momentum.
    pub fn with_momentum(mut self, m: f32) -> Self {
        self.momentum = m;
        self
    }
}

impl Default for Sgd {
    fn default() -> Self {
        Self::new()
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &str {
        "sgd"
    }
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Gradient
    }
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) -> Result<()> {
        check_len("sgd", params, grads, self.buf.len())?;
        if self.momentum != 0.0 && self.buf.is_empty() {
            self.buf = vec![0.0; params.len()];
        }
        for i in 0..params.len() {
            let mut g = grads[i] + self.weight_decay * params[i];
            if self.momentum != 0.0 {
                self.buf[i] = self.momentum * self.buf[i] + g;
                g = self.buf[i];
            }
            params[i] -= lr * g;
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        to_json(self)
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        *self = load("sgd", state)?;
        Ok(())
    }
}

/// AdamW with decoupled weight decay (PyTorch's `AdamW`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdamW {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    t: u64,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl AdamW {
    /// PyTorch defaults: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01.
    pub fn new() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            t: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Sets the weight decay.
    pub fn with_weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }
}

impl Default for AdamW {
    fn default() -> Self {
        Self::new()
    }
}

impl Optimizer for AdamW {
    fn name(&self) -> &str {
        "adamw"
    }
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Gradient
    }
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) -> Result<()> {
        check_len("adamw", params, grads, self.m.len())?;
        if self.m.is_empty() {
            self.m = vec![0.0; params.len()];
            self.v = vec![0.0; params.len()];
        }
        self.t += 1;
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.t as i32);
        let step = lr as f64 / bc1;
        for i in 0..params.len() {
            let g = grads[i];
            params[i] *= 1.0 - lr * self.weight_decay;
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * g;
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * g * g;
            let denom = ((self.v[i] as f64).sqrt() / bc2.sqrt()) + self.eps as f64;
            params[i] -= (step * self.m[i] as f64 / denom) as f32;
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        to_json(self)
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        *self = load("adamw", state)?;
        Ok(())
    }
}

/// Adafactor (Shazeer & Stern 2018) as Lester et al. used it for prompt tuning: factored second
/// moments over the `[N, d]` prompt, β₂ₜ = 1 − t^−0.8, update clipping at RMS 1, no momentum,
/// no parameter scaling, no relative step, weight decay 1e-5 (use lr 0.3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adafactor {
    /// Exponent of the β₂ schedule (−0.8 in Lester et al.).
    pub decay_rate: f32,
    /// Update clipping threshold on the RMS of the update.
    pub clip_threshold: f32,
    /// Regulariser added to squared gradients.
    pub eps1: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    rows: usize,
    cols: usize,
    t: u64,
    row_sq: Vec<f32>,
    col_sq: Vec<f32>,
}

impl Adafactor {
    /// For a parameter of shape `[rows, cols]` (the prompt's `[N, d]`).
    pub fn new(rows: usize, cols: usize) -> Self {
        Adafactor {
            decay_rate: -0.8,
            clip_threshold: 1.0,
            eps1: 1e-30,
            weight_decay: 1e-5,
            rows,
            cols,
            t: 0,
            row_sq: vec![0.0; rows],
            col_sq: vec![0.0; cols],
        }
    }
}

impl Optimizer for Adafactor {
    fn name(&self) -> &str {
        "adafactor"
    }
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::Gradient
    }
    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) -> Result<()> {
        check_len("adafactor", params, grads, self.rows * self.cols)?;
        let (r, c) = (self.rows, self.cols);
        self.t += 1;
        let beta2 = 1.0 - (self.t as f64).powf(self.decay_rate as f64);
        let sq: Vec<f64> = grads
            .iter()
            .map(|g| (*g as f64) * (*g as f64) + self.eps1 as f64)
            .collect();
        for i in 0..r {
            let mean = sq[i * c..(i + 1) * c].iter().sum::<f64>() / c as f64;
            self.row_sq[i] = (beta2 * self.row_sq[i] as f64 + (1.0 - beta2) * mean) as f32;
        }
        for j in 0..c {
            let mean = (0..r).map(|i| sq[i * c + j]).sum::<f64>() / r as f64;
            self.col_sq[j] = (beta2 * self.col_sq[j] as f64 + (1.0 - beta2) * mean) as f32;
        }
        let row_mean = self.row_sq.iter().map(|x| *x as f64).sum::<f64>() / r as f64;
        let mut update = vec![0f64; r * c];
        for i in 0..r {
            let rf = 1.0 / ((self.row_sq[i] as f64) / row_mean).sqrt();
            for j in 0..c {
                let cf = 1.0 / (self.col_sq[j] as f64).sqrt();
                update[i * c + j] = rf * cf * grads[i * c + j] as f64;
            }
        }
        let rms = (update.iter().map(|u| u * u).sum::<f64>() / update.len() as f64).sqrt();
        let scale = lr as f64 / (rms / self.clip_threshold as f64).max(1.0);
        for (p, u) in params.iter_mut().zip(&update) {
            if self.weight_decay != 0.0 {
                *p -= self.weight_decay * lr * *p;
            }
            *p -= (u * scale) as f32;
        }
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        to_json(self)
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: Adafactor = load("adafactor", state)?;
        if (s.rows, s.cols) != (self.rows, self.cols) {
            return Err(Error::InvalidArgument(format!(
                "adafactor state is for [{}, {}], not [{}, {}]",
                s.rows, s.cols, self.rows, self.cols
            )));
        }
        *self = s;
        Ok(())
    }
}

/// Which optimizer to build, by name (`sgd`, `adamw`, `adafactor`; gradient-free `spsa`, `cma-es`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerChoice {
    /// [`Sgd`].
    Sgd,
    /// [`AdamW`].
    AdamW,
    /// [`Adafactor`].
    Adafactor,
    /// [`crate::free::Spsa`] (MeZO), gradient-free.
    Spsa,
    /// [`crate::free::CmaEs`] (Black-Box Tuning), gradient-free.
    CmaEs,
}

impl std::str::FromStr for OptimizerChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sgd" => Ok(OptimizerChoice::Sgd),
            "adamw" => Ok(OptimizerChoice::AdamW),
            "adafactor" => Ok(OptimizerChoice::Adafactor),
            "spsa" | "mezo" => Ok(OptimizerChoice::Spsa),
            "cma-es" | "cmaes" | "bbt" => Ok(OptimizerChoice::CmaEs),
            other => Err(Error::InvalidArgument(format!(
                "unknown optimizer `{other}` (sgd, adamw, adafactor; gradient-free: spsa, cma-es)"
            ))),
        }
    }
}

impl OptimizerChoice {
    /// Builds the optimizer for a prompt of `[rows, cols]` (seed 0 for the gradient-free ones).
    pub fn build(self, rows: usize, cols: usize, weight_decay: Option<f32>) -> Box<dyn Optimizer> {
        self.build_seeded(rows, cols, weight_decay, 0)
    }

    /// Builds the optimizer; `seed` draws the perturbations / projection of gradient-free ones.
    pub fn build_seeded(
        self,
        rows: usize,
        cols: usize,
        weight_decay: Option<f32>,
        seed: u64,
    ) -> Box<dyn Optimizer> {
        match self {
            OptimizerChoice::Spsa => Box::new(crate::free::Spsa::new(1e-2, seed)),
            OptimizerChoice::CmaEs => Box::new(crate::free::CmaEs::new(seed)),
            OptimizerChoice::Sgd => {
                let mut o = Sgd::new();
                o.weight_decay = weight_decay.unwrap_or(0.0);
                Box::new(o)
            }
            OptimizerChoice::AdamW => {
                Box::new(AdamW::new().with_weight_decay(weight_decay.unwrap_or(0.01)))
            }
            OptimizerChoice::Adafactor => {
                let mut o = Adafactor::new(rows, cols);
                o.weight_decay = weight_decay.unwrap_or(1e-5);
                Box::new(o)
            }
        }
    }
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total` steps.
    WarmupLinear {
        /// Warmup steps.
        warmup: u64,
        /// Total steps.
        total: u64,
    },
}

impl Schedule {
    /// Multiplier of the base rate at (0-based) `step`.
    pub fn factor(&self, step: u64) -> f32 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupLinear { warmup, total } => {
                if step < warmup {
                    (step + 1) as f32 / warmup as f32
                } else if total <= warmup {
                    1.0
                } else {
                    ((total.saturating_sub(step)) as f32 / (total - warmup) as f32).clamp(0.0, 1.0)
                }
            }
        }
    }
}

/// Scales `grads` so their L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grads
        .iter()
        .map(|g| (*g as f64) * (*g as f64))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        grads.iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f(x) = Σ (x - t)² ; every optimizer should approach t.
    fn minimise(opt: &mut dyn Optimizer, lr: f32, steps: usize) -> f32 {
        let target = [1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25];
        let mut x = vec![0.0f32; 6];
        for _ in 0..steps {
            let g: Vec<f32> = x.iter().zip(&target).map(|(a, t)| 2.0 * (a - t)).collect();
            opt.step(&mut x, &g, lr).unwrap();
        }
        x.iter()
            .zip(&target)
            .map(|(a, t)| (a - t).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn optimizers_minimise_a_quadratic() {
        assert!(minimise(&mut Sgd::new(), 0.1, 200) < 1e-3);
        assert!(minimise(&mut Sgd::new().with_momentum(0.9), 0.02, 400) < 1e-3);
        assert!(minimise(&mut AdamW::new().with_weight_decay(0.0), 0.05, 1000) < 1e-2);
        let mut af = Adafactor::new(2, 3);
        af.weight_decay = 0.0;
        assert!(minimise(&mut af, 0.05, 1000) < 0.06);
    }

    #[test]
    fn adamw_first_step_matches_pytorch() {
        // first AdamW step moves each coordinate by lr·sign(g) (bias-corrected), after decay
        let mut o = AdamW::new();
        let mut p = vec![1.0f32, -1.0];
        o.step(&mut p, &[0.5, -3.0], 0.1).unwrap();
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-(1.0 - 0.001) + 0.1)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn adafactor_update_rms_is_clipped_to_lr() {
        let mut o = Adafactor::new(2, 2);
        o.weight_decay = 0.0;
        let mut p = vec![0.0f32; 4];
        // a rank-one gradient makes the factored second moment exact: update = sign(g)
        o.step(&mut p, &[1.0, 2.0, 3.0, 6.0], 0.3).unwrap();
        let rms = (p.iter().map(|x| x * x).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 0.3).abs() < 1e-4, "rms {rms}");
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let grads = [
            [0.3f32, -0.2, 0.1, 0.9],
            [0.1, 0.1, -0.5, 0.2],
            [0.7, -0.1, 0.0, 0.3],
        ];
        for choice in [
            OptimizerChoice::Sgd,
            OptimizerChoice::AdamW,
            OptimizerChoice::Adafactor,
        ] {
            let mut a = choice.build(2, 2, None);
            let mut pa = vec![0.5f32; 4];
            a.step(&mut pa, &grads[0], 0.1).unwrap();
            let mut b = choice.build(2, 2, None);
            b.load_state(&serde_json::from_str(&a.state().to_string()).unwrap())
                .unwrap();
            let mut pb = pa.clone();
            for g in &grads[1..] {
                a.step(&mut pa, g, 0.1).unwrap();
                b.step(&mut pb, g, 0.1).unwrap();
            }
            assert_eq!(pa, pb, "{choice:?}");
        }
        assert!(AdamW::new()
            .load_state(&serde_json::json!({"nope": 1}))
            .is_err());
    }

    #[test]
    fn schedules_and_clipping() {
        let s = Schedule::WarmupLinear {
            warmup: 10,
            total: 110,
        };
        assert!((s.factor(0) - 0.1).abs() < 1e-6);
        assert!((s.factor(9) - 1.0).abs() < 1e-6);
        assert!((s.factor(60) - 0.5).abs() < 1e-6);
        assert_eq!(s.factor(200), 0.0);
        assert_eq!(Schedule::Constant.factor(5), 1.0);
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        let mut g = vec![0.3f32, 0.4];
        clip_grad_norm(&mut g, 1.0);
        assert_eq!(g, vec![0.3, 0.4]);
    }
}
