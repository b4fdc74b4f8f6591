//! Where the daemon and its workers log, and `mlxd logs`.
//!
//! - The daemon (`mlxd serve`) logs with `tracing` to `$MLXD_HOME/logs/mlxd.<date>.log`,
//!   a new file each day (UTC), the last [`DAEMON_LOG_DAYS`] kept; and to stderr as
//!   before (tests and harnesses read it), unless `MLXD_LOG_STDERR=0` (the service
//!   files set it: launchd and journald would otherwise get every line twice).
//!   `MLXD_LOG` sets the level (`info` by default) for both.
//! - Each worker's stderr goes to `$MLXD_HOME/logs/worker-<model>.log` (appended;
//!   renamed to `.log.1` once it passes [`WORKER_LOG_CAP`], so a model keeps at
//!   most twice that).
//! - Request content (prompts, outputs) is never logged: no log call formats a
//!   request body, and the worker logs only its own events.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The daemon's log files are `<DAEMON_LOG_PREFIX>.<YYYY-MM-DD>.<LOG_SUFFIX>`.
const DAEMON_LOG_PREFIX: &str = "mlxd";
const LOG_SUFFIX: &str = "log";
/// Daily daemon log files kept (older ones are deleted as new ones begin).
pub const DAEMON_LOG_DAYS: usize = 7;
/// A worker log larger than this is moved aside to `.log.1` (replacing the last
/// one) before more is written.
pub const WORKER_LOG_CAP: u64 = 10 << 20;

/// `$MLXD_HOME/logs`.
pub fn logs_dir(home: &Path) -> PathBuf {
    home.join("logs")
}

/// The file a model's workers write their stderr to.
pub fn worker_log_path(home: &Path, model: &str) -> PathBuf {
    logs_dir(home).join(format!("worker-{model}.{LOG_SUFFIX}"))
}

/// The newest daemon log file in `dir` (today's, or the last day the daemon ran).
pub fn current_daemon_log(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let date = name
                .strip_prefix(DAEMON_LOG_PREFIX)?
                .strip_prefix('.')?
                .strip_suffix(LOG_SUFFIX)?
                .strip_suffix('.')?;
            // YYYY-MM-DD sorts as text: the newest day is the largest name.
            is_date(date).then(|| (name.clone(), e.path()))
        })
        .max()
        .map(|(_, path)| path)
}

fn is_date(s: &str) -> bool {
    s.len() == 10
        && s.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        })
}

/// Installs the process's `tracing` subscriber. For the daemon (`log_dir` given),
/// lines also go to the daily files there; the returned guard flushes them when
/// dropped, so the caller keeps it until the process ends. A directory that
/// cannot be written only costs the files (a warning says so).
pub fn init(log_dir: Option<&Path>) -> Option<WorkerGuard> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("MLXD_LOG").unwrap_or_else(|_| "info".into())
    };
    let to_stderr = std::env::var_os("MLXD_LOG_STDERR").is_none_or(|v| v != "0");
    let stderr = to_stderr.then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    let mut failed = None;
    let (file, guard) = match log_dir.map(daily_appender) {
        Some(Ok(appender)) => {
            let (writer, guard) = tracing_appender::non_blocking(appender);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_filter(filter());
            (Some(layer), Some(guard))
        }
        Some(Err(e)) => {
            failed = Some(e);
            (None, None)
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
    if let (Some(e), Some(dir)) = (failed, log_dir) {
        tracing::warn!("not logging to {}: {e}", dir.display());
    }
    guard
}

/// Why the daemon's log files cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("cannot create the directory: {0}")]
    Dir(#[from] std::io::Error),
    #[error(transparent)]
    Appender(#[from] tracing_appender::rolling::InitError),
}

fn daily_appender(
    dir: &Path,
) -> Result<tracing_appender::rolling::RollingFileAppender, LogFileError> {
    // Made first: the appender prunes old files as it starts, and complains on
    // stderr when the directory is missing.
    private_dir(dir)?;
    Ok(tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix(DAEMON_LOG_PREFIX)
        .filename_suffix(LOG_SUFFIX)
        .max_log_files(DAEMON_LOG_DAYS)
        .build(dir)?)
}

/// A model's worker log, opened for appending; it moves itself aside when it
/// grows past its cap.
pub struct WorkerLog {
    path: PathBuf,
    file: std::fs::File,
    /// Bytes in the file (its size at open plus what was written since).
    len: u64,
    cap: u64,
}

impl WorkerLog {
    /// Opens (creating the directory and file) `worker-<model>.log` under `home`.
    pub fn open(home: &Path, model: &str) -> std::io::Result<WorkerLog> {
        Self::open_capped(worker_log_path(home, model), WORKER_LOG_CAP)
    }

    fn open_capped(path: PathBuf, cap: u64) -> std::io::Result<WorkerLog> {
        if let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= cap) {
            std::fs::rename(&path, aside(&path))?;
        }
        let file = append(&path)?;
        let len = file.metadata()?.len();
        Ok(WorkerLog {
            path,
            file,
            len,
            cap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. (A plain write of a short line to a local file: the page
    /// cache takes it at once, so the async stderr reader calls it directly.)
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.len >= self.cap {
            std::fs::rename(&self.path, aside(&self.path))?;
            self.file = append(&self.path)?;
            self.len = 0;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

fn aside(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

fn append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The logs directory, readable by its owner only: worker tracebacks and error
/// messages can quote what a request sent.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The last `n` lines of `path` (reading backwards from its end, so a large file
/// costs only what is shown).
pub fn tail(path: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    tail_before(&mut file, len, n)
}

/// The last `n` lines of `file` before offset `end`.
fn tail_before(file: &mut std::fs::File, end: u64, n: usize) -> std::io::Result<Vec<String>> {
    const CHUNK: u64 = 64 << 10;
    let mut start = end;
    let mut buf: Vec<u8> = Vec::new();
    // Read chunks from the end until the buffer holds n full lines (n + 1 newlines
    // counting the one that ends the line before them), or the whole file.
    while start > 0 && buf.iter().filter(|&&b| b == b'\n').count() <= n {
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        start = from;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // possibly cut in the middle
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| l.to_string()).collect())
}

/// What `mlxd logs` shows: the daemon's log, or one model's worker log.
pub enum LogSource {
    Daemon { dir: PathBuf },
    Worker { path: PathBuf },
}

impl LogSource {
    /// The file to read now: for the daemon the newest day's file (a new one
    /// begins at midnight UTC).
    fn current(&self) -> Option<PathBuf> {
        match self {
            LogSource::Daemon { dir } => current_daemon_log(dir),
            LogSource::Worker { path } => path.exists().then(|| path.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            LogSource::Daemon { dir } => format!(
                "no daemon log in {} yet (`mlxd serve` writes one)",
                dir.display()
            ),
            LogSource::Worker { path } => format!(
                "no worker log {} yet (the model's worker writes it when it starts)",
                path.display()
            ),
        }
    }
}

/// How often `mlxd logs -f` looks for more.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// `mlxd logs`: prints the last `lines` lines; with `follow`, keeps printing what
/// is appended, across rotation (a new day's file, a worker log moved aside or
/// truncated), until interrupted.
pub async fn print(source: LogSource, lines: usize, follow: bool) -> anyhow::Result<()> {
    // One opening gives both the tail and where following begins: a line written
    // in between is printed once.
    let mut opened = match source.current() {
        Some(path) => Some(Followed::open(path, true)?),
        None if !follow => anyhow::bail!("{}", source.describe()),
        None => {
            eprintln!("{}; waiting", source.describe());
            None
        }
    };
    if let Some(f) = &mut opened {
        let mut out = std::io::stdout().lock();
        for line in tail_before(&mut f.file, f.pos, lines)? {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    if !follow {
        return Ok(());
    }
    let mut follower = Follower { open: opened };
    loop {
        let chunk = follower.poll(source.current())?;
        if !chunk.is_empty() {
            let mut out = std::io::stdout().lock();
            out.write_all(&chunk)?;
            out.flush()?;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// Reads what is appended to a log file, switching files when the log rotates.
struct Follower {
    /// The file being followed, its identity and how far it has been read.
    open: Option<Followed>,
}

struct Followed {
    path: PathBuf,
    file: std::fs::File,
    id: FileId,
    pos: u64,
}

/// (device, inode): tells a file renamed aside from the new one at its path.
type FileId = (u64, u64);

fn file_id(meta: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

impl Follower {
    /// New bytes since the last poll. `current` is the file the log is written to
    /// now: when it is another file (or the same path with a new inode), the rest
    /// of the old one is read first, then the new one from its start.
    fn poll(&mut self, current: Option<PathBuf>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let switched = match (&self.open, &current) {
            (None, Some(_)) => true,
            (Some(f), Some(path)) => {
                f.path != *path || std::fs::metadata(path).is_ok_and(|m| file_id(&m) != f.id)
            }
            (_, None) => false,
        };
        if let Some(f) = &mut self.open {
            f.read_new(&mut out)?;
        }
        if switched {
            if let Some(path) = current {
                if let Ok(mut f) = Followed::open(path, false) {
                    f.read_new(&mut out)?;
                    self.open = Some(f);
                }
            }
        }
        Ok(out)
    }
}

impl Followed {
    fn open(path: PathBuf, at_end: bool) -> std::io::Result<Followed> {
        let file = std::fs::File::open(&path)?;
        let meta = file.metadata()?;
        Ok(Followed {
            path,
            id: file_id(&meta),
            pos: if at_end { meta.len() } else { 0 },
            file,
        })
    }

    /// Appends to `out` what was written since the last read. A file now shorter
    /// than what was read was truncated: it is read again from its start.
    fn read_new(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let len = self.file.metadata()?.len();
        if len < self.pos {
            self.pos = 0;
        }
        self.file.seek(SeekFrom::Start(self.pos))?;
        let mut reader = std::io::BufReader::new(&self.file);
        // Whole lines only: a line being written is shown once it is complete.
        loop {
            let mut line = Vec::new();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            self.pos += n as u64;
            out.extend_from_slice(&line);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        crate::test_support::scratch_dir(&format!("logs-{name}"))
    }

    #[test]
    fn paths_under_home() {
        let home = Path::new("/h/.mlxd");
        assert_eq!(logs_dir(home), Path::new("/h/.mlxd/logs"));
        assert_eq!(
            worker_log_path(home, "smollm2-135m"),
            Path::new("/h/.mlxd/logs/worker-smollm2-135m.log")
        );
    }

    #[test]
    fn the_newest_daily_file_is_the_current_daemon_log() {
        let dir = scratch("current");
        assert_eq!(current_daemon_log(&dir), None);
        for name in [
            "mlxd.2026-11-30.log",
            "mlxd.2026-12-02.log",
            "mlxd.2026-12-01.log",
            // Not daemon logs: a worker's, a stray, a bad date.
            "worker-replay.log",
            "mlxd.log",
            "mlxd.2026-12-9.log",
            "daemon-stderr.log",
        ] {
            std::fs::write(dir.join(name), "x\n").unwrap();
        }
        assert_eq!(
            current_daemon_log(&dir),
            Some(dir.join("mlxd.2026-12-02.log"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_appender_names_files_as_current_daemon_log_reads_them() {
        let dir = scratch("appender");
        let mut appender = daily_appender(&dir).unwrap();
        appender.write_all(b"hello\n").unwrap();
        appender.flush().unwrap();
        let path = current_daemon_log(&dir).expect("the appender's file is found");
        assert_eq!(std::fs::read_to_string(path).unwrap(), "hello\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = scratch("tail");
        let path = dir.join("a.log");
        std::fs::write(&path, "").unwrap();
        assert!(tail(&path, 5).unwrap().is_empty());
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(tail(&path, 2).unwrap(), ["two", "three"]);
        assert_eq!(tail(&path, 10).unwrap(), ["one", "two", "three"]);
        assert!(tail(&path, 0).unwrap().is_empty());
        // No final newline; lines longer than a chunk; more than a chunk in all.
        let long = "y".repeat(100_000);
        let text: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, format!("{long}\n{text}{long}\nlast")).unwrap();
        assert_eq!(tail(&path, 1).unwrap(), ["last"]);
        let three = tail(&path, 3).unwrap();
        assert_eq!(three, ["line 1999", long.as_str(), "last"]);
        assert_eq!(tail(&path, 5000).unwrap().len(), 2003);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_worker_log_moves_aside_past_its_cap() {
        let dir = scratch("cap");
        let path = dir.join("logs/worker-m.log");
        let mut log = WorkerLog::open_capped(path.clone(), 10).unwrap();
        log.write_line("12345").unwrap();
        log.write_line("6789").unwrap(); // 11 bytes: over the cap
        log.write_line("next").unwrap();
        assert_eq!(
            std::fs::read_to_string(aside(&path)).unwrap(),
            "12345\n6789\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "next\n");
        // Reopened (the next worker): appends below the cap, moves aside above it.
        drop(log);
        let mut log = WorkerLog::open_capped(path.clone(), 10).unwrap();
        log.write_line("more").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "next\nmore\n");
        drop(log);
        let log = WorkerLog::open_capped(path.clone(), 5).unwrap();
        assert_eq!(log.path(), path);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert_eq!(
            std::fs::read_to_string(aside(&path)).unwrap(),
            "next\nmore\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn following_reads_appends_and_survives_rotation() {
        let dir = scratch("follow");
        let day1 = dir.join("mlxd.2026-12-01.log");
        std::fs::write(&day1, "old\n").unwrap();
        let mut f = Follower {
            open: Some(Followed::open(day1.clone(), true).unwrap()),
        };
        assert!(
            f.poll(Some(day1.clone())).unwrap().is_empty(),
            "starts at the end"
        );
        let mut w = append(&day1).unwrap();
        w.write_all(b"a\npart").unwrap();
        assert_eq!(
            f.poll(Some(day1.clone())).unwrap(),
            b"a\n",
            "whole lines only"
        );
        w.write_all(b"ial\n").unwrap();
        assert_eq!(f.poll(Some(day1.clone())).unwrap(), b"partial\n");
        // A new day: the rest of the old file, then the new one from its start.
        w.write_all(b"last of day 1\n").unwrap();
        let day2 = dir.join("mlxd.2026-12-02.log");
        std::fs::write(&day2, "first of day 2\n").unwrap();
        assert_eq!(
            f.poll(current_daemon_log(&dir)).unwrap(),
            b"last of day 1\nfirst of day 2\n"
        );
        // Moved aside and recreated under the same path (a worker log past its cap).
        std::fs::rename(&day2, aside(&day2)).unwrap();
        std::fs::write(&day2, "fresh\n").unwrap();
        assert_eq!(f.poll(Some(day2.clone())).unwrap(), b"fresh\n");
        // Truncated in place: read again from the start.
        std::fs::write(&day2, "x\n").unwrap();
        assert_eq!(f.poll(Some(day2.clone())).unwrap(), b"x\n");
        // A log that did not exist yet.
        let mut f = Follower { open: None };
        assert!(f.poll(None).unwrap().is_empty());
        assert_eq!(f.poll(Some(day2)).unwrap(), b"x\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
