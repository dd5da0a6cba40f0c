//! What the load generator knows about processes, read from Linux `/proc`.
//!
//! The figures a load run is for — resident memory per waiting customer, CPU time per
//! delivered message — are properties of the *server* processes, so they are read from
//! the kernel's accounting of those PIDs, not estimated from the client side:
//!
//! - resident memory: `VmRSS` in `/proc/PID/status` (kB, what an operator's `ps`/`top`
//!   shows);
//! - CPU time: `utime + stime` (fields 14 and 15) of `/proc/PID/stat`, in clock ticks,
//!   which for a process already include every one of its threads. Ticks are converted
//!   with `sysconf(_SC_CLK_TCK)` (100 on every Linux we run on; 100 is also the fallback);
//! - the whole machine's busy time from the first line of `/proc/stat`, and every other
//!   process's CPU, so that a run can show what else competed for the cores.
//!
//! The parsers are pure functions over the file text so they can be unit-tested.

use std::collections::{BTreeMap, HashMap};
use std::fs;

use anyhow::{anyhow, Context, Result};

/// Clock ticks per second for `/proc/PID/stat` times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// `VmRSS` in bytes from the text of `/proc/PID/status`.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let kb: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(kb * 1024),
        Some(_) => None,
    }
}

/// The fields of `/proc/PID/stat` the load generator uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Field 2 without its parentheses (it may itself contain spaces and parentheses).
    pub comm: String,
    /// Field 14, clock ticks in user mode.
    pub utime: u64,
    /// Field 15, clock ticks in kernel mode.
    pub stime: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may contain spaces and `)`, so the
/// fields are counted from the *last* `)`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = stat[open + 1..close].to_string();
    // after ") " comes field 3 (state); utime is field 14 → index 11, stime index 12
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let utime = rest.nth(11)?.parse().ok()?;
    let stime = rest.next()?.parse().ok()?;
    Some(Stat { comm, utime, stime })
}

/// Busy and total CPU-seconds of the whole machine from the text of `/proc/stat`
/// (busy = everything but idle and iowait; guest time is already inside user).
pub fn parse_machine(stat: &str, tck: f64) -> Option<(f64, f64)> {
    let line = stat.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some(((total - idle) as f64 / tck, total as f64 / tck))
}

/// A counter of the `TcpExt` block of `/proc/net/netstat` (a header line of names, then
/// a line of values).
pub fn parse_tcpext(netstat: &str, key: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names.zip(values).find(|(n, _)| *n == key)?.1.parse().ok()
}

/// Connections the kernel dropped because a listen queue was full (machine-wide, since
/// boot). A burst of these during a run shows up as 1-second steps (SYN retransmits) in
/// connect times: the figure that explains a slow admission phase.
pub fn listen_overflows() -> Option<u64> {
    parse_tcpext(
        &fs::read_to_string("/proc/net/netstat").ok()?,
        "ListenOverflows",
    )
}

/// Resident memory of one process in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let txt = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vmrss(&txt).ok_or_else(|| anyhow!("no VmRSS in {path} (a kernel thread or a zombie?)"))
}

/// CPU-seconds (user + system, all threads) of one process.
pub fn cpu_seconds(pid: u32, tck: f64) -> Result<f64> {
    stat_of(pid).map(|s| (s.utime + s.stime) as f64 / tck)
}

fn stat_of(pid: u32) -> Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let txt = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&txt).ok_or_else(|| anyhow!("cannot parse {path}"))
}

/// Whether `/proc/PID` exists.
pub fn alive(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/stat")).is_ok()
}

/// RSS and CPU of a set of processes at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Sum of VmRSS in bytes.
    pub rss: u64,
    /// Sum of CPU-seconds.
    pub cpu: f64,
    /// Per PID: (rss bytes, cpu seconds).
    pub per: BTreeMap<u32, (u64, f64)>,
}

/// Reads every PID; a PID that is gone is an error (the server died during the run).
pub fn snapshot(pids: &[u32], tck: f64) -> Result<Snapshot> {
    let mut s = Snapshot::default();
    for &pid in pids {
        let rss = rss_bytes(pid)?;
        let cpu = cpu_seconds(pid, tck)?;
        s.rss += rss;
        s.cpu += cpu;
        s.per.insert(pid, (rss, cpu));
    }
    Ok(s)
}

/// CPU-seconds of a set of processes that may come and go (database backends): PIDs that
/// are gone are skipped.
pub fn cpu_of_existing(pids: &[u32], tck: f64) -> BTreeMap<u32, f64> {
    pids.iter()
        .filter_map(|&pid| cpu_seconds(pid, tck).ok().map(|c| (pid, c)))
        .collect()
}

/// Every process now: pid → (comm, CPU-seconds). Processes that vanish while the
/// directory is read are skipped.
pub fn all_procs(tck: f64) -> HashMap<u32, (String, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(st) = stat_of(pid) {
            out.insert(pid, (st.comm, (st.utime + st.stime) as f64 / tck));
        }
    }
    out
}

/// PIDs whose command name starts with `prefix` (e.g. `postgres`: the postmaster and its
/// backends keep `comm` = `postgres` whatever their process title says).
pub fn pids_with_comm_prefix(prefix: &str, tck: f64) -> Vec<u32> {
    let mut v: Vec<u32> = all_procs(tck)
        .into_iter()
        .filter(|(_, (comm, _))| comm.starts_with(prefix))
        .map(|(pid, _)| pid)
        .collect();
    v.sort_unstable();
    v
}

/// Busy and total CPU-seconds of the machine.
pub fn machine_cpu(tck: f64) -> Option<(f64, f64)> {
    parse_machine(&fs::read_to_string("/proc/stat").ok()?, tck)
}

/// CPU used between two `all_procs` snapshots by processes not in `exclude` that were alive
/// at both ends with the same name: (total CPU-s, top 3 as (pid, comm, cpu_s)).
pub fn others_cpu(
    a: &HashMap<u32, (String, f64)>,
    b: &HashMap<u32, (String, f64)>,
    exclude: &[u32],
) -> (f64, Vec<(u32, String, f64)>) {
    let mut total = 0.0;
    let mut top = Vec::new();
    for (pid, (comm, end)) in b {
        if exclude.contains(pid) {
            continue;
        }
        let Some((comm0, start)) = a.get(pid) else {
            continue;
        };
        if comm0 != comm {
            continue;
        }
        let d = end - start;
        if d > 0.0 {
            total += d;
            top.push((*pid, comm.clone(), d));
        }
    }
    top.sort_by(|x, y| y.2.total_cmp(&x.2));
    top.truncate(3);
    (total, top)
}

/// This process's own CPU-seconds (user + system) from `getrusage`, microsecond precision.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value, and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// This process's own resident memory.
pub fn self_rss() -> Option<u64> {
    parse_vmrss(&fs::read_to_string("/proc/self/status").ok()?)
}

/// Raises the soft open-file limit to the hard limit (one descriptor per connection).
/// Returns the new soft limit.
pub fn raise_nofile() -> Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid pointer; raising soft up to hard is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// 1-, 5- and 15-minute load averages.
pub fn loadavg() -> Option<[f64; 3]> {
    let txt = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = txt.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Total memory of the machine in bytes (`MemTotal` of `/proc/meminfo`).
pub fn mem_total() -> Option<u64> {
    let txt = fs::read_to_string("/proc/meminfo").ok()?;
    let line = txt.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_from_status() {
        let s = "Name:\tduet\nState:\tS (sleeping)\nVmPeak:\t  123456 kB\nVmRSS:\t   20480 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vmrss(s), Some(20480 * 1024));
        assert_eq!(parse_vmrss("Name:\tkthreadd\nState:\tS\n"), None);
        assert_eq!(parse_vmrss("VmRSS:\tabc kB\n"), None);
    }

    #[test]
    fn stat_with_plain_comm() {
        let s = "4242 (duet) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 9 0 100 200000 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(s).expect("valid line");
        assert_eq!(
            st,
            Stat {
                comm: "duet".into(),
                utime: 250,
                stime: 75
            }
        );
    }

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        // a comm like "(a) b)" must not shift the fields
        let s = "7 ((a) b)) R 1 7 7 0 -1 0 0 0 0 0 11 22 0 0 20 0 1 0 5 0 0";
        let st = parse_stat(s).expect("valid line");
        assert_eq!(st.comm, "(a) b)");
        assert_eq!((st.utime, st.stime), (11, 22));
        assert_eq!(parse_stat("7 (x) R 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn tcpext_counter() {
        let s = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 141 142\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_tcpext(s, "ListenOverflows"), Some(141));
        assert_eq!(parse_tcpext(s, "ListenDrops"), Some(142));
        assert_eq!(parse_tcpext(s, "Nope"), None);
        assert_eq!(parse_tcpext("IpExt: a\nIpExt: 1\n", "a"), None);
    }

    #[test]
    fn machine_line() {
        let s = "cpu  100 5 50 800 45 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        let (busy, total) = parse_machine(s, 100.0).expect("valid");
        assert!((busy - 1.55).abs() < 1e-9);
        assert!((total - 10.0).abs() < 1e-9);
        assert_eq!(parse_machine("intr 1 2 3", 100.0), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(alive(pid));
        assert!(rss_bytes(pid).expect("own status") > 0);
        let tck = clk_tck();
        assert!(tck > 0.0);
        let snap = snapshot(&[pid], tck).expect("own stat");
        assert!(snap.rss > 0 && snap.cpu >= 0.0);
        assert!(self_cpu_seconds() >= 0.0);
    }

    #[test]
    fn others_excludes_and_ranks() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for (pid, comm, c0, c1) in [
            (1, "x", 1.0, 1.5),
            (2, "y", 0.0, 3.0),
            (3, "z", 0.0, 9.0),
            (4, "w", 0.0, 0.0),
        ] {
            a.insert(pid, (comm.to_string(), c0));
            b.insert(pid, (comm.to_string(), c1));
        }
        b.insert(5, ("new".to_string(), 100.0)); // not alive at the start: not seen
        let (total, top) = others_cpu(&a, &b, &[3]);
        assert!((total - 3.5).abs() < 1e-9);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
