//! The bench's progress display: a bar with a step count that also carries log lines without
//! tearing the bar, or plain timestamped lines where stderr is no terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar that also carries log lines without tearing the bar.
pub struct Progress {
    bar: ProgressBar,
    start: std::time::Instant,
}

impl Progress {
    pub fn new() -> Progress {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Progress {
            bar,
            start: std::time::Instant::now(),
        }
    }

    pub fn plan(&self, steps: u64) {
        self.bar.inc_length(steps);
    }

    pub fn step(&self, what: &str) {
        self.bar.inc(1);
        if self.bar.position() > self.bar.length().unwrap_or(0) {
            self.bar.set_length(self.bar.position());
        }
        self.bar.set_message(what.to_owned());
        if self.bar.is_hidden() {
            eprintln!(
                "bench: [{:>6.1}s] {what}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }

    pub fn log(&self, line: &str) {
        self.bar.println(format!("bench: {line}"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
