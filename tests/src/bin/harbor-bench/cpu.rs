//! Where the two cores go: CPU time of the broker, the programs under test and the generator,
//! read from `/proc`.

use std::time::{Duration, Instant};

/// CPU time (user + system) of processes, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// Busy CPU time of the whole machine, all cores (user, nice, system, irq, softirq, steal), in
/// seconds: with the processes' own, it shows whether they used the machine up.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        // 3 is idle, 4 iowait; 8 and 9 (guest time) are already counted in user and nice.
        .filter(|(field, _)| matches!(field, 0..=2 | 5..=7))
        .filter_map(|(_, ticks)| ticks.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// The local broker's processes (the Erlang VM).
pub fn broker_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
        .collect()
}

/// Cores used, on average, by the broker, the named processes and this program (under the
/// name of its part in the measurement), over the stretches of time passed to
/// [`measure`](Self::measure), and by the whole machine.
pub struct Cores {
    processes: Vec<(String, Vec<u32>)>,
    used: Vec<f64>,
    machine: f64,
    elapsed: f64,
}

impl Cores {
    pub fn new(this: &str, others: &[(&str, u32)]) -> Self {
        Self::counting(vec![("broker".to_owned(), broker_pids())], this, others)
    }

    /// Like [`new`](Self::new), without the broker.
    pub fn without_broker(this: &str, others: &[(&str, u32)]) -> Self {
        Self::counting(Vec::new(), this, others)
    }

    fn counting(
        mut processes: Vec<(String, Vec<u32>)>,
        this: &str,
        others: &[(&str, u32)],
    ) -> Self {
        processes.extend(
            others
                .iter()
                .map(|(name, pid)| ((*name).to_owned(), vec![*pid])),
        );
        processes.push((this.to_owned(), vec![std::process::id()]));
        let used = vec![0.0; processes.len()];
        Self {
            processes,
            used,
            machine: 0.0,
            elapsed: 0.0,
        }
    }

    /// Runs `work`, counting the CPU time used meanwhile.
    pub async fn measure<T>(&mut self, work: impl Future<Output = T>) -> T {
        let before: Vec<f64> = self.processes.iter().map(|(_, p)| cpu_seconds(p)).collect();
        let machine_before = machine_cpu_seconds();
        let started = Instant::now();
        let output = work.await;
        self.elapsed += started.elapsed().as_secs_f64();
        self.machine += machine_cpu_seconds() - machine_before;
        for ((_, pids), (used, before)) in
            self.processes.iter().zip(self.used.iter_mut().zip(before))
        {
            *used += cpu_seconds(pids) - before;
        }
        output
    }

    /// Seconds measured.
    pub fn seconds(&self) -> f64 {
        self.elapsed
    }

    /// CPU time each used per message, when `messages` went through in the measured time.
    pub fn per_message(&self, messages: u64) -> String {
        self.each(|used| format!("{:.0} µs", used * 1e6 / messages.max(1) as f64))
    }

    /// CPU time all the counted processes used together per message, in µs.
    pub fn total_per_message(&self, messages: u64) -> f64 {
        self.used.iter().sum::<f64>() * 1e6 / messages.max(1) as f64
    }

    /// `name figure` for each process, `figure` made from the CPU seconds it used.
    fn each(&self, figure: impl Fn(f64) -> String) -> String {
        let parts: Vec<String> = self
            .processes
            .iter()
            .zip(&self.used)
            .map(|((name, _), used)| format!("{name} {}", figure(*used)))
            .collect();
        parts.join(", ")
    }
}

impl std::fmt::Display for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let elapsed = self.elapsed.max(f64::EPSILON);
        let cores = self.each(|used| format!("{:.2}", used / elapsed));
        let all = std::thread::available_parallelism().map_or(0, usize::from);
        write!(f, "{cores}; machine {:.2} of {all}", self.machine / elapsed)
    }
}

/// Waits until the broker has used under 5 % of a core for two seconds running (at most a
/// minute): after a burst it keeps writing segments and taking snapshots for a while, and a
/// measurement started meanwhile would measure that.
pub async fn broker_quiet() {
    let pids = broker_pids();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        let before = cpu_seconds(&pids);
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_seconds(&pids) - before > 0.025 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(2) {
            return;
        }
    }
}
