//! Plain-text tables for people, one JSON document for tracing PERF.md to a run.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub enum Cell {
    Text(String),
    /// A number and how many decimals to print.
    Num(f64, usize),
    None,
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    fn show(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Num(v, d) => format!("{v:.*}", d),
            Cell::None => "-".into(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Text(s) => json!(s),
            Cell::Num(v, _) if v.is_finite() => json!(v),
            _ => Value::Null,
        }
    }
}

/// `a / b`, or nothing when there is no baseline.
pub fn ratio(a: f64, b: Option<f64>) -> Cell {
    match b {
        Some(b) if b > 0.0 => Cell::Num(a / b, 2),
        _ => Cell::None,
    }
}

pub struct Table {
    pub title: String,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&'static str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.to_vec(),
            rows: vec![],
            notes: vec![],
        }
    }

    pub fn print(&self) {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(Cell::show).collect())
            .collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                cells
                    .iter()
                    .filter_map(|r| r.get(i).map(String::len))
                    .chain([self.columns[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |items: Vec<&str>| {
            let parts: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i == 0 {
                        format!("{s:<w$}", w = widths[i])
                    } else {
                        format!("{s:>w$}", w = widths[i])
                    }
                })
                .collect();
            println!("  {}", parts.join("  ").trim_end());
        };
        println!("\n== {}", self.title);
        line(self.columns.clone());
        for r in &cells {
            line(r.iter().map(String::as_str).collect());
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
    }

    fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let obj: serde_json::Map<String, Value> = self
                    .columns
                    .iter()
                    .zip(r)
                    .map(|(c, v)| (c.to_string(), v.json()))
                    .collect();
                Value::Object(obj)
            })
            .collect();
        json!({ "title": self.title, "rows": rows, "notes": self.notes })
    }
}

/// One of the targets, with what this run measured.
pub struct Check {
    pub target: String,
    pub measured: String,
    /// None when the run could not decide (e.g. no baseline was measured).
    pub pass: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub tables: Vec<Table>,
    pub checks: Vec<Check>,
    /// Measurements that failed; the run goes on so the others are not lost, and
    /// exits non-zero at the end.
    pub errors: Vec<String>,
}

impl Report {
    pub fn error(&mut self, what: &str, e: &anyhow::Error) {
        eprintln!("  FAILED {what}: {e:#}");
        self.errors.push(format!("{what}: {e:#}"));
    }

    pub fn add(&mut self, table: Table) {
        table.print();
        self.tables.push(table);
    }

    pub fn check(
        &mut self,
        target: impl Into<String>,
        measured: impl Into<String>,
        pass: Option<bool>,
    ) {
        self.checks.push(Check {
            target: target.into(),
            measured: measured.into(),
            pass,
        });
    }

    pub fn print_checks(&self) {
        if self.checks.is_empty() {
            return;
        }
        let mut t = Table::new("targets (this run)", &["target", "measured", "result"]);
        for c in &self.checks {
            t.rows.push(vec![
                Cell::text(&c.target),
                Cell::text(&c.measured),
                Cell::text(match c.pass {
                    Some(true) => "ok",
                    Some(false) => "MISSED",
                    None => "n/a",
                }),
            ]);
        }
        t.print();
    }

    pub fn write_json(
        &self,
        path: &std::path::Path,
        args: &[String],
        took: Duration,
    ) -> Result<()> {
        let checks: Vec<Value> = self
            .checks
            .iter()
            .map(|c| json!({ "target": c.target, "measured": c.measured, "pass": c.pass }))
            .collect();
        let doc = json!({
            "machine": machine(),
            "args": args,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "seconds": took.as_secs_f64(),
            "tables": self.tables.iter().map(Table::json).collect::<Vec<_>>(),
            "targets": checks,
            "errors": self.errors,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))
    }
}

/// CPU count, model and kernel: what a reader needs to weigh the absolute numbers.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({ "nproc": nproc, "cpu": model, "kernel": kernel })
}

pub fn machine_line() -> String {
    let m = machine();
    format!(
        "machine: nproc={} cpu=\"{}\" kernel={}",
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or("")
    )
}

/// The q-quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> Cell {
    Cell::Num(d.as_secs_f64() * 1e3, 2)
}

pub fn us(d: Duration) -> Cell {
    Cell::Num(d.as_secs_f64() * 1e6, 0)
}
