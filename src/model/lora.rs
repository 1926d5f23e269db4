//! LoRA adapters as PEFT defines and saves them: a low-rank update `scale · B A` beside each
//! targeted linear layer of the decoder (`LoraConfig`'s `r`, `lora_alpha`, `lora_dropout`,
//! `target_modules`, `use_rslora`), kept in a store of their own in f32 while the base weights
//! stay frozen in their dtype; switched off, or swapped for their starting copies, for DPO's
//! reference; saved as `adapter_model.safetensors` + `adapter_config.json` under PEFT's tensor
//! names; merged into full weights (`magpie merge`). Their random values (A's initialisation,
//! dropout masks) come from generators seeded for each adapter (`seeded_random.cpp`).

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::ffi::{c_char, c_int};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tch::{nn, Tensor};
use torch_sys::C_tensor;

/// The decoder's linear layers by PEFT's module names; `all-linear` is all of them (the output
/// head excluded, as PEFT excludes it).
pub const LINEAR_MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// PEFT's default `target_modules` for Llama, Qwen2 and Mistral.
pub const DEFAULT_TARGETS: &[&str] = &["q_proj", "v_proj"];

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// What PEFT puts before the base model's own parameter names in a saved adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// A LoRA adapter's shape and scale, PEFT's `LoraConfig` fields of the same names.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LoraConfig {
    /// The rank `r`.
    pub r: i64,
    /// `lora_alpha`: the update is scaled by alpha / r (alpha / √r with rsLoRA).
    pub alpha: f64,
    /// `lora_dropout` on the adapter's input while training.
    pub dropout: f64,
    /// The adapted modules, from [`LINEAR_MODULES`], in that order.
    pub targets: Vec<String>,
    /// `use_rslora`: the rank-stabilised scale.
    pub rslora: bool,
}

impl LoraConfig {
    /// Checks the values and expands `all-linear`; `targets` are PEFT module names.
    pub fn new(r: i64, alpha: f64, dropout: f64, targets: &[String], rslora: bool) -> Result<Self> {
        if r < 1 {
            bail!("the LoRA rank r is {r}; it must be at least 1");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("lora_dropout is {dropout}; it must be in [0, 1)");
        }
        if !alpha.is_finite() {
            bail!("lora_alpha is {alpha}; it must be a finite number");
        }
        let mut wanted = BTreeSet::new();
        for target in targets.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            match target {
                "all-linear" => wanted.extend(LINEAR_MODULES.iter().copied()),
                module if LINEAR_MODULES.contains(&module) => {
                    wanted.insert(module);
                }
                other => bail!("target module `{other}` is not a linear layer of a Llama-family model ({}, or all-linear)", LINEAR_MODULES.join(", ")),
            }
        }
        if wanted.is_empty() {
            bail!("no LoRA target modules given ({}, or all-linear)", LINEAR_MODULES.join(", "));
        }
        let targets = LINEAR_MODULES.iter().filter(|m| wanted.contains(*m)).map(|m| m.to_string()).collect();
        Ok(LoraConfig { r, alpha, dropout, targets, rslora })
    }

    /// PEFT's scaling: alpha / r, or alpha / √r with `use_rslora`.
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    pub fn targets(&self, module: &str) -> bool {
        self.targets.iter().any(|t| t == module)
    }

    /// The adapters' elements on a model of config `c`: `r · (inputs + outputs)` per targeted
    /// module and layer.
    pub fn parameters(&self, c: &super::LlamaConfig) -> i64 {
        let per_layer: i64 = module_shapes(c).iter().filter(|(m, _, _)| self.targets(m)).map(|(_, i, o)| self.r * (i + o)).sum();
        c.num_hidden_layers * per_layer
    }

    /// A PEFT `adapter_config.json` from `dir`. Only what magpie computes is accepted: plain
    /// LoRA (no DoRA, no bias training, no extra saved modules) on whole layers.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read (a PEFT adapter folder holds it)", path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        Self::from_peft(&json).with_context(|| format!("{}: not an adapter magpie can load", path.display()))
    }

    fn from_peft(json: &Value) -> Result<Self> {
        if json["peft_type"].as_str() != Some("LORA") {
            bail!("`peft_type` is {}, not \"LORA\"", json["peft_type"]);
        }
        let set = |key: &str| json[key].as_bool() == Some(true);
        let unsupported = [("use_dora", set("use_dora")), ("fan_in_fan_out", set("fan_in_fan_out")), ("lora_bias", set("lora_bias"))];
        if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
            bail!("`{key}` is set; magpie computes plain LoRA only");
        }
        if json["bias"].as_str().is_some_and(|b| b != "none") {
            bail!("`bias` is {}; magpie trains no biases (\"none\")", json["bias"]);
        }
        let extras = ["modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication"];
        for key in extras {
            let empty = match &json[key] {
                Value::Null => true,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            };
            if !empty {
                bail!("`{key}` is {}; magpie loads adapters without it", json[key]);
            }
        }
        let targets: Vec<String> = match &json["target_modules"] {
            Value::String(s) if s == "all-linear" => vec![s.clone()],
            Value::String(s) => bail!("`target_modules` is the pattern {s:?}; give the module names as a list"),
            // PEFT saves `all-linear` expanded to every module's path (`model.layers.0.self_attn.q_proj`);
            // a module is named by its last part, and an adapter on only some layers lacks the
            // others' tensors when it is loaded.
            Value::Array(list) => list
                .iter()
                .map(|v| v.as_str().map(|t| t.rsplit('.').next().unwrap_or(t).to_string()).context("`target_modules` holds a non-string"))
                .collect::<Result<_>>()?,
            _ => DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
        };
        let r = json["r"].as_i64().context("`r` is missing")?;
        let alpha = json["lora_alpha"].as_f64().unwrap_or(8.0);
        Self::new(r, alpha, json["lora_dropout"].as_f64().unwrap_or(0.0), &targets, json["use_rslora"].as_bool().unwrap_or(false))
    }

    /// `adapter_config.json` as PEFT writes it for this adapter on `base`.
    pub fn peft_json(&self, base: &Path) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf()),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "use_rslora": self.rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "revision": null,
        })
    }
}

/// Whether a model's adapters take part in its forward pass, and where their dropout masks come
/// from while training: one switch shared by all its adapters.
#[derive(Default)]
pub struct Switch {
    /// Compute the policy as it started (DPO's reference): each adapter's starting copy, or no
    /// adapter where none was kept.
    reference: AtomicBool,
    training: AtomicBool,
    /// The training micro-batch's random stream; adapter `slot`'s mask is drawn from a generator
    /// seeded with (stream, slot), so gradient checkpointing's recompute and a resumed run draw
    /// the masks the first pass and the uninterrupted run drew.
    stream: AtomicU64,
}

unsafe extern "C" {
    fn magpie_seeded_bernoulli(like: *const C_tensor, keep: f64, seed: u64, out: *mut *mut C_tensor, err: *mut c_char, len: usize) -> c_int;
    fn magpie_seeded_uniform_(tensor: *const C_tensor, low: f64, high: f64, seed: u64, err: *mut c_char, len: usize) -> c_int;
}

/// 1 with probability `keep`, else 0, shaped and typed as `like`, from a generator of its device
/// seeded with `seed` alone (`seeded_random.cpp`).
fn seeded_bernoulli(like: &Tensor, keep: f64, seed: u64) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    crate::torch_ffi::checked("drawing a LoRA dropout mask", |err, len| unsafe { magpie_seeded_bernoulli(like.as_ptr(), keep, seed, &mut out, err, len) })?;
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Fills `tensor` uniformly in `[low, high)` from a generator seeded with `seed` alone.
fn seeded_uniform_(tensor: &Tensor, low: f64, high: f64, seed: u64) -> Result<()> {
    crate::torch_ffi::checked("initialising a LoRA adapter", |err, len| unsafe { magpie_seeded_uniform_(tensor.as_ptr(), low, high, seed, err, len) })
}

impl Switch {
    /// Dropout on, its masks from `stream`; or off (`None`: evaluation, reference log-probs).
    pub fn set_dropout(&self, stream: Option<u64>) {
        self.training.store(stream.is_some(), Ordering::Relaxed);
        self.stream.store(stream.unwrap_or(0), Ordering::Relaxed);
    }

    /// Adapter `slot`'s dropout mask for an input like `h` (kept elements 1, in `h`'s dtype), or
    /// none when dropout is off: libtorch's Bernoulli sampler seeded for this slot and
    /// micro-batch.
    fn dropout_mask(&self, slot: usize, h: &Tensor, p: f64) -> Result<Option<Tensor>> {
        if p == 0.0 || !self.training.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let seed = crate::seed::mix(self.stream.load(Ordering::Relaxed) ^ crate::seed::mix(slot as u64 + 1));
        seeded_bernoulli(h, 1.0 - p, seed).map(Some)
    }

    /// Runs `f` on the policy as it started: the adapters' starting copies where they were
    /// kept (TRL's frozen `ref` adapter), else the adapters switched off (PEFT's
    /// `disable_adapter()`; fresh adapters start as the base).
    pub fn as_started<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.reference.swap(true, Ordering::Relaxed);
        let out = f();
        self.reference.store(before, Ordering::Relaxed);
        out
    }
}

/// One linear layer's adapter: `A` `[r, inputs]`, `B` `[outputs, r]`, in f32.
pub struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// This adapter's key among its model's (for its dropout masks).
    slot: usize,
    /// Frozen copies of A and B as they started (`keep_start`).
    start: Option<(Tensor, Tensor)>,
    switch: Arc<Switch>,
}

impl Adapter {
    /// PEFT's initialisation under `path` (`lora_A.weight`, `lora_B.weight`): A Kaiming-uniform
    /// with a = √5 (bounds ±1/√inputs), drawn from `seed` (the run's, mixed with the slot), B
    /// zero, so the adapted model starts as the base.
    pub fn new(path: &nn::Path, inputs: i64, outputs: i64, config: &LoraConfig, switch: &Arc<Switch>, slot: usize, seed: u64) -> Result<Self> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let a = (path / "lora_A").zeros("weight", &[config.r, inputs]);
        tch::no_grad(|| seeded_uniform_(&a, -bound, bound, crate::seed::mix(seed ^ crate::seed::mix(slot as u64 + 1))))?;
        let b = (path / "lora_B").zeros("weight", &[outputs, config.r]);
        Ok(Adapter { a, b, scale: config.scale(), dropout: config.dropout, slot, start: None, switch: switch.clone() })
    }

    /// `base + scale · B A dropout(x)` as PEFT computes it: `x` cast to the adapter's f32, the sum
    /// in f32, the result back in `base`'s dtype.
    pub fn add_to(&self, x: &Tensor, base: Tensor) -> Tensor {
        let reference = self.switch.reference.load(Ordering::Relaxed);
        let (a, b) = match (&self.start, reference) {
            (_, false) => (&self.a, &self.b),
            (Some((a, b)), true) => (a, b),
            (None, true) => return base,
        };
        let mut h = x.to_kind(a.kind());
        if !reference {
            let mask = self.switch.dropout_mask(self.slot, &h, self.dropout).expect("libtorch's Bernoulli sampler on a float tensor");
            if let Some(keep) = mask {
                h = h * keep * (1.0 / (1.0 - self.dropout));
            }
        }
        let delta = h.linear::<Tensor>(a, None).linear::<Tensor>(b, None) * self.scale;
        let kind = base.kind();
        let sum = base + delta;
        if sum.kind() == kind { sum } else { sum.to_kind(kind) }
    }

    /// Keeps frozen copies of A and B as they are now, for [`Switch::as_started`].
    pub fn keep_start(&mut self) {
        self.start = Some(tch::no_grad(|| (self.a.detach().copy(), self.b.detach().copy())));
    }

    /// The update to the layer's weight, `scale · B A`, `[outputs, inputs]` in f32.
    pub fn delta(&self) -> Tensor {
        tch::no_grad(|| self.b.matmul(&self.a) * self.scale)
    }
}

/// A model's adapters: the store that holds them (what trains) and their config.
pub struct Adapters {
    pub vs: nn::VarStore,
    pub config: LoraConfig,
}

/// Our name of an adapter tensor (`model.layers.0.self_attn.q_proj.lora_A.weight`) as PEFT saves
/// it, and back.
pub fn peft_name(ours: &str) -> String {
    format!("{PEFT_PREFIX}{ours}")
}

fn our_name(peft: &str) -> Option<&str> {
    peft.strip_prefix(PEFT_PREFIX)
}

impl Adapters {
    /// Copies a saved adapter's tensors (PEFT's names, `lora_A.weight` or PEFT's older
    /// `lora_A.default.weight`) into these adapters; a tensor with no place, a missing one or a
    /// wrong shape is an error naming it.
    pub fn load(&self, dir: &Path) -> Result<()> {
        let file = dir.join(ADAPTER_WEIGHTS);
        let tensors = Tensor::read_safetensors(&file).with_context(|| format!("{}: not a readable safetensors file", file.display()))?;
        let mut variables = self.vs.variables();
        let mut missing: BTreeSet<String> = variables.keys().cloned().collect();
        for (name, value) in tensors {
            let ours = our_name(&name).map(|n| n.replace(".default.weight", ".weight"));
            let Some(var) = ours.as_ref().and_then(|n| variables.get_mut(n)) else {
                bail!("{}: tensor `{name}` has no place in these adapters (r {}, targets {})", file.display(), self.config.r, self.config.targets.join(", "));
            };
            if value.size() != var.size() {
                bail!("{}: tensor `{name}` has shape {:?}, the adapter config says {:?}", file.display(), value.size(), var.size());
            }
            tch::no_grad(|| var.copy_(&value));
            missing.remove(ours.as_deref().unwrap());
        }
        if let Some(name) = missing.first() {
            bail!("{}: lacks `{}` ({} of the adapter's tensors are missing)", file.display(), peft_name(name), missing.len());
        }
        Ok(())
    }

    /// Writes `adapter_model.safetensors` (PEFT's names) and `adapter_config.json` into `dir`.
    pub fn write_files(&self, base: &Path, dir: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().map(|(name, t)| (peft_name(&name), t)).collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        super::hf::write_safetensors(&tensors, &dir.join(ADAPTER_WEIGHTS))?;
        let path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&path, serde_json::to_string_pretty(&self.config.peft_json(base))?).with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// Whether `dir` holds a PEFT adapter rather than a full model.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// Each of [`LINEAR_MODULES`] with its `(inputs, outputs)` on a model of config `c`.
pub fn module_shapes(c: &super::LlamaConfig) -> [(&'static str, i64, i64); 7] {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
    [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_config_reads_as_peft_writes_it_and_refuses_what_magpie_does_not_compute() {
        let config = LoraConfig::new(16, 32.0, 0.05, &targets(&["v_proj", "q_proj"]), false).unwrap();
        assert_eq!(config.targets, ["q_proj", "v_proj"], "in the model's order");
        assert_eq!(config.scale(), 2.0);
        assert_eq!(LoraConfig::new(16, 32.0, 0.0, &targets(&["all-linear"]), true).unwrap().scale(), 8.0);
        let json = config.peft_json(Path::new("/models/base"));
        assert_eq!(LoraConfig::from_peft(&json).unwrap(), config);
        assert_eq!(json["base_model_name_or_path"], "/models/base");
        let refused = |key: &str, value: Value| {
            let mut changed = json.clone();
            changed[key] = value;
            format!("{:#}", LoraConfig::from_peft(&changed).unwrap_err())
        };
        assert!(refused("use_dora", json!(true)).contains("use_dora"));
        assert!(refused("bias", json!("all")).contains("bias"));
        assert!(refused("modules_to_save", json!(["lm_head"])).contains("modules_to_save"));
        assert!(refused("target_modules", json!(".*proj")).contains("pattern"));
        assert!(refused("target_modules", json!(["embed_tokens"])).contains("`embed_tokens` is not a linear layer"));
        assert!(refused("exclude_modules", json!(["o_proj"])).contains("exclude_modules"));
        let mut expanded = json.clone();
        expanded["target_modules"] = json!(["model.layers.1.self_attn.v_proj", "model.layers.0.self_attn.q_proj"]);
        assert_eq!(LoraConfig::from_peft(&expanded).unwrap().targets, ["q_proj", "v_proj"], "PEFT's expanded paths");
        assert!(refused("r", json!(0)).contains("at least 1"));
        assert!(LoraConfig::new(8, 16.0, 1.0, &targets(&["q_proj"]), false).unwrap_err().to_string().contains("lora_dropout"));
    }
}

#[cfg(test)]
mod adapted_model_tests {
    use super::*;
    use crate::model::llama::default_positions;
    use crate::model::tests::{max_abs_diff, tiny};
    use crate::model::{AttentionMask, Inputs, Loaded};
    use tch::{Device, Kind};

    fn all_linear(dropout: f64) -> LoraConfig {
        LoraConfig::new(4, 8.0, dropout, &["all-linear".to_string()], false).unwrap()
    }

    fn ids() -> Tensor {
        Tensor::from_slice(&[1i64, 5, 9, 200, 17, 3]).view([1, 6])
    }

    fn logits(loaded: &Loaded) -> Tensor {
        let ids = ids();
        let positions = default_positions(1, 6, Device::Cpu);
        tch::no_grad(|| loaded.model.forward(&Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal }))
    }

    /// Random values in every B (fresh adapters have B = 0 and change nothing).
    fn randomise_b(loaded: &Loaded) {
        tch::manual_seed(7);
        for (name, mut var) in loaded.trained().variables() {
            if name.contains("lora_B") {
                tch::no_grad(|| var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.05)));
            }
        }
    }

    #[test]
    fn fresh_adapters_leave_the_base_logits_and_only_the_adapters_take_gradients() {
        let base = tiny("tiny-llama");
        let mut adapted = tiny("tiny-llama");
        adapted.add_adapters(&all_linear(0.0), None, 42).unwrap();
        assert_eq!(max_abs_diff(&logits(&base), &logits(&adapted)), 0.0, "B = 0: the base model exactly");
        let names: Vec<String> = adapted.trained().variables().into_keys().collect();
        assert_eq!(names.len(), 2 * 7 * adapted.dir.config.num_hidden_layers as usize);
        assert!(names.contains(&"model.layers.0.self_attn.q_proj.lora_A.weight".to_string()));
        let ids = ids();
        let positions = default_positions(1, 6, Device::Cpu);
        adapted.model.forward(&Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal }).square().sum(Kind::Float).backward();
        for (name, weight) in adapted.vs.variables() {
            assert!(!weight.requires_grad() && !weight.grad().defined(), "{name} is frozen");
        }
        let a = &adapted.trained().variables()["model.layers.1.mlp.down_proj.lora_A.weight"];
        let b = &adapted.trained().variables()["model.layers.1.mlp.down_proj.lora_B.weight"];
        assert!(b.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "B trains first (A's gradient is B·…, zero at B = 0)");
        let bound = 1.0 / (a.size()[1] as f64).sqrt();
        assert!(a.abs().max().double_value(&[]) <= bound && a.abs().max().double_value(&[]) > 0.5 * bound, "A is Kaiming-uniform within ±1/√inputs");
    }

    #[test]
    fn saved_merged_and_starting_adapters_give_the_logits_they_should() {
        let base = tiny("tiny-llama");
        let mut adapted = tiny("tiny-llama");
        adapted.add_adapters(&all_linear(0.0), None, 42).unwrap();
        randomise_b(&adapted);
        let want = logits(&adapted);
        assert!(max_abs_diff(&want, &logits(&base)) > 1e-3, "the adapters change the model");
        let off = tch::no_grad(|| adapted.model.as_started(|| logits(&adapted)));
        assert_eq!(max_abs_diff(&off, &logits(&base)), 0.0, "as started, no copies kept: switched off, the base model");
        assert!(max_abs_diff(&logits(&adapted), &want) == 0.0, "and back on afterwards");

        let dir = tempfile::tempdir().unwrap();
        adapted.write_files(dir.path()).unwrap();
        let saved: Vec<String> = Tensor::read_safetensors(dir.path().join(ADAPTER_WEIGHTS)).unwrap().into_iter().map(|(n, _)| n).collect();
        assert!(saved.contains(&"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string()), "PEFT's names: {saved:?}");
        assert!(dir.path().join("tokenizer.json").is_file() || !adapted.dir.dir.join("tokenizer.json").is_file());
        let mut again = tiny("tiny-llama");
        again.add_adapters(&LoraConfig::read(dir.path()).unwrap(), Some(dir.path()), 42).unwrap();
        assert_eq!(max_abs_diff(&logits(&again), &want), 0.0, "loaded back");

        // A loaded adapter trained further: as started, it is the kept copies.
        again.model.keep_starting_adapters();
        for (name, mut var) in again.trained().variables() {
            if name.contains("lora_B") {
                tch::no_grad(|| var.copy_(&(&var * 2.0)));
            }
        }
        assert!(max_abs_diff(&logits(&again), &want) > 1e-3, "trained further");
        let started = tch::no_grad(|| again.model.as_started(|| logits(&again)));
        assert_eq!(max_abs_diff(&started, &want), 0.0, "as started: the kept copies");

        adapted.model.merge_adapters();
        assert!(!adapted.model.has_adapters());
        let merged = logits(&adapted);
        assert!(max_abs_diff(&merged, &want) < 1e-5, "merged: {}", max_abs_diff(&merged, &want));
    }

    #[test]
    fn an_adapter_of_another_shape_or_with_stray_tensors_is_refused_by_name() {
        let mut adapted = tiny("tiny-llama");
        adapted.add_adapters(&all_linear(0.0), None, 42).unwrap();
        let dir = tempfile::tempdir().unwrap();
        adapted.write_files(dir.path()).unwrap();
        let mut rank_two = tiny("tiny-llama");
        let err = format!("{:#}", rank_two.add_adapters(&LoraConfig::new(2, 8.0, 0.0, &["all-linear".into()], false).unwrap(), Some(dir.path()), 42).unwrap_err());
        assert!(err.contains("has shape") && err.contains(ADAPTER_WEIGHTS), "{err}");
        let mut fewer = tiny("tiny-llama");
        let err = format!("{:#}", fewer.add_adapters(&LoraConfig::new(4, 8.0, 0.0, &["q_proj".into()], false).unwrap(), Some(dir.path()), 42).unwrap_err());
        assert!(err.contains("has no place"), "{err}");
    }

    /// Gradient checkpointing's recompute draws the dropout masks of its first pass: the same
    /// gradients as without it, from the same stream; another stream, other masks.
    #[test]
    fn lora_dropout_under_gradient_checkpointing_gives_the_gradients_of_the_plain_backward() {
        let mut adapted = tiny("tiny-llama");
        adapted.add_adapters(&all_linear(0.3), None, 42).unwrap();
        randomise_b(&adapted);
        let ids = ids();
        let positions = default_positions(1, 6, Device::Cpu);
        let inputs = Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal };
        let grads = |recompute: Option<&[bool]>, seed: u64| {
            for (_, v) in adapted.trained().variables() {
                let mut g = v.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            adapted.model.set_dropout(Some(seed));
            if let Some(recompute) = recompute {
                let (hidden, saved) = adapted.model.forward_blockwise(&inputs, recompute);
                adapted.model.logits(&hidden).square().sum(Kind::Float).backward();
                adapted.model.backward_blockwise(saved, |_| Ok(())).unwrap();
            } else {
                adapted.model.forward(&inputs).square().sum(Kind::Float).backward();
            }
            let mut named: Vec<(String, Tensor)> = adapted.trained().variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
        };
        let plain = grads(None, 11);
        for recompute in [[true, true], [true, false], [false, true], [false, false]] {
            for ((name, a), (_, b)) in plain.iter().zip(&grads(Some(&recompute), 11)) {
                assert!(max_abs_diff(a, b) < 1e-6, "{recompute:?} {name}: {}", max_abs_diff(a, b));
            }
        }
        let other = grads(None, 12);
        assert!(plain.iter().zip(&other).any(|((_, a), (_, b))| max_abs_diff(a, b) > 1e-6), "dropout is on, else this test cannot fail");
    }
}
