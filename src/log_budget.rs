//! A bound on repeated log lines: a flood of failing records (one
//! aggregate can carry thousands of user records) must not bury the log.
//! Up to `LINES` lines per `WINDOW` are logged one by one; the rest are
//! counted and summed up in one line when the next window begins.

use std::time::{Duration, Instant};

const LINES: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LogBudget {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }
}

impl LogBudget {
    /// Whether this line may be logged now. When a new window begins after
    /// lines were held back, `summary` is called first with their number.
    pub fn allow(&mut self, now: Instant, summary: impl FnOnce(u64)) -> bool {
        if now.duration_since(self.window_start) >= WINDOW {
            if self.suppressed > 0 {
                summary(self.suppressed);
            }
            self.window_start = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < LINES {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_budget_are_counted_and_summed_up_later() {
        let start = Instant::now();
        let mut budget = LogBudget {
            window_start: start,
            logged: 0,
            suppressed: 0,
        };
        let allowed = (0..100)
            .filter(|_| budget.allow(start, |_| panic!("no summary yet")))
            .count();
        assert_eq!(allowed, LINES as usize);
        let mut summed = None;
        assert!(budget.allow(start + WINDOW, |n| summed = Some(n)));
        assert_eq!(summed, Some(100 - LINES as u64));
    }
}
