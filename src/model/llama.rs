//! The Llama-family decoder in tch, configured from a Hugging Face `config.json`: GQA, RMSNorm,
//! SwiGLU, RoPE (plain or Llama-3.1 `rope_type: llama3`), optional qkv bias (Qwen2) and tied
//! embeddings (SmolLM2). Parameter names are the checkpoint's own (`model.layers.0.self_attn.q_proj.weight`),
//! so loading and saving need no rename table. A `score` head turns it into
//! `LlamaForSequenceClassification` for reward models.
//!
//! Attention is `attention::Attend`'s: SDPA, or varlen flash attention for packed rows on a GPU.
//! Any linear layer can carry a LoRA adapter (`lora`), switched off on demand.

use anyhow::{bail, Result};
use serde::Deserialize;
use tch::nn;
use tch::{Device, Kind, Tensor};

use super::attention::{Attend, AttentionMask};
use super::lora::{Adapter, LoraConfig, Switch};
use std::sync::Arc;

mod blockwise;
pub use blockwise::{spread, Blockwise};

/// The `config.json` fields the architecture needs. Older and newer spellings are both read:
/// `rope_theta`/`rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub num_labels: Option<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

/// `rope_scaling` / `rope_parameters`: the base and the Llama-3.1 frequency scaling.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeScaling {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl LlamaConfig {
    /// Parses a `config.json` and checks the sizes the model is built from, so a bad config is
    /// an error naming the key instead of a division by zero.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: LlamaConfig = serde_json::from_str(text)?;
        let sizes = [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.kv_heads()),
        ];
        if let Some((key, value)) = sizes.iter().find(|(_, v)| *v <= 0) {
            bail!("`{key}` is {value}; it must be at least 1");
        }
        if config.num_attention_heads % config.kv_heads() != 0 {
            bail!("`num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})", config.num_attention_heads, config.kv_heads());
        }
        if config.head_dim() <= 0 || config.head_dim() % 2 != 0 {
            bail!("the head size ({}; `head_dim`, or `hidden_size` / `num_attention_heads`) must be a positive even number", config.head_dim());
        }
        if let Some(pad) = config.pad_token_id
            && !(0..config.vocab_size).contains(&pad)
        {
            bail!("`pad_token_id` {pad} is outside the vocabulary (0..{})", config.vocab_size);
        }
        Ok(config)
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Qwen2 always has a bias on q, k and v; Llama has one when `attention_bias` says so.
    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type.as_deref() == Some("qwen2")
    }

    fn rope(&self) -> RopeScaling {
        self.rope_parameters.clone().or_else(|| self.rope_scaling.clone()).unwrap_or_default()
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta.or(self.rope().rope_theta).unwrap_or(10_000.0)
    }

    /// The inverse RoPE frequencies, `[head_dim / 2]`, as transformers computes them.
    fn inv_freq(&self) -> Result<Tensor> {
        let dim = self.head_dim();
        let base = self.rope_theta();
        let inv: Vec<f64> = (0..dim / 2).map(|i| 1.0 / base.powf(2.0 * i as f64 / dim as f64)).collect();
        let rope = self.rope();
        let inv = match rope.rope_type.as_deref() {
            None | Some("default") => inv,
            Some("llama3") => {
                let (Some(factor), Some(low), Some(high), Some(old_context)) =
                    (rope.factor, rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings)
                else {
                    bail!("rope_type llama3 needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings");
                };
                let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            Some(other) => bail!("rope_type `{other}` is not supported (default and llama3 are)"),
        };
        // transformers keeps inv_freq in f32.
        Ok(Tensor::from_slice(&inv.iter().map(|&f| f as f32).collect::<Vec<f32>>()))
    }
}

/// How a new model's parameters start out.
#[derive(Clone, Copy, Debug)]
pub enum Weights {
    /// Random, as tch's layers initialise them (norms at 1): fresh heads and test models.
    Random,
    /// Uninitialised, already in this dtype on the store's device, for a checkpoint to fill
    /// tensor by tensor: loading then holds the model once, never an f32 copy beside it.
    Uninit(Kind),
}

/// A trainable parameter `name` of shape `dims` under `vs`.
fn param(vs: &nn::Path, name: &str, dims: &[i64], weights: Weights, init: nn::Init) -> Tensor {
    match weights {
        Weights::Random => vs.var(name, dims, init),
        Weights::Uninit(kind) => vs.add(name, Tensor::empty(dims, (kind, vs.device())), true),
    }
}

/// `y = x Wᵀ + b`, with tch's `nn::linear` initialisation (bias drawn first, as there), plus a
/// LoRA adapter's update when one is attached.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Linear {
    fn new(vs: nn::Path, inputs: i64, outputs: i64, bias: bool, weights: Weights) -> Self {
        let bound = 1.0 / (inputs as f64).sqrt();
        let bias = bias.then(|| param(&vs, "bias", &[outputs], weights, nn::Init::Uniform { lo: -bound, up: bound }));
        Linear { weight: param(&vs, "weight", &[outputs, inputs], weights, nn::LinearConfig::default().ws_init), bias, adapter: None }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            Some(adapter) => adapter.add_to(x, y),
            None => y,
        }
    }

    /// Adds the adapter's update into the weight (in the weight's dtype, as PEFT merges) and
    /// detaches the adapter.
    fn merge(&mut self) {
        if let Some(adapter) = self.adapter.take() {
            let delta = adapter.delta().to_kind(self.weight.kind());
            tch::no_grad(|| {
                let _ = self.weight.g_add_(&delta);
            });
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, size: i64, eps: f64, weights: Weights) -> Self {
        RmsNorm { weight: param(&vs, "weight", &[size], weights, nn::Init::Const(1.0)), eps }
    }

    /// As transformers: normalise in f32 and cast back, then scale by the weight. libtorch's
    /// `rms_norm` without a weight is that normalisation (computed in f32 for 16-bit inputs and
    /// cast to the input's dtype), one fused kernel forward and backward on CUDA.
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = *x.size().last().expect("hidden states have a last dimension");
        &self.weight * x.rms_norm([size].as_slice(), None::<Tensor>, self.eps)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

/// Rotary position embedding of `[batch, seq, heads, head_dim]` with `[batch, seq, 1, head_dim]`
/// cos and sin.
fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
    x * cos + rotate_half(x) * sin
}

impl Attention {
    fn new(vs: nn::Path, c: &LlamaConfig, w: Weights) -> Self {
        let (h, d) = (c.hidden_size, c.head_dim());
        Attention {
            q_proj: Linear::new(&vs / "q_proj", h, c.num_attention_heads * d, c.qkv_bias(), w),
            k_proj: Linear::new(&vs / "k_proj", h, c.kv_heads() * d, c.qkv_bias(), w),
            v_proj: Linear::new(&vs / "v_proj", h, c.kv_heads() * d, c.qkv_bias(), w),
            o_proj: Linear::new(&vs / "o_proj", c.num_attention_heads * d, h, c.attention_bias, w),
            heads: c.num_attention_heads,
            kv_heads: c.kv_heads(),
            head_dim: d,
        }
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), attend: &Attend) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]);
        let q = apply_rope(&split(self.q_proj.forward(x), self.heads), rope);
        let k = apply_rope(&split(self.k_proj.forward(x), self.kv_heads), rope);
        let v = split(self.v_proj.forward(x), self.kv_heads);
        self.o_proj.forward(&attend.attention(&q, &k, &v))
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(vs: nn::Path, c: &LlamaConfig, w: Weights) -> Self {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Mlp {
            gate_proj: Linear::new(&vs / "gate_proj", h, i, c.mlp_bias, w),
            up_proj: Linear::new(&vs / "up_proj", h, i, c.mlp_bias, w),
            down_proj: Linear::new(&vs / "down_proj", i, h, c.mlp_bias, w),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(vs: nn::Path, c: &LlamaConfig, w: Weights) -> Self {
        Block {
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", c.hidden_size, c.rms_norm_eps, w),
            self_attn: Attention::new(&vs / "self_attn", c, w),
            post_attention_layernorm: RmsNorm::new(&vs / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps, w),
            mlp: Mlp::new(&vs / "mlp", c, w),
        }
    }

    pub fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), attend: &Attend) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), rope, attend);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }

    /// The block's linear layers with their paths below the block (`self_attn.q_proj`), in
    /// PEFT's module order.
    fn linears_mut(&mut self) -> [(&'static str, &'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn", "q_proj", &mut a.q_proj),
            ("self_attn", "k_proj", &mut a.k_proj),
            ("self_attn", "v_proj", &mut a.v_proj),
            ("self_attn", "o_proj", &mut a.o_proj),
            ("mlp", "gate_proj", &mut m.gate_proj),
            ("mlp", "up_proj", &mut m.up_proj),
            ("mlp", "down_proj", &mut m.down_proj),
        ]
    }
}

/// What sits on top of the final norm.
enum Head {
    /// Next-token logits; `None` reuses the embedding matrix (tied embeddings).
    LanguageModel(Option<Tensor>),
    /// `LlamaForSequenceClassification`'s `score` projection, read at the last non-pad token.
    Score(Tensor),
}

/// transformers' `initializer_range` for embeddings and heads.
const NORMAL_002: nn::Init = nn::Init::Randn { mean: 0., stdev: 0.02 };

/// The decoder with its head. Build it in a `VarStore`, then fill the store from a checkpoint
/// (`hf::ModelDir::load_into`).
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Tensor,
    pub layers: Vec<Block>,
    norm: RmsNorm,
    head: Head,
    inv_freq: Tensor,
    /// The attached LoRA adapters' switch (`add_adapters`).
    adapters: Option<Arc<Switch>>,
}

/// One forward's inputs: token ids, position ids and the attention mask, all `[batch, seq]`.
pub struct Inputs<'a> {
    pub ids: &'a Tensor,
    pub positions: &'a Tensor,
    pub mask: &'a AttentionMask,
}

impl Llama {
    /// A causal language model (`LlamaForCausalLM`).
    pub fn causal_lm(vs: &nn::Path, config: &LlamaConfig, weights: Weights) -> Result<Self> {
        let head = if config.tie_word_embeddings {
            None
        } else {
            Some(param(&(vs / "lm_head"), "weight", &[config.vocab_size, config.hidden_size], weights, NORMAL_002))
        };
        Self::build(vs, config, Head::LanguageModel(head), weights)
    }

    /// A reward model (`LlamaForSequenceClassification`, `num_labels` scores per sequence).
    pub fn sequence_classifier(vs: &nn::Path, config: &LlamaConfig, weights: Weights) -> Result<Self> {
        let labels = config.num_labels.unwrap_or(1);
        let score = param(&(vs / "score"), "weight", &[labels, config.hidden_size], weights, NORMAL_002);
        Self::build(vs, config, Head::Score(score), weights)
    }

    fn build(vs: &nn::Path, config: &LlamaConfig, head: Head, weights: Weights) -> Result<Self> {
        let model = vs / "model";
        let embed_tokens = param(&(&model / "embed_tokens"), "weight", &[config.vocab_size, config.hidden_size], weights, NORMAL_002);
        let layers = (0..config.num_hidden_layers).map(|i| Block::new(&model / "layers" / i, config, weights)).collect();
        Ok(Llama {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps, weights),
            head,
            inv_freq: config.inv_freq()?.to_device(vs.device()),
            adapters: None,
        })
    }

    /// Attaches a fresh LoRA adapter (PEFT's initialisation, drawn from `seed`) to every targeted
    /// linear layer, its tensors under `vs` with the layer's own path
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn add_adapters(&mut self, vs: &nn::Path, config: &LoraConfig, seed: u64) -> Result<()> {
        let switch = Arc::new(Switch::default());
        let mut slot = 0;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (group, module, linear) in layer.linears_mut() {
                if config.targets(module) {
                    let (outputs, inputs) = linear.weight.size2().expect("a linear weight is a matrix");
                    linear.adapter = Some(Adapter::new(&(vs / "model" / "layers" / i / group / module), inputs, outputs, config, &switch, slot, seed)?);
                    slot += 1;
                }
            }
        }
        self.adapters = Some(switch);
        Ok(())
    }

    /// Runs `f` on the model as it started (DPO's reference, [`Switch::as_started`]): with
    /// its adapters' starting copies, or its adapters switched off; without adapters, as it is.
    pub fn as_started<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.adapters {
            Some(switch) => switch.as_started(f),
            None => f(),
        }
    }

    /// Keeps frozen copies of every adapter as it is now (a loaded adapter that DPO trains
    /// further: its reference is the policy it starts from, as TRL's `ref` adapter).
    pub fn keep_starting_adapters(&mut self) {
        for layer in &mut self.layers {
            for (_, _, linear) in layer.linears_mut() {
                if let Some(adapter) = &mut linear.adapter {
                    adapter.keep_start();
                }
            }
        }
    }

    pub fn has_adapters(&self) -> bool {
        self.adapters.is_some()
    }

    /// Turns the adapters' dropout on, its masks drawn from `stream` (one per training
    /// micro-batch), or off (`None`).
    pub fn set_dropout(&self, stream: Option<u64>) {
        if let Some(switch) = &self.adapters {
            switch.set_dropout(stream);
        }
    }

    /// Adds every adapter's update into its layer's weight and detaches the adapters.
    pub fn merge_adapters(&mut self) {
        for layer in &mut self.layers {
            for (_, _, linear) in layer.linears_mut() {
                linear.merge();
            }
        }
        self.adapters = None;
    }

    /// The block a weight of the model or of its adapters belongs to, by name
    /// (`model.layers.3.mlp.up_proj.weight`: 3); none for the embeddings, final norm and head.
    pub fn block_of(name: &str) -> Option<usize> {
        name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// The weights' dtype.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Token embeddings, `[batch, seq, hidden]`. As transformers builds `embed_tokens` with
    /// `padding_idx = pad_token_id`, the lookup gives the pad token's row no gradient (for
    /// SmolLM2 that row is `<|im_end|>`'s; tied embeddings still train it through the head).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, ids, self.config.pad_token_id.unwrap_or(-1), false, false)
    }

    /// The rotary cos/sin for `positions`, `[batch, seq, 1, head_dim]` in `kind`.
    pub fn rope(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(2);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }

    /// The final-norm hidden states, `[batch, seq, hidden]`.
    pub fn hidden_states(&self, inputs: &Inputs) -> Tensor {
        let (rope, attend) = (self.rope(inputs.positions, self.kind()), inputs.mask.attend(self.device(), self.kind()));
        let x = self.layers.iter().fold(self.embed(inputs.ids), |x, layer| layer.forward(&x, &rope, &attend));
        self.final_norm(&x)
    }

    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// Next-token logits from final hidden states, `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.head_weight(), None)
    }

    /// The language-model head's `[vocab, hidden]` weight (the embeddings when they are tied).
    pub fn head_weight(&self) -> &Tensor {
        match &self.head {
            Head::LanguageModel(Some(w)) => w,
            Head::LanguageModel(None) => &self.embed_tokens,
            Head::Score(_) => panic!("a sequence classifier has no language-model head"),
        }
    }

    pub fn forward(&self, inputs: &Inputs) -> Tensor {
        self.logits(&self.hidden_states(inputs))
    }

    /// Reward scores `[batch, num_labels]`, read at each row's last token whose id is not
    /// `pad_token_id` (right padding), as transformers does.
    pub fn scores(&self, inputs: &Inputs) -> Tensor {
        let (b, t) = inputs.ids.size2().unwrap();
        let last = match self.config.pad_token_id {
            Some(pad) => {
                let keep = inputs.ids.ne(pad).to_kind(Kind::Int64);
                (Tensor::arange(t, (Kind::Int64, inputs.ids.device())) * keep).argmax(-1, false)
            }
            None => Tensor::full([b], t - 1, (Kind::Int64, inputs.ids.device())),
        };
        self.scores_at(inputs, &last)
    }

    /// Reward scores `[batch, num_labels]` read at position `last[row]` of each row.
    pub fn scores_at(&self, inputs: &Inputs, last: &Tensor) -> Tensor {
        let Head::Score(score) = &self.head else { panic!("not a sequence classifier") };
        let hidden = self.hidden_states(inputs);
        let rows = Tensor::arange(last.size()[0], (Kind::Int64, inputs.ids.device()));
        let picked = hidden.index(&[Some(rows), Some(last.shallow_clone())]);
        picked.linear::<Tensor>(score, None)
    }
}

/// Position ids 0..seq for every row of a `[batch, seq]` batch.
pub fn default_positions(batch: i64, seq: i64, device: Device) -> Tensor {
    Tensor::arange(seq, (Kind::Int64, device)).unsqueeze(0).expand([batch, seq], true).contiguous()
}
