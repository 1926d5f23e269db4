//! Recipes: a YAML file whose keys are the subcommand's flag names (`early-stop-newline` or
//! `early_stop_newline`). `--recipe FILE` splices the recipe's values into the command line ahead
//! of the user's own flags, so a flag given on the command line overrides the recipe and clap
//! checks every value exactly as if it had been typed; a value it refuses is told as the
//! recipe's (`Expanded::attribute`: the file and the key). Unknown keys are an error naming the
//! key.
//!
//! Scalars become `--key=value`; `true` on a switch becomes `--key`; a list of scalars repeats
//! the flag; a mapping or a list of mappings (weighted system prompts, filter rules) is passed as
//! JSON, which the flag's own parser reads.

use anyhow::{bail, Context, Result};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};
use serde_yaml::Value;
use std::collections::{HashMap, HashSet};
use std::error::Error as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A command line with its recipe spliced in, and which flags the recipe gave.
pub struct Expanded {
    pub argv: Vec<OsString>,
    /// The recipe file and, for each flag it gave (a long name), its key as written there.
    recipe: Option<(PathBuf, HashMap<String, String>)>,
}

/// Returns `argv` with the recipe named by `--recipe` (if any) spliced in after the subcommand.
pub fn expand(command: &Command, argv: Vec<OsString>) -> Result<Expanded> {
    let Some(sub_at) = argv.iter().skip(1).position(|a| command.find_subcommand(a).is_some()).map(|i| i + 1) else {
        return Ok(Expanded { argv, recipe: None });
    };
    let sub = command.find_subcommand(&argv[sub_at]).expect("found above");
    let user_args: Vec<String> = argv[sub_at + 1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let Some(recipe) = recipe_path(&user_args) else {
        return Ok(Expanded { argv, recipe: None });
    };
    let (tokens, keys) = recipe_tokens(sub, Path::new(&recipe), &given_flags(sub, &user_args))?;
    let mut expanded = argv[..=sub_at].to_vec();
    expanded.extend(tokens.into_iter().map(OsString::from));
    expanded.extend_from_slice(&argv[sub_at + 1..]);
    Ok(Expanded { argv: expanded, recipe: Some((recipe.into(), keys)) })
}

impl Expanded {
    /// clap's refusal of a value, told as the recipe's when the recipe gave it: the file, the
    /// key, and why (a long value, such as a filter recipe's `steps`, cut short). Still a usage
    /// error (exit 2), as the same value typed on the command line is.
    pub fn attribute(&self, error: clap::Error) -> clap::Error {
        let Some((path, keys)) = &self.recipe else { return error };
        if !matches!(error.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
            return error;
        }
        let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else { return error };
        let flag = arg.trim_start_matches('-').split([' ', '=']).next().unwrap_or_default();
        let Some(key) = keys.get(flag) else { return error };
        let reason = match (error.get(ContextKind::InvalidValue), error.source()) {
            // A flag's own parser says why (a range, a step's unknown field).
            (Some(ContextValue::String(value)), Some(source)) => format!("invalid value '{}' for '{arg}': {source}", shorten(value)),
            // clap's own refusals (a choice outside the possible values) say it all.
            _ => error.to_string().split("\n\n").next().unwrap_or_default().trim_start_matches("error: ").trim().to_string(),
        };
        clap::Error::raw(error.kind(), format!("recipe {}: key `{key}`: {reason}\n", path.display()))
    }
}

/// `value`, or its first 60 characters and an ellipsis.
fn shorten(value: &str) -> String {
    if value.chars().count() > 60 { format!("{}…", value.chars().take(60).collect::<String>()) } else { value.to_string() }
}

fn recipe_path(args: &[String]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix("--recipe") {
        Some("") => args.get(i + 1).cloned(),
        Some(rest) => rest.strip_prefix('=').map(str::to_string),
        None => None,
    })
}

/// The long names of the flags the user typed, shorts resolved through `sub`.
fn given_flags(sub: &Command, args: &[String]) -> HashSet<String> {
    let mut given = HashSet::new();
    for arg in args.iter().take_while(|a| *a != "--") {
        if let Some(long) = arg.strip_prefix("--") {
            given.insert(long.split('=').next().unwrap_or_default().to_string());
        } else if let Some(short) = arg.strip_prefix('-').and_then(|s| s.chars().next())
            && let Some(long) = sub.get_arguments().find(|a| a.get_short() == Some(short)).and_then(Arg::get_long)
        {
            given.insert(long.to_string());
        }
    }
    given
}

/// The recipe's flags as command-line tokens, and each flag's key as written in the recipe.
fn recipe_tokens(sub: &Command, path: &Path, given: &HashSet<String>) -> Result<(Vec<String>, HashMap<String, String>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("recipe {}: cannot read", path.display()))?;
    let recipe: Value = serde_yaml::from_str(&text).with_context(|| format!("recipe {}: not valid YAML", path.display()))?;
    let entries = match recipe {
        Value::Mapping(m) => m,
        Value::Null => Default::default(),
        _ => bail!("recipe {}: expected a mapping of flag names to values", path.display()),
    };
    let (mut tokens, mut keys) = (vec![], HashMap::new());
    for (key, value) in entries {
        let Some(key) = key.as_str() else {
            bail!("recipe {}: key {key:?} is not a string", path.display());
        };
        let flag = key.replace('_', "-");
        let arg = sub.get_arguments().find(|a| a.get_long() == Some(flag.as_str()) && flag != "recipe");
        let Some(arg) = arg else {
            let mut known: Vec<_> = sub.get_arguments().filter_map(Arg::get_long).filter(|l| *l != "recipe").collect();
            known.sort();
            bail!(
                "recipe {}: unknown key `{key}` for `magpie {}` (known keys: {})",
                path.display(),
                sub.get_name(),
                known.join(", ")
            );
        };
        if !given.contains(&flag) {
            tokens.extend(value_tokens(&flag, arg, &value).with_context(|| format!("recipe {}: key `{key}`", path.display()))?);
            keys.insert(flag, key.to_string());
        }
    }
    Ok((tokens, keys))
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

fn value_tokens(flag: &str, arg: &Arg, value: &Value) -> Result<Vec<String>> {
    let switch = matches!(arg.get_action(), ArgAction::SetTrue);
    Ok(match value {
        Value::Null => vec![],
        Value::Bool(b) if switch => if *b { vec![format!("--{flag}")] } else { vec![] },
        _ if switch => bail!("`{flag}` is a switch: expected true or false"),
        Value::Sequence(items) if matches!(arg.get_action(), ArgAction::Append) && items.iter().all(|v| scalar(v).is_some()) => {
            items.iter().map(|v| format!("--{flag}={}", scalar(v).unwrap())).collect()
        }
        Value::Sequence(_) | Value::Mapping(_) => vec![format!("--{flag}={}", serde_json::to_string(value)?)],
        Value::Tagged(tagged) => value_tokens(flag, arg, &tagged.value)?,
        scalar_value => vec![format!("--{flag}={}", scalar(scalar_value).unwrap())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `magpie ARGS --recipe FILE` with `yaml` in FILE; `parse` says whether the whole command
    /// line is then parsed (main's path) or only expanded.
    fn with_recipe<T>(args: &[&str], yaml: &str, parse: impl FnOnce(Vec<OsString>) -> T) -> (T, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("recipe.yaml");
        std::fs::write(&recipe, yaml).unwrap();
        let mut argv: Vec<OsString> = ["magpie"].iter().chain(args).map(OsString::from).collect();
        argv.extend([OsString::from("--recipe"), recipe.clone().into()]);
        (parse(argv), recipe)
    }

    /// The error main prints for `magpie ARGS --recipe FILE`: a clap usage error (exit 2), as a
    /// bad value typed on the command line is.
    fn usage_error(args: &[&str], yaml: &str) -> (String, PathBuf) {
        let (result, recipe) = with_recipe(args, yaml, crate::cli::parse);
        let error = result.expect_err("the recipe value is refused");
        let usage = error.downcast_ref::<clap::Error>().expect("a clap usage error");
        assert_eq!(usage.exit_code(), 2);
        (usage.to_string(), recipe)
    }

    #[test]
    fn a_value_out_of_its_flags_range_is_an_error_naming_the_recipe_file_and_key() {
        let (error, recipe) = usage_error(&["synth"], "num: 4\ntemperature: -1\n");
        let why = magpie::flags::temperature("-1").unwrap_err();
        assert_eq!(error, format!("error: recipe {}: key `temperature`: invalid value '-1' for '--temperature <TEMPERATURE>': {why}\n", recipe.display()));
        // Typed on the command line, the same value is clap's own error, naming the flag.
        let typed = crate::cli::parse(["magpie", "synth", "--temperature=-1"].map(OsString::from)).err().unwrap();
        assert!(typed.to_string().contains("invalid value '-1' for '--temperature <TEMPERATURE>'") && !typed.to_string().contains("recipe"), "{typed}");
    }

    #[test]
    fn a_filter_recipes_misspelt_step_field_is_an_error_naming_the_recipe_file_and_the_steps_key() {
        let (error, recipe) = usage_error(&["filter"], "steps:\n  - step: minhash_dedup\n    treshold: 0.7\n");
        assert!(error.starts_with(&format!("error: recipe {}: key `steps`: invalid value '[{{", recipe.display())), "{error}");
        assert!(error.contains("unknown field `treshold`"), "{error}");
    }

    #[test]
    fn a_choice_outside_the_possible_values_names_the_recipe_key_and_the_choices() {
        let (error, _) = usage_error(&["synth"], "engine: vllm\n");
        assert!(error.contains("key `engine`: invalid value 'vllm' for '--engine <ENGINE>'"), "{error}");
        assert!(error.contains("possible values: "), "{error}");
    }

    /// Every recipe in `recipes/` parses with its command (named by the file: `*-filter`/`*-tag`,
    /// `*-sft`, `*-dpo`, `*-eval`, else synth): its keys are flags, its values pass their parsers,
    /// a filter recipe's steps have known keys.
    #[test]
    fn every_shipped_recipe_parses_with_its_command() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let command: &[&str] = if name.ends_with("-filter") || name.ends_with("-tag") {
                &["filter", "-i", "in", "-o", "out"]
            } else if name.contains("-sft") || name.contains("-dpo") {
                &[if name.contains("-sft") { "sft" } else { "dpo" }, "--model", "m", "-i", "in", "-o", "out"]
            } else if name.ends_with("-eval") {
                &["eval", "--model", "m", "-o", "out"]
            } else {
                &["synth", "-o", "out"]
            };
            let argv = ["magpie"].iter().chain(command).map(OsString::from).chain([OsString::from("--recipe"), path.clone().into()]);
            if let Err(error) = crate::cli::parse(argv) {
                panic!("{}: {error}", path.display());
            }
            parsed += 1;
        }
        assert!(parsed >= 13, "only {parsed} recipes in {}", dir.display());
    }

    #[test]
    fn the_command_line_wins_over_the_recipe_so_its_bad_value_is_never_parsed() {
        let (argv, _) = with_recipe(&["synth", "--temperature", "0.5", "-o", "out"], "temperature: -1\nnum: 3\n", |argv| expand(&crate::cli::Cli::command(), argv));
        let argv: Vec<String> = argv.unwrap().argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(argv.contains(&"--num=3".to_string()) && !argv.contains(&"--temperature=-1".to_string()), "{argv:?}");
        let (parsed, _) = with_recipe(&["synth", "--temperature", "0.5", "-o", "out"], "temperature: -1\n", crate::cli::parse);
        assert!(parsed.is_ok());
    }
}
