//! `lab compare`: two builds of `en` and `dn` measured in turn, for telling what a change did.
//!
//! This machine's speed drifts by tens of percent over minutes, so a build measured now and
//! another measured a minute later differ by as much as any change does. Here both builds run
//! at once, each in a lab of its own (client 1 to the server, as in `lab bench`), and every
//! round runs a short `iperf3` through one and then the other (the order alternating from round
//! to round), up and down; each pair of runs sees the same machine. Reported: each build's
//! medians, the median of the rounds' paired changes, and in how many rounds the candidate did
//! better.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::bench;
use crate::lab::{Lab, LabSpec};
use crate::stats::median_of;
use crate::traffic::IperfTest;

pub struct Options {
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub rounds: usize,
    pub seconds: u32,
    /// Run both labs on this many cores (see [`bench::confine_to_cores`]); `None`: every core.
    pub cores: Option<usize>,
}

/// One figure of one direction: what each build measured, round by round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub baseline: Vec<f64>,
    pub candidate: Vec<f64>,
}

/// What a series says.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub baseline: f64,
    pub candidate: f64,
    /// The median over rounds of candidate / baseline - 1.
    pub change: f64,
    /// Rounds in which the candidate did better (higher, or lower when `lower_is_better`).
    pub better: usize,
    pub rounds: usize,
}

impl Series {
    pub fn summary(&self, lower_is_better: bool) -> Summary {
        let pairs: Vec<(f64, f64)> = self
            .baseline
            .iter()
            .zip(&self.candidate)
            .map(|(&b, &c)| (b, c))
            .filter(|(b, c)| b.is_finite() && c.is_finite() && *b > 0.0)
            .collect();
        let changes: Vec<f64> = pairs.iter().map(|(b, c)| c / b - 1.0).collect();
        let better = pairs
            .iter()
            .filter(|(b, c)| if lower_is_better { c < b } else { c > b })
            .count();
        Summary {
            baseline: median_of(&self.baseline),
            candidate: median_of(&self.candidate),
            change: median_of(&changes),
            better,
            rounds: pairs.len(),
        }
    }
}

/// Every figure, by direction.
#[derive(Debug, Default)]
pub struct Report {
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub seconds: u32,
    /// The cores everything ran on.
    pub cores: usize,
    pub up_mbps: Series,
    pub up_cpu: Series,
    pub down_mbps: Series,
    pub down_cpu: Series,
}

/// The figures in the order the table lists them: direction, the table's label, the JSON key,
/// the series, whether lower is better.
type Row<'a> = (&'static str, &'static str, &'static str, &'a Series, bool);

impl Report {
    fn rows(&self) -> [Row<'_>; 4] {
        [
            ("up", "Mbit/s", "up_mbps", &self.up_mbps, false),
            ("up", "CPU s/GB", "up_cpu_s_per_gb", &self.up_cpu, true),
            ("down", "Mbit/s", "down_mbps", &self.down_mbps, false),
            (
                "down",
                "CPU s/GB",
                "down_cpu_s_per_gb",
                &self.down_cpu,
                true,
            ),
        ]
    }

    pub fn table(&self) -> String {
        let mut t = format!(
            "baseline:  {}\ncandidate: {}\n{:<6} {:<9} {:>9} {:>10} {:>8}  {}\n",
            self.baseline.display(),
            self.candidate.display(),
            "way",
            "figure",
            "baseline",
            "candidate",
            "change",
            "candidate better"
        );
        for (way, figure, _, series, lower) in self.rows() {
            let s = series.summary(lower);
            let _ = writeln!(
                t,
                "{way:<6} {figure:<9} {:>9.2} {:>10.2} {:>+7.1}%  in {} of {} rounds",
                s.baseline,
                s.candidate,
                s.change * 100.0,
                s.better,
                s.rounds
            );
        }
        let _ = writeln!(
            t,
            "\nOne iperf3 stream, {} s each way per round through each build's own lab, in turn; medians, and the median of the rounds' paired changes. CPU counts en and dn. {}",
            self.seconds,
            bench::ran_on(self.cores)
        );
        t
    }

    pub fn json(&self) -> serde_json::Value {
        let mut figures = serde_json::Map::new();
        for (_, _, key, series, lower) in self.rows() {
            let s = series.summary(lower);
            figures.insert(
                key.to_owned(),
                serde_json::json!({
                    "baseline": series.baseline,
                    "candidate": series.candidate,
                    "baseline_median": s.baseline,
                    "candidate_median": s.candidate,
                    "change": s.change,
                    "candidate_better_rounds": s.better,
                    "rounds": s.rounds,
                }),
            );
        }
        serde_json::json!({
            "baseline": self.baseline,
            "candidate": self.candidate,
            "seconds": self.seconds,
            "cores": self.cores,
            "figures": figures,
        })
    }
}

/// One build's lab with client 1 connected.
struct Side {
    lab: Lab,
    pids: Vec<u32>,
}

impl Side {
    fn start(bins: &std::path::Path) -> Result<Side> {
        let spec = LabSpec {
            bins: Some(bins.to_owned()),
            ..LabSpec::default()
        };
        let mut lab = Lab::start(&spec)
            .with_context(|| format!("cannot start a lab with {}", bins.display()))?;
        let pids = bench::start_holdfast(&mut lab)?;
        Ok(Side { lab, pids })
    }

    /// Mbit/s and CPU seconds per GB of one run.
    fn run(&mut self, seconds: u32, reverse: bool) -> Result<(f64, f64)> {
        let test = IperfTest {
            reverse,
            ..IperfTest::default()
        };
        let (mbps, _, cpu) = bench::run(&mut self.lab, seconds, &self.pids, &test)?;
        Ok((mbps, cpu.unwrap_or(f64::NAN)))
    }
}

pub fn run(o: &Options, progress: impl Fn(&str)) -> Result<Report> {
    let cores = bench::run_on_cores(o.cores)?;
    let mut sides = [Side::start(&o.baseline)?, Side::start(&o.candidate)?];
    let mut report = Report {
        baseline: o.baseline.clone(),
        candidate: o.candidate.clone(),
        seconds: o.seconds,
        cores,
        ..Report::default()
    };
    for round in 0..o.rounds {
        progress(&format!("round {} of {}", round + 1, o.rounds));
        for reverse in [false, true] {
            let mut got = [(0.0, 0.0); 2];
            // The order alternates, so that neither build always runs right after the other.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                got[i] = sides[i].run(o.seconds, reverse)?;
            }
            let (mbps, cpu) = if reverse {
                (&mut report.down_mbps, &mut report.down_cpu)
            } else {
                (&mut report.up_mbps, &mut report.up_cpu)
            };
            mbps.baseline.push(got[0].0);
            mbps.candidate.push(got[1].0);
            cpu.baseline.push(got[0].1);
            cpu.candidate.push(got[1].1);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_takes_medians_and_the_median_paired_change() {
        let s = Series {
            baseline: vec![100.0, 200.0, 400.0],
            candidate: vec![110.0, 180.0, 480.0],
        };
        let up = s.summary(false);
        assert_eq!(up.baseline, 200.0);
        assert_eq!(up.candidate, 180.0);
        // Changes +10%, -10%, +20%: the median is +10%.
        assert!((up.change - 0.10).abs() < 1e-9);
        assert_eq!((up.better, up.rounds), (2, 3));
        assert_eq!(s.summary(true).better, 1);
    }

    #[test]
    fn rounds_without_a_figure_are_left_out_of_the_paired_change() {
        let s = Series {
            baseline: vec![2.0, f64::NAN],
            candidate: vec![1.0, 1.0],
        };
        let cpu = s.summary(true);
        assert_eq!((cpu.better, cpu.rounds), (1, 1));
        assert!((cpu.change + 0.5).abs() < 1e-9);
    }
}
