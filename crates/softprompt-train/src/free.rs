//! Gradient-free optimizers: they only need losses, so they train prompts on backends without
//! gradients (forward-only runtimes) and use the per-row prompt input to evaluate all their
//! candidates in one batched forward pass.
//!
//! - [`Spsa`]: simultaneous-perturbation / MeZO two-point estimates. A perturbation is never
//!   stored: its seed is, and the vector is regenerated for the update.
//! - [`CmaEs`]: Black-Box Tuning (Sun et al., 2022): CMA-ES searches a low-dimensional `z`
//!   and the prompt is `p₀ + A z` for a fixed random projection `A` (regenerated from its seed).
//!   The covariance is diagonal (sep-CMA-ES, Ros & Hansen 2008), which keeps every generation
//!   `O(k)` in the intrinsic dimension `k` (~500).

use serde::{Deserialize, Serialize};
use softprompt_core::{Error, Optimizer, OptimizerKind, Result, Rng};

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // splitmix-style combination: distinct streams per (seed, step, index)
    let mut x =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn normals(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn bad_state(name: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("bad {name} state: {e}"))
}

fn check_losses(name: &str, losses: &[f32], expected: usize) -> Result<()> {
    if losses.len() != expected {
        return Err(Error::Shape(format!(
            "{name}: {} losses for {expected} candidates (call ask first)",
            losses.len()
        )));
    }
    if losses.iter().any(|l| !l.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "{name}: a candidate's loss is not finite"
        )));
    }
    Ok(())
}

/// SPSA / MeZO: for each of `perturbations` seeded directions `z ~ N(0, I)`, the losses at
/// `θ ± ε z` give the projected gradient `(L₊ − L₋) / 2ε`; the update is
/// `θ ← θ − lr · mean_j(g_j z_j)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spsa {
    /// Perturbation scale `ε`.
    pub eps: f32,
    /// Two-point estimates per step (2 candidates each).
    pub perturbations: usize,
    seed: u64,
    step: u64,
    asked: bool,
}

impl Spsa {
    /// MeZO with `eps` and one two-point estimate per step.
    pub fn new(eps: f32, seed: u64) -> Self {
        Spsa {
            eps,
            perturbations: 1,
            seed,
            step: 0,
            asked: false,
        }
    }
}

impl Optimizer for Spsa {
    fn name(&self) -> &str {
        "spsa"
    }
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::GradientFree
    }
    fn ask(&mut self, params: &[f32]) -> Result<Vec<Vec<f32>>> {
        if !(self.eps > 0.0 && self.eps.is_finite()) || self.perturbations == 0 {
            return Err(Error::InvalidArgument(format!(
                "spsa needs eps > 0 and at least one perturbation, got eps {} and {}",
                self.eps, self.perturbations
            )));
        }
        let mut out = Vec::with_capacity(2 * self.perturbations);
        for j in 0..self.perturbations {
            let z = normals(mix(self.seed, self.step, j as u64), params.len());
            for sign in [1.0f32, -1.0] {
                out.push(
                    params
                        .iter()
                        .zip(&z)
                        .map(|(p, z)| p + sign * self.eps * z)
                        .collect(),
                );
            }
        }
        self.asked = true;
        Ok(out)
    }
    fn tell(&mut self, params: &mut [f32], losses: &[f32], lr: f32) -> Result<()> {
        if !self.asked {
            return Err(Error::InvalidArgument("spsa: tell before ask".into()));
        }
        check_losses("spsa", losses, 2 * self.perturbations)?;
        let q = self.perturbations as f32;
        for j in 0..self.perturbations {
            let g = (losses[2 * j] - losses[2 * j + 1]) / (2.0 * self.eps);
            let z = normals(mix(self.seed, self.step, j as u64), params.len());
            for (p, z) in params.iter_mut().zip(&z) {
                *p -= lr * g * z / q;
            }
        }
        self.step += 1;
        self.asked = false;
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("spsa state serializes")
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        *self = serde_json::from_value(state.clone()).map_err(|e| bad_state("spsa", e))?;
        Ok(())
    }
}

/// What a [`CmaEs`] run keeps between generations (all of it is checkpointed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct CmaState {
    /// The prompt the search started from, `p₀`.
    origin: Vec<f32>,
    mean: Vec<f64>,
    sigma: f64,
    /// Diagonal of the covariance.
    diag: Vec<f64>,
    path_sigma: Vec<f64>,
    path_c: Vec<f64>,
    generation: u64,
}

/// Black-Box Tuning with sep-CMA-ES: see the module documentation.
#[derive(Debug, Clone)]
pub struct CmaEs {
    /// Candidates per generation `λ`.
    pub population: usize,
    /// Intrinsic dimension `k` (capped at the prompt's size).
    pub intrinsic_dim: usize,
    /// Initial step size `σ₀` in `z` space.
    pub sigma0: f64,
    seed: u64,
    /// `A`, row-major `[prompt values, k]`, regenerated from `seed`.
    projection: Vec<f32>,
    state: Option<CmaState>,
    asked: bool,
}

impl CmaEs {
    /// BBT defaults: population 20, intrinsic dimension 500, `σ₀ = 1`.
    pub fn new(seed: u64) -> Self {
        CmaEs {
            population: 20,
            intrinsic_dim: 500,
            sigma0: 1.0,
            seed,
            projection: Vec::new(),
            state: None,
            asked: false,
        }
    }

    fn k(&self) -> usize {
        self.state.as_ref().map(|s| s.mean.len()).unwrap_or(0)
    }

    /// `A` with entries `N(0, s²)`, `s = std(p₀) / √k`: a unit step in `z` moves each prompt value
    /// by about one standard deviation of the starting prompt.
    fn build_projection(&mut self, origin: &[f32], k: usize) {
        let n = origin.len() as f64;
        let mean = origin.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = origin
            .iter()
            .map(|v| (*v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let s = (var.sqrt().max(1e-3) / (k as f64).sqrt()) as f32;
        self.projection = normals(mix(self.seed, u64::MAX, 0), origin.len() * k)
            .into_iter()
            .map(|x| x * s)
            .collect();
    }

    fn project(&self, origin: &[f32], z: &[f64]) -> Vec<f32> {
        let k = z.len();
        origin
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let row = &self.projection[i * k..(i + 1) * k];
                o + row.iter().zip(z).map(|(a, z)| *a as f64 * z).sum::<f64>() as f32
            })
            .collect()
    }

    /// The standard normal draws of generation `g`, candidate `i`.
    fn draw(&self, g: u64, i: usize, k: usize) -> Vec<f64> {
        normals(mix(self.seed, g, i as u64), k)
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn weights(&self) -> Vec<f64> {
        let mu = self.population / 2;
        let raw: Vec<f64> = (0..mu)
            .map(|i| ((mu as f64) + 0.5).ln() - ((i + 1) as f64).ln())
            .collect();
        let total: f64 = raw.iter().sum();
        raw.into_iter().map(|w| w / total).collect()
    }
}

impl Optimizer for CmaEs {
    fn name(&self) -> &str {
        "cma-es"
    }
    fn kind(&self) -> OptimizerKind {
        OptimizerKind::GradientFree
    }
    fn ask(&mut self, params: &[f32]) -> Result<Vec<Vec<f32>>> {
        if self.population < 4
            || self.intrinsic_dim == 0
            || self.sigma0.is_nan()
            || self.sigma0 <= 0.0
        {
            return Err(Error::InvalidArgument(format!(
                "cma-es needs a population of at least 4, an intrinsic dimension > 0 and σ₀ > 0 \
                 (got {}, {}, {})",
                self.population, self.intrinsic_dim, self.sigma0
            )));
        }
        if self.state.is_none() {
            let k = self.intrinsic_dim.min(params.len()).max(1);
            self.build_projection(params, k);
            self.state = Some(CmaState {
                origin: params.to_vec(),
                mean: vec![0.0; k],
                sigma: self.sigma0,
                diag: vec![1.0; k],
                path_sigma: vec![0.0; k],
                path_c: vec![0.0; k],
                generation: 0,
            });
        }
        let s = self.state.as_ref().expect("initialised above");
        if s.origin.len() != params.len() {
            return Err(Error::Shape(format!(
                "cma-es: started on {} prompt values, now given {}",
                s.origin.len(),
                params.len()
            )));
        }
        let k = self.k();
        let out = (0..self.population)
            .map(|i| {
                let z = self.draw(s.generation, i, k);
                let x: Vec<f64> = (0..k)
                    .map(|j| s.mean[j] + s.sigma * s.diag[j].sqrt() * z[j])
                    .collect();
                self.project(&s.origin, &x)
            })
            .collect();
        self.asked = true;
        Ok(out)
    }
    // the update is written coordinate by coordinate, as in the CMA-ES papers
    #[allow(clippy::needless_range_loop)]
    fn tell(&mut self, params: &mut [f32], losses: &[f32], _lr: f32) -> Result<()> {
        if !self.asked {
            return Err(Error::InvalidArgument("cma-es: tell before ask".into()));
        }
        check_losses("cma-es", losses, self.population)?;
        let k = self.k();
        let weights = self.weights();
        let mu_eff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let kf = k as f64;
        let c_sigma = (mu_eff + 2.0) / (kf + mu_eff + 5.0);
        let d_sigma = 1.0 + 2.0 * (((mu_eff - 1.0) / (kf + 1.0)).sqrt() - 1.0).max(0.0) + c_sigma;
        let c_c = (4.0 + mu_eff / kf) / (kf + 4.0 + 2.0 * mu_eff / kf);
        // sep-CMA-ES learning rates: (k + 2) / 3 times the full-covariance ones
        let c1 = (2.0 / ((kf + 1.3).powi(2) + mu_eff) * (kf + 2.0) / 3.0).min(1.0);
        let c_mu = (2.0 * (mu_eff - 2.0 + 1.0 / mu_eff) / ((kf + 2.0).powi(2) + mu_eff)
            * (kf + 2.0)
            / 3.0)
            .min(1.0 - c1);
        let chi = kf.sqrt() * (1.0 - 1.0 / (4.0 * kf) + 1.0 / (21.0 * kf * kf));

        let mut order: Vec<usize> = (0..losses.len()).collect();
        order.sort_by(|a, b| losses[*a].total_cmp(&losses[*b]));
        let generation = self.state.as_ref().expect("asked").generation;
        // y_i = sqrt(C) z_i of the best μ candidates
        let best: Vec<(Vec<f64>, Vec<f64>)> = order[..weights.len()]
            .iter()
            .map(|i| {
                let z = self.draw(generation, *i, k);
                let s = self.state.as_ref().expect("asked");
                let y = (0..k).map(|j| s.diag[j].sqrt() * z[j]).collect();
                (z, y)
            })
            .collect();
        let s = self.state.as_mut().expect("asked");
        let mut y_w = vec![0.0; k];
        let mut z_w = vec![0.0; k];
        for ((z, y), w) in best.iter().zip(&weights) {
            for j in 0..k {
                y_w[j] += w * y[j];
                z_w[j] += w * z[j];
            }
        }
        for j in 0..k {
            s.mean[j] += s.sigma * y_w[j];
        }
        let ps_factor = (c_sigma * (2.0 - c_sigma) * mu_eff).sqrt();
        for j in 0..k {
            s.path_sigma[j] = (1.0 - c_sigma) * s.path_sigma[j] + ps_factor * z_w[j];
        }
        let ps_norm = s.path_sigma.iter().map(|v| v * v).sum::<f64>().sqrt();
        let gen = (generation + 1) as f64;
        let h_sigma = ps_norm / (1.0 - (1.0 - c_sigma).powf(2.0 * gen)).sqrt()
            < (1.4 + 2.0 / (kf + 1.0)) * chi;
        let pc_factor = (c_c * (2.0 - c_c) * mu_eff).sqrt();
        for j in 0..k {
            s.path_c[j] =
                (1.0 - c_c) * s.path_c[j] + if h_sigma { pc_factor * y_w[j] } else { 0.0 };
        }
        let delta = if h_sigma { 0.0 } else { c_c * (2.0 - c_c) };
        for j in 0..k {
            let rank_mu: f64 = best
                .iter()
                .zip(&weights)
                .map(|((_, y), w)| w * y[j] * y[j])
                .sum();
            s.diag[j] = ((1.0 - c1 - c_mu + c1 * delta) * s.diag[j]
                + c1 * s.path_c[j] * s.path_c[j]
                + c_mu * rank_mu)
                .max(1e-20);
        }
        s.sigma *= ((c_sigma / d_sigma) * (ps_norm / chi - 1.0)).exp();
        s.generation += 1;
        let mean = s.mean.clone();
        let origin = s.origin.clone();
        let prompt = self.project(&origin, &mean);
        params.copy_from_slice(&prompt);
        self.asked = false;
        Ok(())
    }
    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "population": self.population, "intrinsic_dim": self.intrinsic_dim,
            "sigma0": self.sigma0, "seed": self.seed, "search": self.state,
        })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let get = |k: &str| {
            state
                .get(k)
                .cloned()
                .ok_or_else(|| bad_state("cma-es", format!("missing `{k}`")))
        };
        self.population =
            serde_json::from_value(get("population")?).map_err(|e| bad_state("cma-es", e))?;
        self.intrinsic_dim =
            serde_json::from_value(get("intrinsic_dim")?).map_err(|e| bad_state("cma-es", e))?;
        self.sigma0 = serde_json::from_value(get("sigma0")?).map_err(|e| bad_state("cma-es", e))?;
        self.seed = serde_json::from_value(get("seed")?).map_err(|e| bad_state("cma-es", e))?;
        let search: Option<CmaState> =
            serde_json::from_value(get("search")?).map_err(|e| bad_state("cma-es", e))?;
        self.projection.clear();
        if let Some(s) = &search {
            self.build_projection(&s.origin, s.mean.len());
        }
        self.state = search;
        self.asked = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Σ (x − t)² with a target away from the start.
    fn loss(x: &[f32]) -> f32 {
        x.iter()
            .enumerate()
            .map(|(i, v)| (v - (i as f32 * 0.1 - 0.5)).powi(2))
            .sum()
    }

    fn run(opt: &mut dyn Optimizer, lr: f32, steps: usize, dim: usize) -> (f32, f32) {
        let mut x: Vec<f32> = (0..dim).map(|i| ((i * 7) % 5) as f32 * 0.1).collect();
        let start = loss(&x);
        for _ in 0..steps {
            let cands = opt.ask(&x).unwrap();
            let losses: Vec<f32> = cands.iter().map(|c| loss(c)).collect();
            opt.tell(&mut x, &losses, lr).unwrap();
        }
        (start, loss(&x))
    }

    #[test]
    fn spsa_descends_a_quadratic() {
        let mut o = Spsa::new(1e-3, 3);
        o.perturbations = 4;
        let (start, end) = run(&mut o, 0.02, 400, 12);
        assert!(end < 0.05 * start, "{start} -> {end}");
    }

    #[test]
    fn cma_es_descends_a_quadratic_through_its_projection() {
        let mut o = CmaEs::new(5);
        o.population = 12;
        o.intrinsic_dim = 12; // full rank: the optimum is reachable
        let (start, end) = run(&mut o, 0.0, 600, 12);
        // the random projection makes the sphere an ill-conditioned ellipsoid for a diagonal
        // covariance: slower than full CMA-ES, but it converges
        assert!(end < 1e-2 * start, "{start} -> {end}");
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        for make in [
            (|| Box::new(Spsa::new(1e-2, 9)) as Box<dyn Optimizer>) as fn() -> Box<dyn Optimizer>,
            || {
                let mut o = CmaEs::new(9);
                o.population = 6;
                o.intrinsic_dim = 4;
                Box::new(o)
            },
        ] {
            let mut a = make();
            let mut x: Vec<f32> = vec![0.3; 10];
            for _ in 0..5 {
                let c = a.ask(&x).unwrap();
                let l: Vec<f32> = c.iter().map(|c| loss(c)).collect();
                a.tell(&mut x, &l, 0.01).unwrap();
            }
            let mut b = make();
            b.load_state(&a.state()).unwrap();
            let (mut xa, mut xb) = (x.clone(), x.clone());
            for _ in 0..5 {
                for (o, x) in [(&mut a, &mut xa), (&mut b, &mut xb)] {
                    let c = o.ask(x).unwrap();
                    let l: Vec<f32> = c.iter().map(|c| loss(c)).collect();
                    o.tell(x, &l, 0.01).unwrap();
                }
            }
            assert_eq!(xa, xb, "{}", a.name());
            // gradient-free optimizers refuse gradients, and tell needs one loss per candidate
            assert!(a.step(&mut xa, &[0.0; 10], 0.1).is_err());
            a.ask(&xa).unwrap();
            assert!(a.tell(&mut xa, &[1.0], 0.1).is_err());
            let asked = a.ask(&xa).unwrap().len();
            assert!(a.tell(&mut xa, &vec![f32::NAN; asked], 0.1).is_err());
        }
    }
}
