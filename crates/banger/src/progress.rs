//! Progress of long daemon calls on a terminal: one bar per layer, a spinner per phase.
//! Piped output gets none of it.

use std::collections::HashMap;

use banger_api::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bars of one call.
pub struct Bars {
    multi: Option<MultiProgress>,
    bars: HashMap<String, ProgressBar>,
}

impl Bars {
    /// Bars drawn on stderr when `enabled`, nothing otherwise.
    pub fn new(enabled: bool) -> Bars {
        let multi = enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Bars {
            multi,
            bars: HashMap::new(),
        }
    }

    /// Applies one notification.
    pub fn update(&mut self, progress: &Progress) {
        let Some(multi) = &self.multi else { return };
        let bar = self.bars.entry(progress.task.clone()).or_insert_with(|| {
            let bar = match progress.total {
                Some(total) if progress.task.starts_with("sha256:") => {
                    let bar = ProgressBar::new(total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {msg}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar
                }
                _ => {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:.bold} {spinner} {msg}")
                            .expect("valid template"),
                    );
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                    bar
                }
            };
            let short = progress
                .task
                .strip_prefix("sha256:")
                .map_or(progress.task.as_str(), |h| &h[..12.min(h.len())]);
            bar.set_prefix(short.to_owned());
            multi.add(bar)
        });
        if let Some(total) = progress.total {
            bar.set_length(total);
        }
        bar.set_position(progress.current);
        bar.set_message(progress.message.clone());
        if progress.done {
            bar.finish();
        }
    }

    /// Leaves finished bars on screen and stops spinners.
    pub fn finish(&mut self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}
