//! Percentiles, the figure lines, and what `/proc` says about processes.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// The `p`th percentile (nearest rank) of `sorted`, which must be sorted ascending.
/// `None` for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sorts samples ascending (NaN-free input assumed; NaNs sort last).
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Prints one figure line, `name: value unit`, on stdout at once.
pub fn figure(name: &str, value: impl std::fmt::Display, unit: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{name}: {value} {unit}");
    let _ = out.flush();
}

/// Prints a float figure with `decimals` digits after the point.
pub fn figure_f(name: &str, value: f64, decimals: usize, unit: &str) {
    figure(name, format!("{value:.decimals$}"), unit);
}

/// Prints the p50, p90, p99 and max of `samples` (milliseconds) as `<prefix>_p50` ...
pub fn latency_figures(prefix: &str, samples_ms: Vec<f64>, which: &[&str]) {
    let s = sorted(samples_ms);
    for w in which {
        let v = match *w {
            "p50" => percentile(&s, 50.0),
            "p90" => percentile(&s, 90.0),
            "p99" => percentile(&s, 99.0),
            "max" => s.last().copied(),
            _ => None,
        };
        match v {
            Some(v) => figure_f(&format!("{prefix}_{w}"), v, 3, "ms"),
            None => figure(&format!("{prefix}_{w}"), "n/a", "ms"),
        }
    }
}

/// A progress line on stderr (stdout carries only figures).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        eprintln!("sessionhub-bench: {}", format_args!($($arg)*));
    }};
}

/// Microseconds since the Unix epoch: the send timestamp put in published payloads
/// (comparable across processes on one machine).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as u64
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest
                .split_whitespace()
                .next()
                .context("empty VmRSS line")?
                .parse::<u64>()
                .with_context(|| format!("bad VmRSS line {line:?} in {path}"))?;
            return Ok(kib);
        }
    }
    bail!("no VmRSS line in {path} (is {pid} a live process?)")
}

/// CPU time used so far by all threads of process `pid`, in nanoseconds (sum of
/// the first field of `/proc/<pid>/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot read {dir}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may end between listing and reading.
        if let Ok(s) = std::fs::read_to_string(&path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// CPU use of named processes over a phase (diagnostics on stderr).
#[derive(Debug, Clone)]
pub struct CpuProbe {
    pids: Vec<(String, u32)>,
}

/// A [`CpuProbe`] reading.
#[derive(Debug, Clone)]
pub struct CpuMark {
    at: std::time::Instant,
    ns: Vec<u64>,
}

impl CpuProbe {
    /// Watches these processes.
    pub fn new(pids: Vec<(String, u32)>) -> Self {
        Self { pids }
    }

    /// Reads their CPU time now (0 for a process that cannot be read).
    pub fn mark(&self) -> CpuMark {
        CpuMark {
            at: std::time::Instant::now(),
            ns: self
                .pids
                .iter()
                .map(|(_, p)| cpu_ns(*p).unwrap_or(0))
                .collect(),
        }
    }

    /// Notes each process's CPU use since `since`, in cores (CPU seconds per second).
    pub fn note_since(&self, phase: &str, since: &CpuMark) {
        let now = self.mark();
        let wall = now.at.duration_since(since.at).as_secs_f64().max(1e-9);
        let parts: Vec<String> = self
            .pids
            .iter()
            .zip(now.ns.iter().zip(&since.ns))
            .map(|((name, _), (a, b))| {
                format!("{name} {:.2}", a.saturating_sub(*b) as f64 / 1e9 / wall)
            })
            .collect();
        crate::note!(
            "cpu during {phase} ({wall:.1} s), in cores: {}",
            parts.join(", ")
        );
    }
}

/// This process's soft limit of open files (`Max open files` in `/proc/self/limits`).
pub fn open_files_limit() -> Result<u64> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("cannot read /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no `Max open files` line in /proc/self/limits")?;
    let soft = line
        .split_whitespace()
        .nth(3)
        .context("short `Max open files` line")?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse()
        .with_context(|| format!("bad `Max open files` line {line:?}"))
}

/// A small deterministic generator (SplitMix64): random node and user choices
/// without another dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock, the process id and `salt`.
    pub fn new(salt: u64) -> Self {
        Self(now_us() ^ (u64::from(std::process::id()) << 32) ^ salt.wrapping_mul(0x9E37))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&s, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(3) < 3));
    }

    #[test]
    fn reads_own_rss_and_limit() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(open_files_limit().unwrap() > 0);
        assert!(cpu_ns(std::process::id()).unwrap() > 0);
    }
}
