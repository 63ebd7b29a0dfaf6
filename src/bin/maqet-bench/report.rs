//! Figures, targets and their verdicts; the human table and the JSON document.

use std::time::Duration;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;

/// Samples of one timed step.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Nearest-rank percentile, in microseconds.
    pub fn pct(&self, p: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        let mut v = self.0.clone();
        v.sort();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1e6)
    }

    pub fn median(&self) -> Option<f64> {
        self.pct(50.0)
    }
}

/// The median of plain numbers (ratios): the middle one, or the mean of the middle two
/// (not the lower, which would favour whichever side the ratio puts on top).
pub fn median_of(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Us,
    Bytes,
    Count,
    PerSec,
    Ratio,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub section: &'static str,
    pub key: String,
    pub label: String,
    pub value: Option<f64>,
    pub unit: Unit,
    /// Samples behind the value, 0 for single readings.
    pub n: usize,
    pub note: String,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Met,
    Missed,
    /// A figure it needs was not measured (section skipped, interface absent).
    #[serde(rename = "NOT MEASURED")]
    NotMeasured,
    /// The peer it compares with is not installed or cannot run here.
    #[serde(rename = "PEER MISSING")]
    PeerMissing,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "MET",
            Verdict::Missed => "MISSED",
            Verdict::NotMeasured => "NOT MEASURED",
            Verdict::PeerMissing => "PEER MISSING",
        }
    }
}

/// One target: maqet's figure, the floor and the peer beside it (empty where the
/// target has none), their ratio, the limit and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub key: &'static str,
    pub section: &'static str,
    pub label: &'static str,
    pub maqet: String,
    pub floor: String,
    pub peer: String,
    pub ratio: String,
    pub limit: String,
    pub verdict: Verdict,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub command: String,
    pub figures: Vec<Figure>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
    /// Peers (`libvirt`, `python-maqet`) that could not be measured, with why.
    pub peers_missing: Vec<(String, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub accel: String,
    pub kernel: String,
    pub qemu: String,
    pub load_before: String,
    pub load_after: String,
}

impl Report {
    pub fn add(
        &mut self,
        section: &'static str,
        key: &str,
        label: &str,
        value: Option<f64>,
        unit: Unit,
        n: usize,
    ) {
        self.figures.push(Figure {
            section,
            key: key.to_string(),
            label: label.to_string(),
            value,
            unit,
            n,
            note: String::new(),
        });
    }

    /// p50 and p99 of a sample set, as `<key>_p50` / `<key>_p99`.
    pub fn add_pcts(&mut self, section: &'static str, key: &str, label: &str, s: &Samples) {
        self.add(
            section,
            &format!("{key}_p50"),
            &format!("{label} p50"),
            s.pct(50.0),
            Unit::Us,
            s.len(),
        );
        self.add(
            section,
            &format!("{key}_p99"),
            &format!("{label} p99"),
            s.pct(99.0),
            Unit::Us,
            s.len(),
        );
    }

    pub fn note_last(&mut self, note: impl Into<String>) {
        if let Some(f) = self.figures.last_mut() {
            f.note = note.into();
        }
    }

    /// Records a missing peer once, with why; its figures print "peer missing".
    pub fn peer_missing(&mut self, peer: &str, why: impl Into<String>) {
        if !self.peers_missing.iter().any(|(p, _)| p == peer) {
            let why = why.into();
            self.notes.push(format!("peer missing: {peer}: {why}"));
            self.peers_missing.push((peer.to_string(), why));
        }
    }

    pub fn is_peer_missing(&self, peer: &str) -> bool {
        self.peers_missing.iter().any(|(p, _)| p == peer)
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.value)
    }

    pub fn print_table(&self) {
        let m = &self.machine;
        println!(
            "maqet-bench: {} CPUs ({}), {}, kernel {}, {}",
            m.nproc, m.cpu, m.accel, m.kernel, m.qemu
        );
        println!("load before: {}; after: {}", m.load_before, m.load_after);
        println!("command: {}\n", self.command);
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED)
            .set_header(["section", "figure", "value", "n", "note"]);
        for f in &self.figures {
            t.add_row([
                f.section.to_string(),
                f.label.clone(),
                fmt_value(f.value, f.unit),
                if f.n > 0 {
                    f.n.to_string()
                } else {
                    String::new()
                },
                f.note.clone(),
            ]);
        }
        println!("{t}\n");
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header([
            "section", "target", "maqet", "floor", "peer", "ratio", "limit", "verdict",
        ]);
        for g in &self.targets {
            t.add_row([
                g.section,
                g.label,
                &g.maqet,
                &g.floor,
                &g.peer,
                &g.ratio,
                &g.limit,
                g.verdict.word(),
            ]);
        }
        println!("{t}");
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}

pub fn fmt_value(v: Option<f64>, unit: Unit) -> String {
    let Some(v) = v else {
        return "n/a".into();
    };
    match unit {
        Unit::Us if v >= 10_000.0 => format!("{:.1} ms", v / 1000.0),
        Unit::Us if v >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Unit::Us => format!("{v:.0} µs"),
        Unit::Bytes if v.abs() < 1024.0 * 1024.0 => format!("{:.0} KiB", v / 1024.0),
        Unit::Bytes => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Count => format!("{v:.0}"),
        Unit::PerSec => format!("{v:.0}/s"),
        Unit::Ratio => format!("{v:.2}×"),
    }
}
