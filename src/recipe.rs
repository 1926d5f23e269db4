//! Recipes: a YAML file whose keys are the subcommand's flag names (`early-stop-newline` or
//! `early_stop_newline`). `--recipe FILE` splices the recipe's values into the command line ahead
//! of the user's own flags, so a flag given on the command line overrides the recipe and clap
//! checks every value exactly as if it had been typed. Unknown keys are an error naming the key.
//!
//! Scalars become `--key=value`; `true` on a switch becomes `--key`; a list of scalars repeats
//! the flag; a mapping or a list of mappings (weighted system prompts, filter rules) is passed as
//! JSON, which the flag's own parser reads.

use anyhow::{bail, Context, Result};
use clap::{Arg, ArgAction, Command};
use serde_yaml::Value;
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::Path;

/// Returns `argv` with the recipe named by `--recipe` (if any) spliced in after the subcommand.
pub fn expand(command: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(sub_at) = argv.iter().skip(1).position(|a| command.find_subcommand(a).is_some()).map(|i| i + 1) else {
        return Ok(argv);
    };
    let sub = command.find_subcommand(&argv[sub_at]).expect("found above");
    let user_args: Vec<String> = argv[sub_at + 1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let Some(recipe) = recipe_path(&user_args) else {
        return Ok(argv);
    };
    let tokens = recipe_tokens(sub, Path::new(&recipe), &given_flags(sub, &user_args))?;
    let mut expanded = argv[..=sub_at].to_vec();
    expanded.extend(tokens.into_iter().map(OsString::from));
    expanded.extend_from_slice(&argv[sub_at + 1..]);
    Ok(expanded)
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
        } else if let Some(short) = arg.strip_prefix('-').and_then(|s| s.chars().next()) {
            if let Some(long) = sub.get_arguments().find(|a| a.get_short() == Some(short)).and_then(Arg::get_long) {
                given.insert(long.to_string());
            }
        }
    }
    given
}

fn recipe_tokens(sub: &Command, path: &Path, given: &HashSet<String>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("recipe {}: cannot read", path.display()))?;
    let recipe: Value = serde_yaml::from_str(&text).with_context(|| format!("recipe {}: not valid YAML", path.display()))?;
    let entries = match recipe {
        Value::Mapping(m) => m,
        Value::Null => Default::default(),
        _ => bail!("recipe {}: expected a mapping of flag names to values", path.display()),
    };
    let mut tokens = vec![];
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
        }
    }
    Ok(tokens)
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
