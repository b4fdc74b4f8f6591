//! `mlxd service install|uninstall|status`: run the daemon at login under the
//! platform's service manager, restarted after a crash but not after a clean exit.
//!
//! - macOS: a LaunchAgent, `~/Library/LaunchAgents/dev.mlxd.plist`, loaded with
//!   `launchctl bootstrap gui/<uid>` and removed with `launchctl bootout`.
//! - Linux: a systemd user unit, `~/.config/systemd/user/mlxd.service`, enabled
//!   with `systemctl --user enable --now`.
//!
//! Both files are generated here on every platform (the target is a value, not a
//! `cfg`), so both are unit-tested wherever the tests run, and `--dry-run --target`
//! prints either.
//!
//! Workers never outlive the daemon, however it dies: they exit at EOF on their
//! stdin (the daemon holds the other end), on Linux the kernel SIGKILLs them when
//! the daemon dies (`sys::kill_with_daemon`), and systemd's `KillMode=mixed` kills
//! whatever is left in the unit's cgroup. A daemon starting after a crash removes
//! the shared-memory segments its predecessor left (`supervisor::registry`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The launchd label (and the plist's file name).
pub const LAUNCHD_LABEL: &str = "dev.mlxd";
/// The systemd unit's name.
pub const SYSTEMD_UNIT: &str = "mlxd.service";
/// launchd waits at least this long between two starts of the daemon (a daemon
/// that cannot start, e.g. its port is taken, is retried at this pace).
const THROTTLE_SECS: u32 = 10;
/// Between a crash and the restart (systemd).
const RESTART_SECS: u32 = 2;
/// How long a stop may take before the manager SIGKILLs: the daemon's own
/// shutdown drains connections (5 s), then stops each worker (at most 12 s).
const STOP_TIMEOUT_SECS: u32 = 30;

/// Environment variables copied from the installing shell into the service: the
/// service manager starts the daemon with almost none. API keys are not among
/// them (the service file is readable by others): put `api_keys` in config.toml.
const SERVICE_ENV: &[&str] = &[
    "PATH",
    "MLXD_HOME",
    "MLXD_MODELS_DIR",
    "MLXD_PYTHON",
    "MLXD_WORKER_DIR",
    "MLXD_LOG",
    "MLXD_WORKER_LOG",
    "MLXD_MEMORY_CAP",
    "MLXD_MEMORY_SHED",
    "MLXD_MAX_CONNECTIONS",
    "LANG",
    "LC_ALL",
    "CUDA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
];

/// Which service manager a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// launchd (a LaunchAgent).
    Macos,
    /// systemd (a user unit).
    Linux,
}

impl Target {
    /// This machine's service manager.
    pub fn native() -> Option<Target> {
        if cfg!(target_os = "macos") {
            Some(Target::Macos)
        } else if cfg!(target_os = "linux") {
            Some(Target::Linux)
        } else {
            None
        }
    }
}

/// What the service runs, and with what: everything both file formats need.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// The absolute path of the mlxd binary that runs as the service.
    pub program: PathBuf,
    /// Its arguments: `serve`, and `--port P` when one was given at install.
    pub args: Vec<String>,
    /// The user's home (the service files live under it).
    pub user_home: PathBuf,
    /// `$MLXD_HOME/logs`: the daemon's own logs, and the manager's capture of its
    /// stdout/stderr (panics, errors before logging starts).
    pub logs_dir: PathBuf,
    /// The daemon's environment.
    pub env: BTreeMap<String, String>,
}

impl ServiceSpec {
    /// `program serve [--port P]`, with the variables of [`SERVICE_ENV`] that
    /// `env` has, and the daemon's logging on files only.
    pub fn new(
        program: PathBuf,
        port: Option<u16>,
        user_home: PathBuf,
        mlxd_home: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> ServiceSpec {
        let mut args = vec!["serve".to_string()];
        if let Some(p) = port {
            args.extend(["--port".to_string(), p.to_string()]);
        }
        let mut vars: BTreeMap<String, String> = SERVICE_ENV
            .iter()
            .filter_map(|k| Some((k.to_string(), env(k)?)))
            .collect();
        vars.entry("PATH".into())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".into());
        vars.insert("HOME".into(), user_home.display().to_string());
        // The log files have every line; launchd's capture and journald would get
        // them all a second time.
        vars.insert("MLXD_LOG_STDERR".into(), "0".into());
        ServiceSpec {
            program,
            args,
            user_home,
            logs_dir: crate::logs::logs_dir(mlxd_home),
            env: vars,
        }
    }

    /// The spec for this process: this binary, `$HOME`, this environment.
    pub fn for_this_process(cfg: &Config, port: Option<u16>) -> anyhow::Result<ServiceSpec> {
        let program = std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .context("cannot tell where this mlxd binary is")?;
        let user_home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .context("HOME is not set")?;
        Ok(ServiceSpec::new(program, port, user_home, &cfg.home, |k| {
            std::env::var(k).ok()
        }))
    }

    fn command_line(&self) -> Vec<String> {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// A LaunchAgent property list (see `man launchd.plist`); the field names are its
/// keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LaunchAgent {
    pub label: String,
    pub program_arguments: Vec<String>,
    pub environment_variables: BTreeMap<String, String>,
    /// Start at login (when the agent is bootstrapped).
    pub run_at_load: bool,
    pub keep_alive: KeepAlive,
    pub throttle_interval: u32,
    /// Seconds between launchd's SIGTERM and its SIGKILL on stop.
    pub exit_time_out: u32,
    pub working_directory: PathBuf,
    pub standard_out_path: PathBuf,
    pub standard_error_path: PathBuf,
}

/// `KeepAlive = {SuccessfulExit = false}`: relaunch only after an exit that was
/// not successful (a crash, a signal); a clean exit (SIGTERM, `launchctl kill`)
/// stays down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeepAlive {
    pub successful_exit: bool,
}

impl LaunchAgent {
    pub fn new(spec: &ServiceSpec) -> LaunchAgent {
        LaunchAgent {
            label: LAUNCHD_LABEL.into(),
            program_arguments: spec.command_line(),
            environment_variables: spec.env.clone(),
            run_at_load: true,
            keep_alive: KeepAlive {
                successful_exit: false,
            },
            throttle_interval: THROTTLE_SECS,
            exit_time_out: STOP_TIMEOUT_SECS,
            working_directory: spec.user_home.clone(),
            standard_out_path: spec.logs_dir.join("daemon-stdout.log"),
            standard_error_path: spec.logs_dir.join("daemon-stderr.log"),
        }
    }

    pub fn to_xml(&self) -> Result<String, plist::Error> {
        let mut out = Vec::new();
        plist::to_writer_xml(&mut out, self)?;
        out.push(b'\n');
        Ok(String::from_utf8(out).expect("plist writes UTF-8 XML"))
    }

    pub fn from_xml(xml: &str) -> Result<LaunchAgent, plist::Error> {
        plist::from_bytes(xml.as_bytes())
    }
}

/// The systemd user unit.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let exec: Vec<String> = spec
        .command_line()
        .iter()
        .map(|w| systemd_quote(w, true))
        .collect();
    let mut unit = format!(
        "\
[Unit]
Description=mlxd: local LLM server (mlx-lm workers)
# More than 5 failed starts within 60 s: give up until `systemctl --user restart mlxd`.
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
Type=simple
ExecStart={exec}
# Restart after a crash or a signal, not after a clean exit (exit status 0).
Restart=on-failure
RestartSec={RESTART_SECS}
# SIGTERM goes to mlxd alone, which drains and stops its workers; anything left in
# the unit's cgroup when it exits (or after TimeoutStopSec) is SIGKILLed, so no
# worker outlives the daemon.
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT_SECS}
",
        exec = exec.join(" ")
    );
    for (k, v) in &spec.env {
        unit.push_str(&format!(
            "Environment={}\n",
            systemd_quote(&format!("{k}={v}"), false)
        ));
    }
    unit.push_str("\n[Install]\nWantedBy=default.target\n");
    unit
}

/// One word of a unit file's value: `%` (specifiers) doubled, `$` (variable
/// expansion, ExecStart only) doubled, and quoted with C escapes when it holds
/// spaces, quotes or backslashes.
fn systemd_quote(word: &str, exec: bool) -> String {
    let mut s = word.replace('%', "%%");
    if exec {
        s = s.replace('$', "$$");
    }
    if s.is_empty()
        || s.contains(|c: char| {
            c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\')
        })
    {
        // C-style escapes inside quotes (systemd unquotes them): a newline in a
        // value must not end the directive's line.
        let mut escaped = String::new();
        for c in s.chars() {
            match c {
                '\\' => escaped.push_str("\\\\"),
                '"' => escaped.push_str("\\\""),
                '\n' => escaped.push_str("\\n"),
                '\t' => escaped.push_str("\\t"),
                '\r' => escaped.push_str("\\r"),
                c if c.is_control() => escaped.push_str(&format!("\\x{:02x}", u32::from(c))),
                c => escaped.push(c),
            }
        }
        format!("\"{escaped}\"")
    } else {
        s
    }
}

/// One thing install or uninstall does; printed instead of done with `--dry-run`.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    CreateDir(PathBuf),
    /// Writes the service file (its contents are printed before the plan).
    WriteFile(PathBuf),
    RemoveFile(PathBuf),
    /// A command; `may_fail` for one that fails harmlessly (nothing to undo).
    Run {
        argv: Vec<String>,
        may_fail: bool,
    },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |p: &Path| shell_quote(&p.display().to_string());
        match self {
            Step::CreateDir(p) => write!(f, "mkdir -p {}", q(p)),
            Step::WriteFile(p) => write!(f, "write {}", q(p)),
            Step::RemoveFile(p) => write!(f, "rm -f {}", q(p)),
            Step::Run { argv, may_fail } => {
                let line: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
                write!(f, "{}", line.join(" "))?;
                if *may_fail {
                    write!(f, "  # may fail: nothing to undo")?;
                }
                Ok(())
            }
        }
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The service for one target, user and spec.
pub struct Service {
    pub target: Target,
    pub spec: ServiceSpec,
    /// The user's id: launchd's domain is `gui/<uid>`.
    pub uid: u32,
}

impl Service {
    /// Where the service file lives.
    pub fn file_path(&self) -> PathBuf {
        match self.target {
            Target::Macos => self
                .spec
                .user_home
                .join("Library/LaunchAgents")
                .join(format!("{LAUNCHD_LABEL}.plist")),
            Target::Linux => self
                .spec
                .user_home
                .join(".config/systemd/user")
                .join(SYSTEMD_UNIT),
        }
    }

    pub fn file_contents(&self) -> anyhow::Result<String> {
        Ok(match self.target {
            Target::Macos => LaunchAgent::new(&self.spec).to_xml()?,
            Target::Linux => systemd_unit(&self.spec),
        })
    }

    fn launchd_domain(&self) -> String {
        format!("gui/{}", self.uid)
    }

    fn launchd_service(&self) -> String {
        format!("gui/{}/{LAUNCHD_LABEL}", self.uid)
    }

    /// Install: write the file, then (re)load it. `loaded`: an older version is
    /// loaded now (launchd: it is booted out first, so the new file takes effect;
    /// systemd: it is restarted).
    pub fn install_plan(&self, loaded: bool) -> Vec<Step> {
        let file = self.file_path();
        let mut steps = vec![
            Step::CreateDir(file.parent().expect("a file in a directory").to_path_buf()),
            Step::CreateDir(self.spec.logs_dir.clone()),
            Step::WriteFile(file.clone()),
        ];
        match self.target {
            Target::Macos => {
                if loaded {
                    steps.push(Step::Run {
                        argv: argv(&["launchctl", "bootout", &self.launchd_service()]),
                        may_fail: true,
                    });
                }
                // A service once disabled (`launchctl disable`) refuses bootstrap.
                steps.push(Step::Run {
                    argv: argv(&["launchctl", "enable", &self.launchd_service()]),
                    may_fail: false,
                });
                steps.push(Step::Run {
                    argv: argv(&[
                        "launchctl",
                        "bootstrap",
                        &self.launchd_domain(),
                        &file.display().to_string(),
                    ]),
                    may_fail: false,
                });
            }
            Target::Linux => {
                steps.push(Step::Run {
                    argv: argv(&["systemctl", "--user", "daemon-reload"]),
                    may_fail: false,
                });
                steps.push(Step::Run {
                    argv: argv(&["systemctl", "--user", "enable", "--now", "mlxd"]),
                    may_fail: false,
                });
                if loaded {
                    steps.push(Step::Run {
                        argv: argv(&["systemctl", "--user", "restart", "mlxd"]),
                        may_fail: false,
                    });
                }
            }
        }
        steps
    }

    /// Uninstall: stop and unload (which stops the daemon and so its workers),
    /// then remove the file.
    pub fn uninstall_plan(&self, loaded: bool) -> Vec<Step> {
        let mut steps = vec![];
        match self.target {
            Target::Macos => {
                if loaded {
                    steps.push(Step::Run {
                        argv: argv(&["launchctl", "bootout", &self.launchd_service()]),
                        may_fail: false,
                    });
                }
                steps.push(Step::RemoveFile(self.file_path()));
            }
            Target::Linux => {
                steps.push(Step::Run {
                    argv: argv(&["systemctl", "--user", "disable", "--now", "mlxd"]),
                    may_fail: !loaded,
                });
                steps.push(Step::RemoveFile(self.file_path()));
                steps.push(Step::Run {
                    argv: argv(&["systemctl", "--user", "daemon-reload"]),
                    may_fail: false,
                });
            }
        }
        steps
    }

    /// The read-only commands `status` runs.
    pub fn status_commands(&self) -> Vec<Vec<String>> {
        match self.target {
            Target::Macos => vec![argv(&["launchctl", "print", &self.launchd_service()])],
            Target::Linux => vec![
                argv(&["systemctl", "--user", "is-enabled", "mlxd"]),
                argv(&["systemctl", "--user", "is-active", "mlxd"]),
                argv(&[
                    "systemctl",
                    "--user",
                    "show",
                    "--property",
                    "MainPID",
                    "--value",
                    "mlxd",
                ]),
            ],
        }
    }

    /// Asks the service manager (this machine's) how the service stands.
    pub fn status(&self) -> ServiceStatus {
        let installed = self.file_path().exists();
        let outputs: Vec<Option<String>> = self
            .status_commands()
            .iter()
            .map(|argv| {
                let out = Command::new(&argv[0]).args(&argv[1..]).output().ok()?;
                // `is-enabled`/`is-active` answer on stdout and say no by status.
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (out.status.success() || !text.is_empty()).then_some(text)
            })
            .collect();
        match self.target {
            Target::Macos => {
                let printed = outputs[0].as_deref();
                let (running, pid) = printed.map_or((false, None), parse_launchctl_print);
                ServiceStatus {
                    installed,
                    loaded: printed.is_some(),
                    running,
                    pid,
                }
            }
            Target::Linux => {
                let word = |i: usize| outputs[i].clone().unwrap_or_default();
                let pid = word(2).parse::<u32>().ok().filter(|&p| p > 0);
                ServiceStatus {
                    installed,
                    loaded: word(0) == "enabled",
                    running: word(1) == "active",
                    pid,
                }
            }
        }
    }
}

/// How the service stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    /// The service file exists.
    pub installed: bool,
    /// launchd: bootstrapped in the user's domain; systemd: enabled.
    pub loaded: bool,
    pub running: bool,
    pub pid: Option<u32>,
}

/// From `launchctl print gui/<uid>/dev.mlxd`: whether it runs, and its pid (the
/// service's own top-level `state = running` and `pid = N` lines).
pub fn parse_launchctl_print(text: &str) -> (bool, Option<u32>) {
    let mut running = false;
    let mut pid = None;
    for line in text.lines() {
        // Nested blocks (endpoints, the environment) are indented further.
        if !line.starts_with('\t') || line.starts_with("\t\t") {
            continue;
        }
        match line.trim().split_once(" = ") {
            Some(("state", v)) => running = v.trim() == "running",
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            _ => {}
        }
    }
    (running, pid)
}

/// What `mlxd service` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Action {
    /// Write the service file and load it: the daemon starts now and at login.
    Install,
    /// Stop the service and remove its file.
    Uninstall,
    /// Whether the service is installed, loaded and running.
    Status,
}

pub struct Options {
    /// Print the file and the commands; touch nothing.
    pub dry_run: bool,
    /// Another platform's files (with `dry_run` only).
    pub target: Option<Target>,
    /// Passed on to `serve`.
    pub port: Option<u16>,
}

/// `mlxd service install|uninstall|status`.
pub fn run(cfg: &Config, action: Action, opts: Options) -> anyhow::Result<()> {
    let native = Target::native();
    let target = match (opts.target, native) {
        (Some(t), n) if Some(t) != n && !opts.dry_run => {
            bail!("--target {t:?} is for --dry-run only: this machine has another service manager")
        }
        (Some(t), _) => t,
        (None, Some(n)) => n,
        (None, None) => bail!("mlxd service knows launchd (macOS) and systemd (Linux) only"),
    };
    let service = Service {
        target,
        spec: ServiceSpec::for_this_process(cfg, opts.port)?,
        uid: nix::unistd::getuid().as_raw(),
    };
    let path = service.file_path();
    // Asking is read-only, so a dry run asks too (on this machine's manager only).
    let status = (Some(target) == native).then(|| service.status());
    let loaded = status.as_ref().is_some_and(|s| s.loaded || s.running);
    match action {
        Action::Status => {
            if opts.dry_run {
                for cmd in service.status_commands() {
                    println!(
                        "{}",
                        Step::Run {
                            argv: cmd,
                            may_fail: false
                        }
                    );
                }
                return Ok(());
            }
            let s = status.expect("status is asked on this machine");
            let yes = |b: bool| if b { "yes" } else { "no" };
            println!(
                "file:      {} ({})",
                path.display(),
                if s.installed {
                    "installed"
                } else {
                    "not installed"
                }
            );
            match target {
                Target::Macos => println!("loaded:    {}", yes(s.loaded)),
                Target::Linux => println!("enabled:   {}", yes(s.loaded)),
            }
            match s.pid {
                Some(pid) if s.running => println!("running:   yes (pid {pid})"),
                _ => println!("running:   {}", yes(s.running)),
            }
            println!(
                "logs:      {} (`mlxd logs`)",
                service.spec.logs_dir.display()
            );
            Ok(())
        }
        Action::Install => {
            let contents = service.file_contents()?;
            let plan = service.install_plan(loaded);
            if opts.dry_run {
                println!("# {}\n{contents}", path.display());
                print_plan(&plan, status.is_none());
                return Ok(());
            }
            if std::env::var_os("MLXD_API_KEY").is_some() {
                eprintln!("note: MLXD_API_KEY is not copied into the service file (others can read it); put api_keys in {}", cfg.home.join("config.toml").display());
            }
            execute(&plan, &contents)?;
            println!("installed {}", path.display());
            if target == Target::Linux {
                println!("(to keep it running while you are logged out: loginctl enable-linger)");
            }
            Ok(())
        }
        Action::Uninstall => {
            let plan = service.uninstall_plan(loaded);
            if opts.dry_run {
                print_plan(&plan, status.is_none());
                return Ok(());
            }
            execute(&plan, "")?;
            println!("uninstalled {}", path.display());
            Ok(())
        }
    }
}

fn print_plan(plan: &[Step], foreign: bool) {
    if foreign {
        println!("# (another platform: written as if the service were not loaded)");
    }
    for step in plan {
        println!("{step}");
    }
}

fn execute(plan: &[Step], contents: &str) -> anyhow::Result<()> {
    for step in plan {
        match step {
            Step::CreateDir(dir) => std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?,
            Step::WriteFile(path) => {
                // Write-then-rename: a half-written file is never loaded.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, contents)
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .with_context(|| format!("cannot write {}", path.display()))?
            }
            Step::RemoveFile(path) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
                _ => {}
            },
            Step::Run { argv, may_fail } => {
                println!("$ {step}");
                let out = Command::new(&argv[0])
                    .args(&argv[1..])
                    .output()
                    .with_context(|| format!("cannot run {}", argv[0]))?;
                if !out.status.success() && !may_fail {
                    bail!(
                        "{step}: {}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                            .lines()
                            .next()
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: Option<u16>) -> ServiceSpec {
        let env = |k: &str| match k {
            "PATH" => Some("/opt/homebrew/bin:/usr/bin:/bin".to_string()),
            "MLXD_HOME" => Some("/Users/ada/mlxd home".to_string()),
            "MLXD_LOG" => Some("debug".to_string()),
            _ => None,
        };
        ServiceSpec::new(
            PathBuf::from("/opt/mlxd/bin/mlxd"),
            port,
            PathBuf::from("/Users/ada"),
            Path::new("/Users/ada/mlxd home"),
            env,
        )
    }

    #[test]
    fn the_spec_takes_the_environment_it_needs_and_no_secrets() {
        let s = ServiceSpec::new(
            PathBuf::from("/bin/mlxd"),
            None,
            PathBuf::from("/home/u"),
            Path::new("/home/u/.mlxd"),
            |k| (k == "MLXD_API_KEY" || k == "MLXD_PYTHON").then(|| format!("value of {k}")),
        );
        assert_eq!(s.args, ["serve"]);
        assert_eq!(s.logs_dir, Path::new("/home/u/.mlxd/logs"));
        let keys: Vec<&str> = s.env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["HOME", "MLXD_LOG_STDERR", "MLXD_PYTHON", "PATH"]);
        assert_eq!(s.env["HOME"], "/home/u");
        assert_eq!(
            s.env["PATH"], "/usr/local/bin:/usr/bin:/bin",
            "a default PATH"
        );
        assert_eq!(s.env["MLXD_LOG_STDERR"], "0");
    }

    #[test]
    fn the_launch_agent_round_trips_through_plist() {
        let spec = spec(Some(9000));
        let agent = LaunchAgent::new(&spec);
        let xml = agent.to_xml().unwrap();
        assert_eq!(LaunchAgent::from_xml(&xml).unwrap(), agent);

        // The same file read as a plain plist: launchd's key names and types.
        let v = plist::Value::from_reader_xml(xml.as_bytes()).unwrap();
        let d = v.as_dictionary().unwrap();
        assert_eq!(d["Label"].as_string(), Some("dev.mlxd"));
        let args: Vec<&str> = d["ProgramArguments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_string().unwrap())
            .collect();
        assert_eq!(args, ["/opt/mlxd/bin/mlxd", "serve", "--port", "9000"]);
        assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
        let keep_alive = d["KeepAlive"].as_dictionary().unwrap();
        assert_eq!(keep_alive.len(), 1);
        assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
        assert_eq!(d["ThrottleInterval"].as_unsigned_integer(), Some(10));
        assert_eq!(d["ExitTimeOut"].as_unsigned_integer(), Some(30));
        assert_eq!(
            d["StandardOutPath"].as_string(),
            Some("/Users/ada/mlxd home/logs/daemon-stdout.log")
        );
        assert_eq!(
            d["StandardErrorPath"].as_string(),
            Some("/Users/ada/mlxd home/logs/daemon-stderr.log")
        );
        assert_eq!(d["WorkingDirectory"].as_string(), Some("/Users/ada"));
        let env = d["EnvironmentVariables"].as_dictionary().unwrap();
        let env: BTreeMap<&str, &str> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_string().unwrap()))
            .collect();
        assert_eq!(
            env,
            BTreeMap::from([
                ("HOME", "/Users/ada"),
                ("MLXD_HOME", "/Users/ada/mlxd home"),
                ("MLXD_LOG", "debug"),
                ("MLXD_LOG_STDERR", "0"),
                ("PATH", "/opt/homebrew/bin:/usr/bin:/bin"),
            ])
        );
        assert!(xml.starts_with("<?xml"), "{xml}");
    }

    /// (section, key, value) of each setting in a unit file.
    fn unit_settings(unit: &str) -> Vec<(String, String, String)> {
        let mut section = String::new();
        let mut out = vec![];
        for line in unit.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            let (k, v) = line.split_once('=').expect("key=value");
            out.push((section.clone(), k.to_string(), v.to_string()));
        }
        out
    }

    #[test]
    fn the_systemd_unit_has_the_settings_it_needs() {
        let mut spec = spec(None);
        spec.program = PathBuf::from("/home/ada/my tools/mlxd");
        let unit = systemd_unit(&spec);
        let settings = unit_settings(&unit);
        let get = |section: &str, key: &str| -> Vec<String> {
            settings
                .iter()
                .filter(|(s, k, _)| s == section && k == key)
                .map(|(_, _, v)| v.clone())
                .collect()
        };
        assert_eq!(
            get("Service", "ExecStart"),
            [r#""/home/ada/my tools/mlxd" serve"#]
        );
        assert_eq!(get("Service", "Restart"), ["on-failure"]);
        assert_eq!(get("Service", "RestartSec"), ["2"]);
        assert_eq!(get("Service", "KillMode"), ["mixed"]);
        assert_eq!(get("Service", "TimeoutStopSec"), ["30"]);
        assert_eq!(get("Service", "Type"), ["simple"]);
        assert_eq!(get("Unit", "StartLimitBurst"), ["5"]);
        assert_eq!(get("Install", "WantedBy"), ["default.target"]);
        assert_eq!(
            get("Service", "Environment"),
            [
                "HOME=/Users/ada",
                r#""MLXD_HOME=/Users/ada/mlxd home""#,
                "MLXD_LOG=debug",
                "MLXD_LOG_STDERR=0",
                "PATH=/opt/homebrew/bin:/usr/bin:/bin",
            ]
        );
        // Every line is in a section, and no setting appears outside the three.
        for (section, _, _) in &settings {
            assert!(["Unit", "Service", "Install"].contains(&section.as_str()));
        }
    }

    #[test]
    fn systemd_words_are_escaped() {
        assert_eq!(systemd_quote("/usr/bin/mlxd", true), "/usr/bin/mlxd");
        assert_eq!(systemd_quote("50%", true), "50%%");
        assert_eq!(systemd_quote("$HOME", true), "$$HOME");
        assert_eq!(systemd_quote("K=$v", false), "K=$v");
        assert_eq!(systemd_quote(r#"a "b"\c"#, true), r#""a \"b\"\\c""#);
        assert_eq!(systemd_quote("", true), r#""""#);
        // A newline in an environment value stays inside its directive's line.
        assert_eq!(
            systemd_quote("K=a\nExecStart=/bin/x", false),
            r#""K=a\nExecStart=/bin/x""#
        );
    }

    fn service(target: Target) -> Service {
        Service {
            target,
            spec: spec(None),
            uid: 501,
        }
    }

    fn lines(plan: &[Step]) -> Vec<String> {
        plan.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn launchd_plans() {
        let s = service(Target::Macos);
        assert_eq!(
            s.file_path(),
            Path::new("/Users/ada/Library/LaunchAgents/dev.mlxd.plist")
        );
        assert_eq!(
            lines(&s.install_plan(false)),
            [
                "mkdir -p /Users/ada/Library/LaunchAgents",
                "mkdir -p '/Users/ada/mlxd home/logs'",
                "write /Users/ada/Library/LaunchAgents/dev.mlxd.plist",
                "launchctl enable gui/501/dev.mlxd",
                "launchctl bootstrap gui/501 /Users/ada/Library/LaunchAgents/dev.mlxd.plist",
            ]
        );
        assert_eq!(
            lines(&s.install_plan(true))[3],
            "launchctl bootout gui/501/dev.mlxd  # may fail: nothing to undo"
        );
        assert_eq!(
            lines(&s.uninstall_plan(true)),
            [
                "launchctl bootout gui/501/dev.mlxd",
                "rm -f /Users/ada/Library/LaunchAgents/dev.mlxd.plist",
            ]
        );
        assert_eq!(
            s.status_commands(),
            [argv(&["launchctl", "print", "gui/501/dev.mlxd"])]
        );
    }

    #[test]
    fn systemd_plans() {
        let s = service(Target::Linux);
        assert_eq!(
            s.file_path(),
            Path::new("/Users/ada/.config/systemd/user/mlxd.service")
        );
        assert_eq!(
            lines(&s.install_plan(false))[2..],
            [
                "write /Users/ada/.config/systemd/user/mlxd.service",
                "systemctl --user daemon-reload",
                "systemctl --user enable --now mlxd",
            ]
        );
        assert_eq!(
            lines(&s.install_plan(true)).last().unwrap(),
            "systemctl --user restart mlxd"
        );
        assert_eq!(
            lines(&s.uninstall_plan(true)),
            [
                "systemctl --user disable --now mlxd",
                "rm -f /Users/ada/.config/systemd/user/mlxd.service",
                "systemctl --user daemon-reload",
            ]
        );
    }

    #[test]
    fn launchctl_print_says_whether_it_runs() {
        let running = "gui/501/dev.mlxd = {\n\tactive count = 1\n\tpath = /Users/ada/Library/LaunchAgents/dev.mlxd.plist\n\ttype = LaunchAgent\n\tstate = running\n\n\tprogram = /opt/mlxd/bin/mlxd\n\tpid = 4242\n\tenvironment = {\n\t\tpid = 1\n\t\tstate = waiting\n\t}\n}\n";
        assert_eq!(parse_launchctl_print(running), (true, Some(4242)));
        let waiting = "gui/501/dev.mlxd = {\n\tstate = not running\n\tlast exit code = 0\n}\n";
        assert_eq!(parse_launchctl_print(waiting), (false, None));
    }
}
