//! Reparameterised prompts: the small trainable encoders of prefix tuning (with projection) and
//! P-tuning, on the host.
//!
//! A [`PromptEncoder`] maps a flat parameter vector θ (what the optimizer updates and the
//! checkpoint holds) to the values a backbone reads, `[N, width]` at the method's placement, and
//! carries the backbone's gradient with respect to those values back to θ. The shapes, the
//! initialisation and the arithmetic are PEFT's (`PrefixEncoder`, `PromptEncoder`); only the
//! encoder's output is ever saved, as PEFT saves it, so a backbone never sees an encoder.
//!
//! θ is laid out tensor after tensor in PyTorch's parameter order: the virtual-token embedding
//! `[N, in]`, then each layer's weight `[out, in]` and bias `[out]` (an LSTM's
//! `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh` per layer and direction, gates `i, f, g, o`).

use softprompt_core::{BackboneSpec, EncoderKind, Error, PromptMethod, Result, Rng, SoftPrompt};

/// Element-wise non-linearity after a linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    None,
    Relu,
    Tanh,
}

/// One linear layer of an MLP: its parameters at `offset` in θ.
#[derive(Debug, Clone, Copy)]
struct Dense {
    input: usize,
    output: usize,
    offset: usize,
    act: Act,
}

impl Dense {
    fn len(&self) -> usize {
        self.output * self.input + self.output
    }
}

/// One direction of one LSTM layer.
#[derive(Debug, Clone, Copy)]
struct LstmCell {
    input: usize,
    hidden: usize,
    offset: usize,
    reverse: bool,
}

impl LstmCell {
    fn len(&self) -> usize {
        let g = 4 * self.hidden;
        g * self.input + g * self.hidden + 2 * g
    }
}

/// The encoder of a prompt-learning method (identity for prompt tuning and plain prefixes).
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    method: PromptMethod,
    num_virtual_tokens: usize,
    /// Width of the trainable embedding rows.
    input: usize,
    /// Width of the values handed to the backbone.
    width: usize,
    lstm: Vec<LstmCell>,
    mlp: Vec<Dense>,
    params: usize,
}

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Clone)]
pub struct Tape {
    /// Input of each MLP layer, and the final output (post-activation).
    mlp_io: Vec<Vec<f32>>,
    /// Per LSTM layer: its input `[N, in]` and per direction the gates (post-activation) and
    /// cell states of every step.
    lstm: Vec<LstmLayerTape>,
}

#[derive(Debug, Clone)]
struct LstmLayerTape {
    input: Vec<f32>,
    /// Per direction: gates `[N, 4H]` (i, f, g, o after their non-linearities), cells `[N, H]`,
    /// hidden states `[N, H]`, in sequence order.
    dirs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)>,
}

impl PromptEncoder {
    /// The encoder of `method` for `num_virtual_tokens` on a backbone of `spec`.
    pub fn new(
        method: PromptMethod,
        num_virtual_tokens: usize,
        spec: &BackboneSpec,
    ) -> Result<Self> {
        let n = num_virtual_tokens;
        let width = method.placement().width(spec);
        let mut at = n * width;
        let dense = |input: usize, output: usize, act: Act, at: &mut usize| {
            let d = Dense {
                input,
                output,
                offset: *at,
                act,
            };
            *at += d.len();
            d
        };
        let (input, lstm, mlp) = match method {
            PromptMethod::PromptTuning | PromptMethod::PrefixTuning { projection: None } => {
                (width, Vec::new(), Vec::new())
            }
            PromptMethod::PrefixTuning {
                projection: Some(hidden),
            } => {
                let kv = spec.num_key_value_heads * spec.head_dim;
                at = n * kv;
                let mlp = vec![
                    dense(kv, hidden, Act::Tanh, &mut at),
                    dense(hidden, width, Act::None, &mut at),
                ];
                (kv, Vec::new(), mlp)
            }
            PromptMethod::PTuning {
                encoder: EncoderKind::Mlp,
                hidden_size: h,
                ..
            } => {
                let mlp = vec![
                    dense(width, h, Act::Relu, &mut at),
                    dense(h, h, Act::Relu, &mut at),
                    dense(h, width, Act::None, &mut at),
                ];
                (width, Vec::new(), mlp)
            }
            PromptMethod::PTuning {
                encoder: EncoderKind::Lstm,
                hidden_size: h,
                num_layers,
                ..
            } => {
                if num_layers == 0 {
                    return Err(Error::InvalidArgument(
                        "an LSTM prompt encoder needs at least one layer".into(),
                    ));
                }
                let mut lstm = Vec::new();
                for layer in 0..num_layers {
                    let input = if layer == 0 { width } else { 2 * h };
                    for reverse in [false, true] {
                        let c = LstmCell {
                            input,
                            hidden: h,
                            offset: at,
                            reverse,
                        };
                        at += c.len();
                        lstm.push(c);
                    }
                }
                let mlp = vec![
                    dense(2 * h, 2 * h, Act::Relu, &mut at),
                    dense(2 * h, width, Act::None, &mut at),
                ];
                (width, lstm, mlp)
            }
        };
        if matches!(
            method,
            PromptMethod::PrefixTuning {
                projection: Some(0)
            }
        ) || matches!(method, PromptMethod::PTuning { hidden_size: 0, .. })
        {
            return Err(Error::InvalidArgument(
                "an encoder's hidden size must be positive".into(),
            ));
        }
        Ok(PromptEncoder {
            method,
            num_virtual_tokens: n,
            input,
            width,
            lstm,
            mlp,
            params: at,
        })
    }

    /// Number of virtual tokens.
    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    /// The method.
    pub fn method(&self) -> &PromptMethod {
        &self.method
    }

    /// Whether θ is the prompt itself (no encoder).
    pub fn is_identity(&self) -> bool {
        self.lstm.is_empty() && self.mlp.is_empty()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.params
    }

    /// Width of the values handed to the backbone.
    pub fn width(&self) -> usize {
        self.width
    }

    /// θ initialised as PyTorch initialises PEFT's modules: embedding rows `N(0, 1)` (or the
    /// given `embedding`, e.g. a text initialisation of prompt tuning), linear and LSTM weights
    /// and biases uniform in `±1/√fan` (`fan` the layer's input width, an LSTM's hidden size).
    pub fn init(&self, embedding: Option<&[f32]>, rng: &mut Rng) -> Result<Vec<f32>> {
        let rows = self.num_virtual_tokens * self.input;
        let mut theta = Vec::with_capacity(self.params);
        match embedding {
            Some(e) if e.len() == rows => theta.extend_from_slice(e),
            Some(e) => {
                return Err(Error::Shape(format!(
                    "initial embedding has {} values, the encoder takes {rows}",
                    e.len()
                )))
            }
            None => theta.extend((0..rows).map(|_| rng.normal() as f32)),
        }
        for c in &self.lstm {
            let bound = 1.0 / (c.hidden as f32).sqrt();
            theta.extend((0..c.len()).map(|_| rng.uniform(-bound, bound)));
        }
        for d in &self.mlp {
            let bound = 1.0 / (d.input as f32).sqrt();
            theta.extend((0..d.len()).map(|_| rng.uniform(-bound, bound)));
        }
        debug_assert_eq!(theta.len(), self.params);
        Ok(theta)
    }

    fn check(&self, theta: &[f32]) -> Result<()> {
        if theta.len() != self.params {
            return Err(Error::Shape(format!(
                "{} encoder takes {} parameters, got {}",
                self.method.name(),
                self.params,
                theta.len()
            )));
        }
        Ok(())
    }

    /// The prompt θ encodes, placed where the method puts it.
    pub fn prompt(&self, theta: &[f32]) -> Result<SoftPrompt> {
        Ok(self.forward(theta)?.0)
    }

    /// The prompt and what [`PromptEncoder::backward`] needs.
    pub fn forward(&self, theta: &[f32]) -> Result<(SoftPrompt, Tape)> {
        self.check(theta)?;
        let n = self.num_virtual_tokens;
        let mut x = theta[..n * self.input].to_vec();
        let mut tape = Tape {
            mlp_io: Vec::new(),
            lstm: Vec::new(),
        };
        for pair in self.lstm.chunks(2) {
            let h = pair[0].hidden;
            let mut out = vec![0.0; n * 2 * h];
            let mut dirs = Vec::new();
            for (k, c) in pair.iter().enumerate() {
                let (gates, cells, hs) = lstm_forward(c, theta, &x, n);
                for t in 0..n {
                    out[t * 2 * h + k * h..t * 2 * h + (k + 1) * h]
                        .copy_from_slice(&hs[t * h..(t + 1) * h]);
                }
                dirs.push((gates, cells, hs));
            }
            tape.lstm.push(LstmLayerTape { input: x, dirs });
            x = out;
        }
        for d in &self.mlp {
            tape.mlp_io.push(x);
            let prev = tape.mlp_io.last().expect("pushed");
            x = dense_forward(d, theta, prev, n);
        }
        let values = x;
        let prompt =
            SoftPrompt::new(n, self.width, values)?.with_placement(self.method.placement());
        Ok((prompt, tape))
    }

    /// The gradient with respect to θ of a loss whose gradient with respect to the prompt's
    /// values is `grad`.
    pub fn backward(&self, theta: &[f32], tape: &Tape, grad: &[f32]) -> Result<Vec<f32>> {
        self.check(theta)?;
        let n = self.num_virtual_tokens;
        if grad.len() != n * self.width {
            return Err(Error::Shape(format!(
                "prompt gradient has {} values, expected {}",
                grad.len(),
                n * self.width
            )));
        }
        let mut g_theta = vec![0.0f32; self.params];
        let mut g = grad.to_vec();
        // the MLP's output is pre-activation of nothing: walk back through the layers
        let outputs: Vec<&[f32]> = tape
            .mlp_io
            .iter()
            .skip(1)
            .map(Vec::as_slice)
            .chain(std::iter::once(&[][..]))
            .collect();
        for (i, d) in self.mlp.iter().enumerate().rev() {
            let input = &tape.mlp_io[i];
            // g is with respect to this layer's post-activation output
            if d.act != Act::None {
                let out = outputs[i];
                for (gj, yj) in g.iter_mut().zip(out) {
                    *gj *= match d.act {
                        Act::Relu => {
                            if *yj > 0.0 {
                                1.0
                            } else {
                                0.0
                            }
                        }
                        Act::Tanh => 1.0 - yj * yj,
                        Act::None => 1.0,
                    };
                }
            }
            g = dense_backward(d, theta, input, &g, n, &mut g_theta);
        }
        for (layer, pair) in self.lstm.chunks(2).enumerate().rev() {
            let lt = &tape.lstm[layer];
            let h = pair[0].hidden;
            let input_w = pair[0].input;
            let mut g_in = vec![0.0f32; n * input_w];
            for (k, c) in pair.iter().enumerate() {
                let mut g_h = vec![0.0f32; n * h];
                for t in 0..n {
                    g_h[t * h..(t + 1) * h]
                        .copy_from_slice(&g[t * 2 * h + k * h..t * 2 * h + (k + 1) * h]);
                }
                let (gates, cells, hs) = &lt.dirs[k];
                lstm_backward(
                    c,
                    theta,
                    &lt.input,
                    n,
                    (gates, cells, hs),
                    &g_h,
                    &mut g_in,
                    &mut g_theta,
                );
            }
            g = g_in;
        }
        for (t, gi) in g_theta[..n * self.input].iter_mut().zip(&g) {
            *t += gi;
        }
        Ok(g_theta)
    }
}

/// `y = act(x · Wᵀ + b)` for `rows` rows.
fn dense_forward(d: &Dense, theta: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let w = &theta[d.offset..d.offset + d.output * d.input];
    let b = &theta[d.offset + d.output * d.input..d.offset + d.len()];
    let mut y = vec![0.0f32; rows * d.output];
    for r in 0..rows {
        let xr = &x[r * d.input..(r + 1) * d.input];
        for (o, yo) in y[r * d.output..(r + 1) * d.output].iter_mut().enumerate() {
            let wo = &w[o * d.input..(o + 1) * d.input];
            let s: f32 = wo.iter().zip(xr).map(|(a, b)| a * b).sum();
            *yo = match d.act {
                Act::None => s + b[o],
                Act::Relu => (s + b[o]).max(0.0),
                Act::Tanh => (s + b[o]).tanh(),
            };
        }
    }
    y
}

/// Given `g` with respect to the pre-activation output, accumulates `dW`, `db` into `g_theta`
/// and returns the gradient with respect to `x`.
fn dense_backward(
    d: &Dense,
    theta: &[f32],
    x: &[f32],
    g: &[f32],
    rows: usize,
    g_theta: &mut [f32],
) -> Vec<f32> {
    let wn = d.output * d.input;
    let w = &theta[d.offset..d.offset + wn];
    let mut gx = vec![0.0f32; rows * d.input];
    let (gw, gb) = g_theta[d.offset..d.offset + d.len()].split_at_mut(wn);
    for r in 0..rows {
        let xr = &x[r * d.input..(r + 1) * d.input];
        let gxr = &mut gx[r * d.input..(r + 1) * d.input];
        for o in 0..d.output {
            let go = g[r * d.output + o];
            if go == 0.0 {
                continue;
            }
            gb[o] += go;
            let wo = &w[o * d.input..(o + 1) * d.input];
            let gwo = &mut gw[o * d.input..(o + 1) * d.input];
            for i in 0..d.input {
                gwo[i] += go * xr[i];
                gxr[i] += go * wo[i];
            }
        }
    }
    gx
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One direction of an LSTM layer over `[n, input]`: gates (after their non-linearities),
/// cell states and hidden states, each in sequence order.
fn lstm_forward(
    c: &LstmCell,
    theta: &[f32],
    x: &[f32],
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h, g4) = (c.hidden, 4 * c.hidden);
    let w_ih = &theta[c.offset..c.offset + g4 * c.input];
    let w_hh = &theta[c.offset + g4 * c.input..c.offset + g4 * c.input + g4 * h];
    let b = &theta[c.offset + g4 * (c.input + h)..c.offset + c.len()];
    let mut gates = vec![0.0f32; n * g4];
    let mut cells = vec![0.0f32; n * h];
    let mut hs = vec![0.0f32; n * h];
    let mut h_prev = vec![0.0f32; h];
    let mut c_prev = vec![0.0f32; h];
    let order: Vec<usize> = if c.reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for &t in &order {
        let xt = &x[t * c.input..(t + 1) * c.input];
        let gt = &mut gates[t * g4..(t + 1) * g4];
        for (j, gj) in gt.iter_mut().enumerate() {
            let a: f32 = w_ih[j * c.input..(j + 1) * c.input]
                .iter()
                .zip(xt)
                .map(|(w, v)| w * v)
                .sum();
            let r: f32 = w_hh[j * h..(j + 1) * h]
                .iter()
                .zip(&h_prev)
                .map(|(w, v)| w * v)
                .sum();
            let z = a + r + b[j] + b[g4 + j];
            *gj = if (2 * h..3 * h).contains(&j) {
                z.tanh()
            } else {
                sigmoid(z)
            };
        }
        for k in 0..h {
            let (i, f, g, o) = (gt[k], gt[h + k], gt[2 * h + k], gt[3 * h + k]);
            let ct = f * c_prev[k] + i * g;
            cells[t * h + k] = ct;
            hs[t * h + k] = o * ct.tanh();
        }
        c_prev.copy_from_slice(&cells[t * h..(t + 1) * h]);
        h_prev.copy_from_slice(&hs[t * h..(t + 1) * h]);
    }
    (gates, cells, hs)
}

/// Back-propagation through time of one direction: accumulates the parameter gradients into
/// `g_theta` and the input gradient into `g_in`.
#[allow(clippy::too_many_arguments)]
fn lstm_backward(
    c: &LstmCell,
    theta: &[f32],
    x: &[f32],
    n: usize,
    (gates, cells, hs): (&[f32], &[f32], &[f32]),
    g_h_out: &[f32],
    g_in: &mut [f32],
    g_theta: &mut [f32],
) {
    let (h, g4) = (c.hidden, 4 * c.hidden);
    let ih = g4 * c.input;
    let w_ih = &theta[c.offset..c.offset + ih];
    let w_hh = &theta[c.offset + ih..c.offset + ih + g4 * h];
    let order: Vec<usize> = if c.reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    let mut g_h_next = vec![0.0f32; h];
    let mut g_c_next = vec![0.0f32; h];
    let mut dz = vec![0.0f32; g4];
    for (step, &t) in order.iter().enumerate().rev() {
        let prev = step.checked_sub(1).map(|s| order[s]);
        let gt = &gates[t * g4..(t + 1) * g4];
        for k in 0..h {
            let (i, f, g, o) = (gt[k], gt[h + k], gt[2 * h + k], gt[3 * h + k]);
            let ct = cells[t * h + k];
            let c_prev = prev.map_or(0.0, |p| cells[p * h + k]);
            let gh = g_h_out[t * h + k] + g_h_next[k];
            let tc = ct.tanh();
            let gc = g_c_next[k] + gh * o * (1.0 - tc * tc);
            dz[k] = gc * g * i * (1.0 - i);
            dz[h + k] = gc * c_prev * f * (1.0 - f);
            dz[2 * h + k] = gc * i * (1.0 - g * g);
            dz[3 * h + k] = gh * tc * o * (1.0 - o);
            g_c_next[k] = gc * f;
        }
        let xt = &x[t * c.input..(t + 1) * c.input];
        let h_prev: Vec<f32> = match prev {
            Some(p) => hs[p * h..(p + 1) * h].to_vec(),
            None => vec![0.0; h],
        };
        g_h_next.iter_mut().for_each(|v| *v = 0.0);
        let (g_wih, rest) = g_theta[c.offset..c.offset + c.len()].split_at_mut(ih);
        let (g_whh, g_b) = rest.split_at_mut(g4 * h);
        let g_in_t = &mut g_in[t * c.input..(t + 1) * c.input];
        for j in 0..g4 {
            let d = dz[j];
            if d == 0.0 {
                continue;
            }
            g_b[j] += d;
            g_b[g4 + j] += d;
            let wi = &w_ih[j * c.input..(j + 1) * c.input];
            let gwi = &mut g_wih[j * c.input..(j + 1) * c.input];
            for q in 0..c.input {
                gwi[q] += d * xt[q];
                g_in_t[q] += d * wi[q];
            }
            let wh = &w_hh[j * h..(j + 1) * h];
            let gwh = &mut g_whh[j * h..(j + 1) * h];
            for q in 0..h {
                gwh[q] += d * h_prev[q];
                g_h_next[q] += d * wh[q];
            }
        }
    }
}

/// Errors unless `prompt` is what `method` produces (its placement).
pub fn check_method(prompt: &SoftPrompt, method: &PromptMethod) -> Result<()> {
    if prompt.placement() != method.placement() {
        return Err(Error::InvalidArgument(format!(
            "a {} prompt is placed at `{}`, not `{}`",
            method.name(),
            method.placement().as_str(),
            prompt.placement().as_str()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BackboneSpec {
        BackboneSpec {
            architecture: softprompt_core::Architecture::llama(),
            hidden_size: 6,
            vocab_size: 10,
            num_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 3,
            fingerprint: "f".into(),
            name: "n".into(),
        }
    }

    /// Loss `Σ values · weights` so that the prompt gradient is `weights`.
    fn check_gradient(method: PromptMethod) {
        let n = 3;
        let enc = PromptEncoder::new(method, n, &spec()).unwrap();
        let mut rng = Rng::seed_from_u64(7);
        let theta: Vec<f32> = enc.init(None, &mut rng).unwrap();
        let theta: Vec<f64> = theta.iter().map(|v| *v as f64).collect();
        let weights: Vec<f32> = (0..n * enc.width())
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let loss = |t: &[f64]| -> f64 {
            let t: Vec<f32> = t.iter().map(|v| *v as f32).collect();
            let p = enc.prompt(&t).unwrap();
            p.values()
                .iter()
                .zip(&weights)
                .map(|(v, w)| (*v as f64) * (*w as f64))
                .sum()
        };
        let t32: Vec<f32> = theta.iter().map(|v| *v as f32).collect();
        let (_, tape) = enc.forward(&t32).unwrap();
        let g = enc.backward(&t32, &tape, &weights).unwrap();
        // central differences on a spread of coordinates of every tensor; on a ReLU kink the
        // gradient is one of the one-sided differences, so the closest of the three counts
        let eps = 1e-2;
        let base = loss(&theta);
        let mut worst = 0.0f64;
        for i in (0..theta.len()).step_by((theta.len() / 97).max(1)) {
            let mut a = theta.clone();
            a[i] += eps;
            let mut b = theta.clone();
            b[i] -= eps;
            let (la, lb) = (loss(&a), loss(&b));
            let gi = g[i] as f64;
            let err = [
                (la - lb) / (2.0 * eps),
                (la - base) / eps,
                (base - lb) / eps,
            ]
            .iter()
            .map(|fd| (fd - gi).abs() / (1.0 + fd.abs()))
            .fold(f64::INFINITY, f64::min);
            worst = worst.max(err);
        }
        assert!(worst < 2e-3, "{method:?}: worst relative error {worst}");
        assert!(g.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn mlp_prefix_gradient_matches_finite_differences() {
        check_gradient(PromptMethod::PrefixTuning {
            projection: Some(5),
        });
    }

    #[test]
    fn p_tuning_mlp_gradient_matches_finite_differences() {
        check_gradient(PromptMethod::PTuning {
            encoder: EncoderKind::Mlp,
            hidden_size: 4,
            num_layers: 2,
            dropout: 0.0,
        });
    }

    #[test]
    fn p_tuning_lstm_gradient_matches_finite_differences() {
        check_gradient(PromptMethod::PTuning {
            encoder: EncoderKind::Lstm,
            hidden_size: 4,
            num_layers: 2,
            dropout: 0.0,
        });
    }

    #[test]
    fn shapes_follow_peft() {
        let s = spec();
        // prefix without projection: the prefix itself, [N, layers·2·kv·hd]
        let e = PromptEncoder::new(PromptMethod::PrefixTuning { projection: None }, 4, &s).unwrap();
        assert!(e.is_identity());
        assert_eq!((e.width(), e.num_params()), (12, 48));
        // projection: Embedding(N, kv·hd) + Linear(kv·hd, H) + Linear(H, layers·2·kv·hd)
        let e = PromptEncoder::new(
            PromptMethod::PrefixTuning {
                projection: Some(5),
            },
            4,
            &s,
        )
        .unwrap();
        assert_eq!(e.num_params(), 4 * 3 + (5 * 3 + 5) + (12 * 5 + 12));
        // P-tuning MLP: Embedding(N, d) + Linear(d, H) + Linear(H, H) + Linear(H, d)
        let m = PromptMethod::PTuning {
            encoder: EncoderKind::Mlp,
            hidden_size: 4,
            num_layers: 2,
            dropout: 0.0,
        };
        let e = PromptEncoder::new(m, 4, &s).unwrap();
        assert_eq!(
            e.num_params(),
            4 * 6 + (4 * 6 + 4) + (4 * 4 + 4) + (6 * 4 + 6)
        );
        // LSTM(d, H, 2 layers, bidirectional) + Linear(2H, 2H) + Linear(2H, d)
        let m = PromptMethod::PTuning {
            encoder: EncoderKind::Lstm,
            hidden_size: 4,
            num_layers: 2,
            dropout: 0.0,
        };
        let e = PromptEncoder::new(m, 4, &s).unwrap();
        let l0 = 16 * 6 + 16 * 4 + 32;
        let l1 = 16 * 8 + 16 * 4 + 32;
        assert_eq!(
            e.num_params(),
            4 * 6 + 2 * l0 + 2 * l1 + (8 * 8 + 8) + (6 * 8 + 6)
        );
        let theta = vec![0.0; e.num_params() - 1];
        assert!(e.prompt(&theta).is_err());
    }
}
