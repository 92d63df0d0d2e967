//! The job state graph, written down once and checked on every transition.
//!
//! ```text
//!   Pending --acquire--> Running --complete ok--> Completed
//!      ^                  |  |  \--fail, attempts left--> Failed --backoff due--> Pending
//!      |                  |  \--fail/expire, none left--> Dead
//!      +--expire/release--+
//!   Pending | Failed --cancel--> Dead
//! ```
//! Completed and Dead are terminal: nothing leaves them.

use crate::JobStatus::{self, *};

/// Is `from -> to` a legal move?
pub fn is_legal(from: JobStatus, to: JobStatus) -> bool {
    matches!(
        (from, to),
        (Pending, Running)
            | (Pending, Dead)
            | (Running, Completed)
            | (Running, Failed)
            | (Running, Pending)
            | (Running, Dead)
            | (Failed, Pending)
            | (Failed, Dead)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_exits() {
        for to in JobStatus::ALL {
            assert!(!is_legal(Completed, to));
            assert!(!is_legal(Dead, to));
        }
    }

    #[test]
    fn only_running_completes() {
        for from in JobStatus::ALL {
            assert_eq!(is_legal(from, Completed), from == Running);
        }
    }
}
