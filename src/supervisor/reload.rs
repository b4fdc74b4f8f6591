//! Config reload (`mlxd reload`, SIGHUP): what changed between the running
//! presets and config and freshly read ones. Pure, so that the rules are tested
//! without a daemon; the supervisor carries the outcome out.

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::presets::Presets;

/// How the presets differ, by preset name (aliases follow their preset).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PresetDiff {
    pub unchanged: Vec<String>,
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

pub fn diff_presets(old: &Presets, new: &Presets) -> PresetDiff {
    let mut diff = PresetDiff::default();
    for p in old.iter() {
        match new.get(&p.name) {
            Some(q) if **q == *p => diff.unchanged.push(p.name.clone()),
            Some(_) => diff.changed.push(p.name.clone()),
            None => diff.removed.push(p.name.clone()),
        }
    }
    diff.added = new
        .iter()
        .filter(|p| old.get(&p.name).is_none())
        .map(|p| p.name.clone())
        .collect();
    diff
}

/// Config fields that differ and that a reload does not apply: the listeners,
/// the guard and the memory budget are built once at start, and running slots
/// hold the paths they spawn workers with. (`presets_dirs` and `allow_models`
/// apply live.)
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, differs: bool| {
        if differs {
            out.push(name.to_string());
        }
    };
    check("host", old.host != new.host);
    check("port", old.port != new.port);
    check("models_dir", old.models_dir != new.models_dir);
    check("python", old.python != new.python);
    check("worker_dir", old.worker_dir != new.worker_dir);
    check("api_keys", old.api_keys != new.api_keys);
    check("allowed_hosts", old.allowed_hosts != new.allowed_hosts);
    check(
        "allowed_origins",
        old.allowed_origins != new.allowed_origins,
    );
    check(
        "allowed_image_hosts",
        old.allowed_image_hosts != new.allowed_image_hosts,
    );
    check(
        "max_connections",
        old.max_connections != new.max_connections,
    );
    check("memory_cap", old.memory_cap != new.memory_cap);
    check("memory_shed", old.memory_shed != new.memory_shed);
    check("kv_reserve", old.kv_reserve != new.kv_reserve);
    check("peers", old.peers != new.peers);
    out
}

/// What a reload did, by model name (`mlxd reload` prints it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Same preset: left alone (a running worker keeps serving).
    pub unchanged: Vec<String>,
    /// Changed preset of a running model: its worker drains and a new one starts
    /// with the new preset.
    pub restarted: Vec<String>,
    /// Changed preset of a model with no worker: used at its next load.
    #[serde(default)]
    pub updated: Vec<String>,
    pub added: Vec<String>,
    /// Preset gone: its worker drains and stops; requests for it get 404.
    pub removed: Vec<String>,
    /// Config fields that changed but take effect only when the daemon restarts.
    pub needs_restart: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Preset;

    fn presets(list: &[(&str, &str)]) -> Presets {
        let mut out = Presets::default();
        for (name, extra) in list {
            let text = format!("model = \"{name}\"\n{extra}");
            out.insert(Preset::parse(&text, name).unwrap());
        }
        out
    }

    #[test]
    fn diff_sorts_presets_by_what_happened() {
        let old = presets(&[("a", ""), ("b", "max_tokens = 10"), ("c", "")]);
        let new = presets(&[("a", ""), ("b", "max_tokens = 20"), ("d", "")]);
        let diff = diff_presets(&old, &new);
        assert_eq!(
            diff,
            PresetDiff {
                unchanged: vec!["a".into()],
                changed: vec!["b".into()],
                added: vec!["d".into()],
                removed: vec!["c".into()],
            }
        );
        assert_eq!(diff_presets(&new, &new).unchanged.len(), 3);
    }

    #[test]
    fn only_fixed_config_fields_need_a_restart() {
        let old = Config::resolve("/tmp/h".into(), Default::default(), |_| None).unwrap();
        let mut new = old.clone();
        new.allow_models = Some(vec!["a".into()]);
        new.presets_dirs.push("/tmp/more".into());
        assert!(needs_restart(&old, &new).is_empty());
        new.port += 1;
        new.api_keys = vec!["0123456789".into()];
        assert_eq!(needs_restart(&old, &new), ["port", "api_keys"]);
    }
}
