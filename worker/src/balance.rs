//! How the workers share the work queues.
//!
//! Every worker consumes every work queue; each queue delivers to one of them at a time (single
//! active consumer), the one that subscribed first. Left alone, the first worker to start would
//! be the active consumer of every queue, and adding workers would add nothing. So each worker
//! counts the workers (the consumers of the workers' queue) and, when it is the active consumer
//! of more than its fair share of the queues, hands the extra ones on: it finishes what it holds
//! of them, cancels its consumer (the broker makes the next worker in line active) and subscribes
//! again, at the back of the line. Which queues it is active on it learns from their deliveries:
//! a queue that delivers nothing needs no worker.
//!
//! Nothing here is about correctness: whichever worker is active, it is the only one. This only
//! spreads the work.

/// The queues to hand on, given how many there are, how many workers share them, and the
/// queues this worker is active on with the deliveries it holds of each. The least busy go
/// first: they are the quickest to finish.
pub fn to_hand_on(queues: usize, workers: usize, active: &[(usize, usize)]) -> Vec<usize> {
    let fair = queues.div_ceil(workers.max(1));
    if active.len() <= fair {
        return Vec::new();
    }
    let mut by_load = active.to_vec();
    by_load.sort_by_key(|&(queue, held)| (held, queue));
    by_load
        .into_iter()
        .take(active.len() - fair)
        .map(|(queue, _)| queue)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(queues: usize) -> Vec<(usize, usize)> {
        (0..queues).map(|q| (q, 0)).collect()
    }

    #[test]
    fn a_worker_alone_keeps_every_queue() {
        assert!(to_hand_on(16, 1, &all(16)).is_empty());
    }

    #[test]
    fn a_worker_with_more_than_its_share_hands_on_the_rest_least_busy_first() {
        let mut active = all(16);
        active[3].1 = 50;
        let handed = to_hand_on(16, 2, &active);
        assert_eq!(handed.len(), 8);
        assert!(!handed.contains(&3), "the busiest queue is kept");
        assert_eq!(to_hand_on(16, 3, &all(16)).len(), 16 - 6);
        assert_eq!(to_hand_on(16, 3, &all(6)), Vec::<usize>::new());
    }

    #[test]
    fn more_workers_than_queues_leave_each_at_most_one() {
        assert_eq!(to_hand_on(16, 40, &all(3)).len(), 2);
        assert!(to_hand_on(16, 40, &all(1)).is_empty());
        assert!(
            to_hand_on(16, 0, &all(16)).is_empty(),
            "no count read yet: keep all"
        );
    }
}
