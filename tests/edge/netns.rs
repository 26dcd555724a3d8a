//! Test hosts in network namespaces the test creates: a router namespace
//! and one namespace per host, each joined to the router by a veth pair
//! (`10.77.{i}.2` on the host, `10.77.{i}.1` on the router). Every packet a
//! host sends enters the router and passes the user-space netem
//! (`tests/fault/netem.rs`, this kernel has no `sch_netem`) on a TUN
//! device before it is forwarded, so loss and latency apply per host
//! address; a partition is the host's link set down on the router.
//!
//! Nothing here touches the machine's own namespace beyond creating and
//! deleting these: no address, route or rule outside them. Namespaces
//! are named `dai-lab-{pid}-{n}-...`; those of a dead test process are
//! deleted at the next start.

use crate::support::*;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// Run `ip` with `args`; its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// The netem program, built once per test process.
fn netem_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_fault_tool("netem", "bin", "netem"))
}

/// Loss and delay for one host's packets (both directions).
#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    pub loss: f64,
    pub delay_ms: u64,
    pub jitter_ms: u64,
}

pub struct Lab {
    prefix: String,
    hosts: Vec<String>,
    netem: Option<Child>,
    control: PathBuf,
    netem_log: PathBuf,
}

/// Packets netem has passed at once, delayed and dropped so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub passed: u64,
    pub delayed: u64,
    pub dropped: u64,
}

impl Lab {
    /// Whether this machine lets the test make namespaces, veth pairs and
    /// TUN devices (root, iproute2, the kernel's support).
    pub fn probe() -> Result<(), String> {
        let a = format!("dai-probe-{}-a", std::process::id());
        let b = format!("dai-probe-{}-b", std::process::id());
        let r = (|| {
            ip(&["netns", "add", &a])?;
            ip(&["netns", "add", &b])?;
            ip(&[
                "link", "add", "p0", "netns", &a, "type", "veth", "peer", "name", "p1", "netns", &b,
            ])?;
            ip(&["-n", &a, "tuntap", "add", "dev", "t0", "mode", "tun"])
        })();
        let _ = ip(&["netns", "del", &a]);
        let _ = ip(&["netns", "del", &b]);
        r
    }

    /// A router and `hosts`, each on its own link, all through netem.
    pub fn new(dir: &Path, hosts: &[&str]) -> Lab {
        Self::remove_stale();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lab = Lab {
            prefix: format!("dai-lab-{}-{n}-", std::process::id()),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            netem: None,
            control: dir.join("netem.rules"),
            netem_log: dir.join("netem.log"),
        };
        let r = lab.router();
        must(&["netns", "add", &r]);
        must(&["-n", &r, "link", "set", "lo", "up"]);
        lab.sysctl(&r, "net.ipv4.ip_forward=1");
        lab.sysctl(&r, "net.ipv4.conf.all.rp_filter=0");
        lab.sysctl(&r, "net.ipv4.conf.default.rp_filter=0");
        must(&["-n", &r, "tuntap", "add", "dev", "tun0", "mode", "tun"]);
        must(&["-n", &r, "link", "set", "tun0", "up"]);
        lab.sysctl(&r, "net.ipv4.conf.tun0.rp_filter=0");
        // What netem writes back is routed normally; everything a host
        // sends goes to netem first.
        must(&[
            "-n", &r, "rule", "add", "pref", "50", "iif", "tun0", "lookup", "main",
        ]);
        must(&[
            "-n", &r, "route", "add", "default", "dev", "tun0", "table", "100",
        ]);
        for (i, h) in hosts.iter().enumerate() {
            let ns = lab.ns(h);
            let link = format!("r{}", i + 1);
            must(&["netns", "add", &ns]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&[
                "link", "add", &link, "netns", &r, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            must(&[
                "-n",
                &r,
                "addr",
                "add",
                &format!("10.77.{}.1/24", i + 1),
                "dev",
                &link,
            ]);
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.{}.2/24", i + 1),
                "dev",
                "eth0",
            ]);
            must(&["-n", &r, "link", "set", &link, "up"]);
            must(&["-n", &ns, "link", "set", "eth0", "up"]);
            must(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{}.1", i + 1),
            ]);
            must(&[
                "-n", &r, "rule", "add", "pref", "100", "iif", &link, "lookup", "100",
            ]);
        }
        let mut lab = lab;
        lab.impair(&[]);
        let netem = Command::new("ip")
            .args(["netns", "exec", &r])
            .arg(netem_bin())
            .args(["tun0"])
            .arg(&lab.control)
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&lab.netem_log)
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start netem");
        lab.netem = Some(netem);
        lab
    }

    fn router(&self) -> String {
        format!("{}router", self.prefix)
    }

    fn sysctl(&self, ns: &str, kv: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw", kv])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl {kv} in {ns}");
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h == host)
            .unwrap_or_else(|| panic!("no host {host} in the lab"))
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// The address of `host` on its link.
    pub fn addr(&self, host: &str) -> String {
        format!("10.77.{}.2", self.index(host) + 1)
    }

    /// `cmd` run inside `host`'s namespace (`ip netns exec` execs it, so
    /// the child's pid is the program's own and SIGKILL reaches it).
    pub fn exec(&self, host: &str, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host)])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// Cut (`up = false`) or restore `host`'s only link.
    pub fn link(&self, host: &str, up: bool) {
        let link = format!("r{}", self.index(host) + 1);
        must(&[
            "-n",
            &self.router(),
            "link",
            "set",
            &link,
            if up { "up" } else { "down" },
        ]);
    }

    /// Replace every impairment with `rules` (host, impairment); netem
    /// reads the file again within 100 ms.
    pub fn impair(&self, rules: &[(&str, Impairment)]) {
        let text: String = rules
            .iter()
            .map(|(h, i)| {
                format!(
                    "{} {} {} {}\n",
                    self.addr(h),
                    i.loss,
                    i.delay_ms,
                    i.jitter_ms
                )
            })
            .collect();
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, text).expect("netem rules");
        std::fs::rename(&tmp, &self.control).expect("netem rules");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    /// netem's counts as of its last rule change (each [`Lab::impair`]).
    pub fn counters(&self) -> Counters {
        let log = std::fs::read_to_string(&self.netem_log).unwrap_or_default();
        let Some(line) = log.lines().rev().find(|l| l.contains("so far")) else {
            return Counters::default();
        };
        let num = |word: &str| -> u64 {
            let words: Vec<&str> = line.split_whitespace().collect();
            words
                .windows(2)
                .find(|w| w[1].trim_end_matches(',') == word)
                .and_then(|w| w[0].parse().ok())
                .unwrap_or(0)
        };
        Counters {
            passed: num("passed"),
            delayed: num("delayed"),
            dropped: num("dropped"),
        }
    }

    /// Move the calling thread into `host`'s namespace: sockets it opens
    /// from now on are that host's (the test's own clients of a host's
    /// loopback HTTP API).
    pub fn enter(&self, host: &str) {
        unsafe extern "C" {
            fn setns(fd: i32, nstype: i32) -> i32;
        }
        const CLONE_NEWNET: i32 = 0x4000_0000;
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.ns(host)))
            .expect("open the namespace");
        let r = unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) };
        assert_eq!(r, 0, "setns into {host}");
    }

    /// Namespaces of lab processes that are gone (a killed test run).
    fn remove_stale() {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            let Some(rest) = name.strip_prefix("dai-lab-") else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        if let Some(mut n) = self.netem.take() {
            let _ = n.kill();
            let _ = n.wait();
        }
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(h)]);
        }
        let _ = ip(&["netns", "del", &self.router()]);
    }
}
