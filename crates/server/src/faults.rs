//! Pause points for crash tests: with `CLEANROOM_CRASH_TEST_PAUSE_AT=<point>` in its
//! environment, the service stops at that point of a destruction (announcing it on standard
//! error) and waits there forever, so a test can kill it with SIGKILL exactly between two steps
//! and check that the next start finishes the work. Without the variable a point costs one
//! environment lookup, on a path that runs a few times a day at most.

/// The environment variable naming the point to pause at.
pub const PAUSE_AT: &str = "CLEANROOM_CRASH_TEST_PAUSE_AT";

/// Pauses forever here if the environment names `point`.
pub(crate) fn pause_point(point: &str) {
    if std::env::var_os(PAUSE_AT).is_some_and(|wanted| wanted == point) {
        eprintln!("cleanroom paused at {point} ({PAUSE_AT})");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
