//! Figures, each with the baseline measured in the same run, their ratio and
//! the goal; printed as a table and as JSON, and appended to the history.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// How a figure's number reads.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Unit {
    Millis,
    Seconds,
    PerSecond,
    MibPerSecond,
    Mib,
    Kib,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::Millis if v < 10.0 => format!("{v:.3} ms"),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::Seconds => format!("{v:.2} s"),
            Unit::PerSecond => format!("{}/s", thousands(v)),
            Unit::MibPerSecond => format!("{v:.1} MiB/s"),
            Unit::Mib => format!("{v:.1} MiB"),
            Unit::Kib => format!("{} KiB", thousands(v)),
        }
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// What a figure is compared with.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Baseline {
    pub(crate) name: String,
    pub(crate) value: f64,
}

/// A target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Goal {
    pub(crate) text: String,
    pub(crate) pass: bool,
}

/// One measured number.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) value: f64,
    pub(crate) unit: Unit,
    pub(crate) baseline: Option<Baseline>,
    /// value / baseline.
    pub(crate) ratio: Option<f64>,
    pub(crate) goal: Option<Goal>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) note: String,
}

impl Figure {
    pub(crate) fn new(id: &str, title: impl Into<String>, value: f64, unit: Unit) -> Self {
        Self {
            id: id.to_owned(),
            title: title.into(),
            value,
            unit,
            baseline: None,
            ratio: None,
            goal: None,
            note: String::new(),
        }
    }

    /// Sets the baseline and the ratio value / baseline.
    pub(crate) fn baseline(mut self, name: impl Into<String>, value: f64) -> Self {
        self.ratio = (value > 0.0).then(|| self.value / value);
        self.baseline = Some(Baseline {
            name: name.into(),
            value,
        });
        self
    }

    /// A goal on the ratio: at most `max` times the baseline.
    pub(crate) fn ratio_at_most(mut self, max: f64) -> Self {
        let pass = self.ratio.is_some_and(|r| r <= max);
        self.goal = Some(Goal {
            text: format!("<= {max:.2}x"),
            pass,
        });
        self
    }

    /// A goal on the ratio: at least `min` times the baseline.
    pub(crate) fn ratio_at_least(mut self, min: f64) -> Self {
        let pass = self.ratio.is_some_and(|r| r >= min);
        self.goal = Some(Goal {
            text: format!(">= {min:.2}x"),
            pass,
        });
        self
    }

    /// A goal on the value itself: below `max` (same unit).
    pub(crate) fn value_below(mut self, max: f64) -> Self {
        let pass = self.value < max;
        self.goal = Some(Goal {
            text: format!("< {}", self.unit.format(max)),
            pass,
        });
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) time: String,
    pub(crate) label: String,
    pub(crate) git: String,
    pub(crate) machine: Machine,
    pub(crate) settings: serde_json::Value,
    pub(crate) sections: Vec<Section>,
    pub(crate) total_seconds: f64,
}

/// One group of figures and how long it took.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Section {
    pub(crate) name: String,
    pub(crate) seconds: f64,
    pub(crate) figures: Vec<Figure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// Raw numbers behind the figures (latency summaries, counts).
    pub(crate) details: serde_json::Value,
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) docker: String,
    /// `/proc/loadavg` when the run started: other work on a shared
    /// machine moves every figure.
    pub(crate) load_at_start: String,
}

impl Machine {
    pub(crate) async fn describe(docker: &bollard::Docker) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_else(|_| "unknown kernel".into());
        let docker = match docker.info().await {
            Ok(info) => format!(
                "Docker {} ({}, cgroup {})",
                info.server_version.unwrap_or_default(),
                info.driver.unwrap_or_default(),
                info.cgroup_version
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            ),
            Err(e) => format!("Docker unavailable: {e}"),
        };
        let load_at_start = std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        Self {
            load_at_start,
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kernel,
            docker,
        }
    }

    pub(crate) fn one_line(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB RAM, {}, {}",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.docker
        )
    }
}

impl Report {
    fn figures(&self) -> impl Iterator<Item = &Figure> {
        self.sections.iter().flat_map(|s| s.figures.iter())
    }

    /// The human-readable table.
    pub(crate) fn table(&self) -> String {
        let mut rows: Vec<[String; 6]> = vec![[
            "figure".into(),
            "value".into(),
            "baseline (same run)".into(),
            "ratio".into(),
            "goal".into(),
            "result".into(),
        ]];
        for f in self.figures() {
            rows.push([
                f.title.clone(),
                f.unit.format(f.value),
                f.baseline
                    .as_ref()
                    .map(|b| format!("{} {}", f.unit.format(b.value), b.name))
                    .unwrap_or_else(|| "-".into()),
                f.ratio
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                f.goal
                    .as_ref()
                    .map(|g| g.text.clone())
                    .unwrap_or_else(|| "-".into()),
                f.goal
                    .as_ref()
                    .map(|g| if g.pass { "pass" } else { "MISS" }.to_owned())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# VibeBox benchmarks, {}{}",
            self.time,
            if self.label.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.label)
            }
        );
        let _ = writeln!(
            out,
            "# machine: {} (load average {} at start)",
            self.machine.one_line(),
            self.machine.load_at_start
        );
        let _ = writeln!(out, "# commit: {}", self.git);
        out.push('\n');
        for (i, row) in rows.iter().enumerate() {
            let mut line = String::new();
            for (j, (cell, w)) in row.iter().zip(widths).enumerate() {
                if j > 0 {
                    line.push_str(" | ");
                }
                let pad = w - cell.chars().count();
                // Numbers right-aligned, text left-aligned.
                if j == 1 || j == 3 {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
            if i == 0 {
                let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "{}", sep.join("-|-"));
            }
        }
        let notes: Vec<&Figure> = self.figures().filter(|f| !f.note.is_empty()).collect();
        if !notes.is_empty() {
            out.push('\n');
            for f in notes {
                let _ = writeln!(out, "- {}: {}", f.title, f.note);
            }
        }
        out.push('\n');
        for s in &self.sections {
            let _ = write!(out, "{} {:.1} s; ", s.name, s.seconds);
        }
        let _ = writeln!(out, "total {:.1} s", self.total_seconds);
        let errors: Vec<&Section> = self.sections.iter().filter(|s| s.error.is_some()).collect();
        for s in &errors {
            let _ = writeln!(
                out,
                "ERROR in {}: {}",
                s.name,
                s.error.as_deref().unwrap_or_default()
            );
        }
        let goals: Vec<&Goal> = self.figures().filter_map(|f| f.goal.as_ref()).collect();
        let passed = goals.iter().filter(|g| g.pass).count();
        let _ = writeln!(out, "goals met: {passed} of {}", goals.len());
        out
    }

    /// One compact line for `history.jsonl`.
    pub(crate) fn history_line(&self, report_file: &str) -> serde_json::Value {
        let figures: serde_json::Map<String, serde_json::Value> = self
            .figures()
            .map(|f| {
                (
                    f.id.clone(),
                    serde_json::json!({
                        "value": round(f.value),
                        "unit": f.unit,
                        "baseline": f.baseline.as_ref().map(|b| round(b.value)),
                        "ratio": f.ratio.map(round),
                        "pass": f.goal.as_ref().map(|g| g.pass),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "time": self.time,
            "label": self.label,
            "git": self.git,
            "machine": self.machine.one_line(),
            "load_at_start": self.machine.load_at_start,
            "settings": self.settings,
            "total_seconds": round(self.total_seconds),
            "report": report_file,
            "errors": self.sections.iter().filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.name))).collect::<Vec<_>>(),
            "figures": figures,
        })
    }

    /// Writes `<dir>/<stamp>.json` and `<stamp>.txt` and appends to
    /// `<dir>/history.jsonl`.
    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<String> {
        use std::io::Write;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let stamp = self.time.replace(':', "");
        let json_path = dir.join(format!("{stamp}.json"));
        std::fs::write(&json_path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        std::fs::write(dir.join(format!("{stamp}.txt")), self.table())?;
        let shown = json_path.display().to_string();
        let mut history = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("history.jsonl"))?;
        writeln!(history, "{}", self.history_line(&shown))?;
        Ok(shown)
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_and_goals() {
        let f = Figure::new("x", "x", 110.0, Unit::Millis)
            .baseline("raw", 100.0)
            .ratio_at_most(1.10);
        assert!((f.ratio.unwrap() - 1.1).abs() < 1e-9);
        assert!(f.goal.unwrap().pass);
        let f = Figure::new("x", "x", 40.0, Unit::PerSecond)
            .baseline("bare", 100.0)
            .ratio_at_least(0.5);
        assert!(!f.goal.unwrap().pass);
        let f = Figure::new("x", "x", 6.0, Unit::Millis).value_below(5.0);
        assert!(!f.goal.unwrap().pass);
        let f = Figure::new("x", "x", 1.0, Unit::Millis).baseline("zero", 0.0);
        assert!(f.ratio.is_none());
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
