//! Which of a process's threads yield when the cores are short. Linux keeps a nice value
//! per thread, so a thread can step back without slowing the rest of its process.

/// Lowers the calling thread's CPU priority by `by` (a nice increment); `what` names the
/// thread in the warning when the system refuses.
pub fn lower_this_threads_priority(by: i32, what: &str) {
    if let Err(error) = rustix::process::nice(by) {
        tracing::warn!(%error, what, "could not lower a thread's CPU priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_calling_thread_steps_back() {
        let before = rustix::process::getpriority_process(None).expect("priority");
        let lowered = std::thread::spawn(|| {
            lower_this_threads_priority(3, "test");
            // `getpriority(PRIO_PROCESS, 0)` reads the calling thread on Linux.
            rustix::process::getpriority_process(None).expect("priority")
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before + 3).min(19));
        assert_eq!(
            rustix::process::getpriority_process(None).expect("priority"),
            before,
            "the rest of the process keeps its priority"
        );
    }
}
