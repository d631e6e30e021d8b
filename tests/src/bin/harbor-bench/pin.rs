//! `--pin`: the broker on core 0, everything else on core 1, as on a deployment where the broker
//! has a machine of its own and does not take the ingest's CPU (nor the ingest the broker's).
//! The broker's threads get their own affinity back when the [`Pinned`] is dropped: at the end,
//! on a panic, or when the bench is interrupted (main drops the measurement on SIGINT/SIGTERM).

use std::process::Command;

/// The broker's threads and the affinity masks they had.
pub struct Pinned {
    saved: Vec<(String, String)>,
}

/// The affinity mask of thread `tid`, in hex as `taskset -p` prints it.
fn mask(tid: &str) -> Option<String> {
    let out = Command::new("taskset").args(["-p", tid]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.rsplit_once(':')?.1.trim().to_owned()).filter(|m| !m.is_empty())
}

fn taskset(args: &[&str]) -> bool {
    Command::new("taskset")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Pinned {
    /// Pins every thread of the broker (`beam.smp`) to core 0 and this process (so the processes
    /// it starts afterwards) to core 1.
    pub fn broker_apart() -> Result<Self, String> {
        if std::thread::available_parallelism().map_or(0, usize::from) < 2 {
            return Err("--pin needs two cores".to_owned());
        }
        let mut pinned = Self { saved: Vec::new() };
        for pid in crate::cpu::broker_pids() {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| format!("cannot list the broker's threads: {e}"))?;
            for task in tasks.flatten() {
                let tid = task.file_name().to_string_lossy().into_owned();
                let Some(mask) = mask(&tid) else { continue };
                if !taskset(&["-p", "-c", "0", &tid]) {
                    return Err(format!("taskset could not pin broker thread {tid} (root?)"));
                }
                pinned.saved.push((tid, mask));
            }
        }
        if pinned.saved.is_empty() {
            return Err("no broker process (beam.smp) found to pin".to_owned());
        }
        let me = std::process::id().to_string();
        if !taskset(&["-a", "-p", "-c", "1", &me]) {
            return Err("taskset could not pin the bench to core 1".to_owned());
        }
        println!(
            "pinned: {} broker threads on core 0; the bench and what it starts on core 1",
            pinned.saved.len()
        );
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let restored = self
            .saved
            .iter()
            .filter(|(tid, mask)| taskset(&["-p", mask, tid]))
            .count();
        println!(
            "unpinned: {restored} of {} broker threads have their affinity back",
            self.saved.len()
        );
    }
}
