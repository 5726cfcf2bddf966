//! Progress lines for long lab operations: which step runs, and how long each took.
//!
//! A step prints a line when it starts and one when it ends (with its duration, or with the
//! error that ended it), so a slow or failing step is obvious while it runs. A child process
//! (the lab's owner, see [`crate::control`]) writes the same events as JSON lines
//! ([`Progress::wire`]); the parent renders them with [`Progress::relay`] on its own clock.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One event of a step, as a child process sends it to its parent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEvent {
    /// A step started.
    Start {
        /// The step.
        step: String,
    },
    /// A step finished.
    Done {
        /// The step.
        step: String,
        /// Its duration in seconds.
        secs: f64,
    },
    /// A step failed.
    Failed {
        /// The step.
        step: String,
        /// Its duration until the failure, in seconds.
        secs: f64,
        /// What went wrong.
        error: String,
    },
    /// A line of information.
    Note {
        /// The text.
        text: String,
    },
}

enum Sink {
    Human(Box<dyn Write + Send>),
    Wire(Box<dyn Write + Send>),
    Quiet,
}

/// Prints step lines and keeps each step's duration.
pub struct Progress {
    started: Instant,
    sink: Sink,
    steps: Vec<(String, Duration)>,
    running: Option<(String, Instant)>,
    first_failure: Option<String>,
}

impl Progress {
    /// Human-readable lines on `out`.
    #[must_use]
    pub fn human(out: Box<dyn Write + Send>) -> Self {
        Self::with(Sink::Human(out))
    }

    /// JSON [`StepEvent`] lines on `out`, for a parent process to [`relay`](Self::relay).
    #[must_use]
    pub fn wire(out: Box<dyn Write + Send>) -> Self {
        Self::with(Sink::Wire(out))
    }

    /// Records durations, prints nothing (tests).
    #[must_use]
    pub fn quiet() -> Self {
        Self::with(Sink::Quiet)
    }

    fn with(sink: Sink) -> Self {
        Self {
            started: Instant::now(),
            sink,
            steps: Vec::new(),
            running: None,
            first_failure: None,
        }
    }

    /// Runs `f` as the step `name`: a start line, then a done line with its duration, or a
    /// failed line with the error.
    ///
    /// # Errors
    /// `f`'s error, with the step's name as context.
    pub fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.begin(name);
        let result = f();
        self.end(result.as_ref().err().map(|e| format!("{e:#}")));
        result.with_context(|| format!("step \"{name}\""))
    }

    /// Starts the step `name` by hand (see [`Progress::end`]).
    pub fn begin(&mut self, name: &str) {
        self.running = Some((name.to_owned(), Instant::now()));
        self.emit(&StepEvent::Start {
            step: name.to_owned(),
        });
    }

    /// Ends the running step: `None` when it succeeded, else the error text.
    pub fn end(&mut self, error: Option<String>) {
        let Some((step, since)) = self.running.take() else {
            return;
        };
        let took = since.elapsed();
        self.steps.push((step.clone(), took));
        if error.is_some() && self.first_failure.is_none() {
            self.first_failure = Some(step.clone());
        }
        let secs = took.as_secs_f64();
        self.emit(&match error {
            None => StepEvent::Done { step, secs },
            Some(error) => StepEvent::Failed { step, secs, error },
        });
    }

    /// Prints a line of information between steps.
    pub fn note(&mut self, text: &str) {
        self.emit(&StepEvent::Note {
            text: text.to_owned(),
        });
    }

    /// Renders a line a child wrote with [`Progress::wire`]; other lines are printed as
    /// notes. Returns the event, if the line was one.
    pub fn relay(&mut self, line: &str) -> Option<StepEvent> {
        match serde_json::from_str::<StepEvent>(line) {
            Ok(event) => {
                match &event {
                    StepEvent::Start { step } => self.begin(step),
                    StepEvent::Done { .. } => self.end(None),
                    StepEvent::Failed { error, .. } => self.end(Some(error.clone())),
                    StepEvent::Note { text } => self.note(text),
                }
                Some(event)
            }
            Err(_) => {
                self.note(line);
                None
            }
        }
    }

    /// Every finished step and its duration, in order.
    pub fn steps(&self) -> &[(String, Duration)] {
        &self.steps
    }

    /// Time since this progress started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The first step that failed, if any.
    pub fn first_failure(&self) -> Option<&str> {
        self.first_failure.as_deref()
    }

    /// The step running now, if any.
    pub fn running(&self) -> Option<&str> {
        self.running.as_ref().map(|(s, _)| s.as_str())
    }

    fn emit(&mut self, event: &StepEvent) {
        let at = self.started.elapsed().as_secs_f64();
        match &mut self.sink {
            Sink::Quiet => {}
            Sink::Wire(out) => {
                if let Ok(text) = serde_json::to_string(event) {
                    let _ = writeln!(out, "{text}");
                    let _ = out.flush();
                }
            }
            Sink::Human(out) => {
                let line = match event {
                    StepEvent::Start { step } => format!("{at:>6.1}s  ▶ {step}"),
                    StepEvent::Done { step, secs } => {
                        format!("{at:>6.1}s  ✓ {step} ({})", seconds(*secs))
                    }
                    StepEvent::Failed { step, secs, error } => {
                        format!(
                            "{at:>6.1}s  ✗ {step} failed after {}: {error}",
                            seconds(*secs)
                        )
                    }
                    StepEvent::Note { text } => format!("           {text}"),
                };
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }
}

/// `0.42 s`, `12.3 s`.
fn seconds(secs: f64) -> String {
    if secs < 10.0 {
        format!("{secs:.2} s")
    } else {
        format!("{secs:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_names_itself_and_keeps_its_duration() {
        let mut p = Progress::quiet();
        p.step("first", || Ok(())).unwrap();
        let err = p
            .step("second", || -> Result<()> { anyhow::bail!("boom") })
            .unwrap_err();
        assert_eq!(format!("{err:#}"), "step \"second\": boom");
        let names: Vec<&str> = p.steps().iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
    }

    #[test]
    fn relayed_events_are_rendered_as_steps() {
        let mut child = Vec::new();
        {
            let mut wire = Progress::wire(Box::new(std::io::Cursor::new(Vec::new())));
            wire.begin("x");
            wire.end(None);
            child.push(serde_json::to_string(&StepEvent::Start { step: "x".into() }).unwrap());
            child.push(
                serde_json::to_string(&StepEvent::Done {
                    step: "x".into(),
                    secs: 0.5,
                })
                .unwrap(),
            );
        }
        let mut parent = Progress::quiet();
        for line in &child {
            assert!(parent.relay(line).is_some());
        }
        assert!(parent.relay("plain text").is_none());
        assert_eq!(parent.steps().len(), 1);
        assert_eq!(parent.steps()[0].0, "x");
    }
}
