//! Named cases run one after another, each to a verdict: what `lab attack` and `lab mobile`
//! print (a table, or `{"cases": [{"name", "held", "detail"}]}`).

use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub name: String,
    pub held: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub cases: Vec<CaseResult>,
}

impl CaseReport {
    pub fn table(&self) -> String {
        let width = self.cases.iter().map(|c| c.name.len()).max().unwrap_or(4);
        let mut out = format!("{:width$}  held  detail\n", "case");
        for c in &self.cases {
            let held = if c.held { "yes " } else { "NO  " };
            out += &format!("{:width$}  {held}  {}\n", c.name, c.detail);
        }
        let held = self.cases.iter().filter(|c| c.held).count();
        out += &format!("{held} of {} cases held\n", self.cases.len());
        out
    }

    pub fn all_held(&self) -> bool {
        self.cases.iter().all(|c| c.held)
    }
}

/// Runs the cases of `all` named in `only` (every one if `only` is empty) in `all`'s order;
/// a case that fails to run counts as not held. `command` names the caller in progress lines
/// (on stderr unless `quiet`).
pub fn run(
    command: &str,
    all: &[&str],
    only: &[String],
    quiet: bool,
    mut case: impl FnMut(&str) -> Result<CaseResult>,
) -> Result<CaseReport> {
    for name in only {
        if !all.contains(&name.as_str()) {
            bail!("no case {name:?}; the cases are: {}", all.join(", "));
        }
    }
    let mut cases = Vec::new();
    for name in all {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        if !quiet {
            eprintln!("{command}: {name} ...");
        }
        let started = Instant::now();
        let result = case(name).unwrap_or_else(|e| CaseResult {
            name: (*name).to_owned(),
            held: false,
            detail: format!("the case could not run: {e:#}"),
        });
        if !quiet {
            eprintln!(
                "{command}: {name}: {} in {:.0} s: {}",
                if result.held { "held" } else { "NOT HELD" },
                started.elapsed().as_secs_f64(),
                result.detail
            );
        }
        cases.push(result);
    }
    Ok(CaseReport { cases })
}
