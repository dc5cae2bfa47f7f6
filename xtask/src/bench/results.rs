//! The result model of the peer matrix, the ratio math, and the JSON / markdown renderings.
//!
//! Ratios are always "berth is better when > 1": for rates (MiB/s, IOPS, files/s) the ratio is
//! `berth / other`, for times (ms, s) it is `other / berth`. The markdown is rendered from the
//! JSON alone, so `cargo xtask bench report` can regenerate it from a committed results.json.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// The system under test; every other system is a peer.
pub const BERTH: &str = "berth";

/// Version of the results.json layout; bump it when a field changes meaning.
pub const SCHEMA: u64 = 1;

/// One measured figure per system for one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub id: String,
    pub title: String,
    /// `cold reads`, `warm reads`, `metadata`, `write`: one chart and one table block each.
    pub group: String,
    pub unit: String,
    pub higher_is_better: bool,
    /// System name -> figure; a missing entry means not measured (see `notes`).
    pub values: BTreeMap<String, f64>,
    /// System name -> why there is no figure (peer missing, timed out, failed).
    pub notes: BTreeMap<String, String>,
    /// The best the machine can do for this workload: (source, value).
    pub ceiling: Option<(String, f64)>,
}

impl Workload {
    pub fn new(id: &str, title: &str, group: &str, unit: &str, higher_is_better: bool) -> Self {
        Workload {
            id: id.to_owned(),
            title: title.to_owned(),
            group: group.to_owned(),
            unit: unit.to_owned(),
            higher_is_better,
            values: BTreeMap::new(),
            notes: BTreeMap::new(),
            ceiling: None,
        }
    }

    /// How much better `a` is than `b` (> 1: `a` is better), or None if either is unusable.
    pub fn better_ratio(&self, a: f64, b: f64) -> Option<f64> {
        if !(a.is_finite() && b.is_finite()) || a <= 0.0 || b <= 0.0 {
            return None;
        }
        Some(if self.higher_is_better { a / b } else { b / a })
    }

    /// `system` against the ceiling (1.0 = as good as the ceiling).
    pub fn ratio_to_ceiling(&self, system: &str) -> Option<f64> {
        let (_, ceiling) = self.ceiling.as_ref()?;
        self.better_ratio(*self.values.get(system)?, *ceiling)
    }

    /// The best figure among the peers (everything but berth): (peer, value).
    pub fn best_peer(&self) -> Option<(&str, f64)> {
        self.values
            .iter()
            .filter(|(name, v)| name.as_str() != BERTH && v.is_finite() && **v > 0.0)
            .map(|(name, v)| (name.as_str(), *v))
            .reduce(|best, cur| match self.better_ratio(cur.1, best.1) {
                Some(r) if r > 1.0 => cur,
                _ => best,
            })
    }

    /// berth against the best peer (> 1: berth beats every peer).
    pub fn ratio_to_best_peer(&self) -> Option<f64> {
        let (_, best) = self.best_peer()?;
        self.better_ratio(*self.values.get(BERTH)?, best)
    }

    pub fn to_json(&self) -> Value {
        let ratios_to_ceiling: Map<String, Value> = self
            .values
            .keys()
            .filter_map(|s| Some((s.clone(), json!(round(self.ratio_to_ceiling(s)?)))))
            .collect();
        json!({
            "id": self.id,
            "title": self.title,
            "group": self.group,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "values": self.values.iter().map(|(k, v)| (k.clone(), json!(round(*v)))).collect::<Map<_, _>>(),
            "notes": self.notes,
            "ceiling": self.ceiling.as_ref().map(|(source, v)| json!({"source": source, "value": round(*v)})),
            "ratio_to_ceiling": ratios_to_ceiling,
            "best_peer": self.best_peer().map(|(p, _)| p),
            "ratio_to_best_peer": self.ratio_to_best_peer().map(round),
        })
    }

    pub fn from_json(v: &Value) -> Result<Workload> {
        let s = |k: &str| -> Result<String> {
            Ok(v.get(k)
                .and_then(Value::as_str)
                .with_context(|| format!("workload without {k:?}"))?
                .to_owned())
        };
        let mut w = Workload::new(
            &s("id")?,
            &s("title")?,
            &s("group")?,
            &s("unit")?,
            v.get("higher_is_better")
                .and_then(Value::as_bool)
                .context("workload without higher_is_better")?,
        );
        if let Some(values) = v.get("values").and_then(Value::as_object) {
            for (k, x) in values {
                if let Some(x) = x.as_f64() {
                    w.values.insert(k.clone(), x);
                }
            }
        }
        if let Some(notes) = v.get("notes").and_then(Value::as_object) {
            for (k, x) in notes {
                w.notes
                    .insert(k.clone(), x.as_str().unwrap_or_default().to_owned());
            }
        }
        if let Some(c) = v.get("ceiling").filter(|c| !c.is_null()) {
            let source = c.get("source").and_then(Value::as_str).unwrap_or("?");
            let value = c
                .get("value")
                .and_then(Value::as_f64)
                .context("ceiling without value")?;
            w.ceiling = Some((source.to_owned(), value));
        }
        Ok(w)
    }
}

/// Four significant-ish digits keep the JSON readable without losing anything measurable.
fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        (x * 10.0).round() / 10.0
    } else {
        (x * 1000.0).round() / 1000.0
    }
}

/// A figure for a table cell: no decimals for big numbers, a few for small ones.
pub fn fmt_value(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The workloads of the `peers` suite inside a results.json.
pub fn workloads_of(results: &Value) -> Result<Vec<Workload>> {
    results
        .pointer("/suites/peers/workloads")
        .and_then(Value::as_array)
        .context("results.json has no suites.peers.workloads")?
        .iter()
        .map(Workload::from_json)
        .collect()
}

/// Systems in display order: berth first, then the peers that appear anywhere, by name.
pub fn systems_of(workloads: &[Workload]) -> Vec<String> {
    let mut peers: Vec<String> = Vec::new();
    for w in workloads {
        for name in w.values.keys().chain(w.notes.keys()) {
            if name != BERTH && !peers.contains(name) {
                peers.push(name.clone());
            }
        }
    }
    peers.sort();
    std::iter::once(BERTH.to_owned()).chain(peers).collect()
}

/// The berth-vs-peers table (also the README section).
pub fn markdown_table(results: &Value) -> Result<String> {
    let workloads = workloads_of(results)?;
    let systems = systems_of(&workloads);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | unit | {} | ceiling | berth / ceiling | berth / best peer |",
        systems.join(" | ")
    );
    let _ = writeln!(out, "|---|---|{}---|---|---|", "---|".repeat(systems.len()));
    for w in &workloads {
        let mut row = format!("| {} | {} |", w.title, w.unit);
        for s in &systems {
            let cell = match (w.values.get(s), w.notes.get(s)) {
                (Some(v), _) => fmt_value(*v),
                (None, Some(_)) => "n/a".to_owned(),
                (None, None) => "–".to_owned(),
            };
            let best = w.best_peer().map(|(p, _)| p) == Some(s.as_str());
            let _ = write!(row, " {} |", if best { format!("*{cell}*") } else { cell });
        }
        let ceiling = w
            .ceiling
            .as_ref()
            .map(|(src, v)| format!("{} ({src})", fmt_value(*v)))
            .unwrap_or_else(|| "–".into());
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into());
        let _ = writeln!(
            row,
            " {ceiling} | {} | {} |",
            ratio(w.ratio_to_ceiling(BERTH)),
            ratio(w.ratio_to_best_peer())
        );
        out.push_str(&row);
    }
    Ok(out)
}

/// Notes on missing figures, one line per (system, reason), deduplicated.
pub fn markdown_notes(results: &Value) -> Result<String> {
    let workloads = workloads_of(results)?;
    let mut seen: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for w in &workloads {
        for (system, note) in &w.notes {
            // One line per note in a table footnote: the first line, at most 200 characters.
            let mut note: String = note.lines().next().unwrap_or_default().to_owned();
            if note.chars().count() > 200 {
                note = note.chars().take(200).collect::<String>() + "…";
            }
            seen.entry((system.clone(), note))
                .or_default()
                .push(w.id.clone());
        }
    }
    let mut out = String::new();
    for ((system, note), ids) in seen {
        let which = if ids.len() == workloads.len() {
            "all workloads".to_owned()
        } else {
            ids.join(", ")
        };
        let _ = writeln!(out, "- {system}: {note} ({which})");
    }
    Ok(out)
}

/// The full results.md of one run.
pub fn markdown_report(results: &Value) -> Result<String> {
    let get = |p: &str| results.pointer(p).map(show).unwrap_or_else(|| "?".into());
    let mut out = String::new();
    let _ = writeln!(out, "# berth bench {}\n", get("/id"));
    let _ = writeln!(
        out,
        "{} {} · kernel {} · {} CPUs ({}) · {} GiB RAM · load {} → {}{}\n",
        get("/date"),
        get("/time"),
        get("/machine/kernel"),
        get("/machine/cpus"),
        get("/machine/cpu_model"),
        get("/machine/mem_gib"),
        get("/machine/load_start"),
        get("/machine/load_end"),
        if results.get("quick").and_then(Value::as_bool) == Some(true) {
            " · **quick run (small data sets)**"
        } else {
            ""
        }
    );
    if let Some(versions) = results.get("versions").and_then(Value::as_object) {
        let list: Vec<String> = versions
            .iter()
            .map(|(k, v)| format!("{k} {}", show(v)))
            .collect();
        let _ = writeln!(out, "Versions: {}\n", list.join(", "));
    }
    if let Some(sets) = results.pointer("/suites/peers/data_sets") {
        let _ = writeln!(out, "Data sets: {}\n", show(sets));
    }
    out.push_str(
        "Figures from one run on one machine against one SeaweedFS server on loopback. Ratios > 1 \
         mean berth is better (for times: faster). *Italics*: the best peer. Ceilings: `s3-sdk` = the \
         same request pattern straight from an SDK client (cold reads), `cache-device` = fio on the \
         disk that holds the caches (warm reads); tmpfs figures are in results.json.\n\n",
    );
    out.push_str(&markdown_table(results)?);
    let notes = markdown_notes(results)?;
    if !notes.is_empty() {
        let _ = write!(out, "\nMissing figures:\n{notes}");
    }
    if let Some(peers) = results
        .pointer("/suites/peers/peers")
        .and_then(Value::as_array)
    {
        out.push_str("\nHow each system was mounted:\n");
        for p in peers {
            let _ = writeln!(
                out,
                "- {}: {}",
                p.get("name").map(show).unwrap_or_default(),
                p.get("command").map(show).unwrap_or_default()
            );
        }
    }
    Ok(out)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Workload {
        let mut w = Workload::new("seq", "seq read", "cold reads", "MiB/s", true);
        w.values.insert(BERTH.into(), 300.0);
        w.values.insert("rclone".into(), 150.0);
        w.values.insert("s3fs".into(), 200.0);
        w.notes
            .insert("mountpoint-s3".into(), "did not build".into());
        w.ceiling = Some(("s3-sdk".into(), 600.0));
        w
    }

    #[test]
    fn ratios_for_rates() {
        let w = sample();
        assert_eq!(w.best_peer(), Some(("s3fs", 200.0)));
        assert_eq!(w.ratio_to_best_peer(), Some(1.5));
        assert_eq!(w.ratio_to_ceiling(BERTH), Some(0.5));
        assert_eq!(w.ratio_to_ceiling("rclone"), Some(0.25));
        assert_eq!(w.ratio_to_ceiling("mountpoint-s3"), None);
    }

    #[test]
    fn ratios_for_times_invert() {
        let mut w = Workload::new("ttfb", "ttfb", "metadata", "ms", false);
        w.values.insert(BERTH.into(), 20.0);
        w.values.insert("rclone".into(), 10.0);
        w.values.insert("s3fs".into(), 40.0);
        w.ceiling = Some(("s3-sdk".into(), 5.0));
        assert_eq!(w.best_peer(), Some(("rclone", 10.0)));
        assert_eq!(w.ratio_to_best_peer(), Some(0.5));
        assert_eq!(w.ratio_to_ceiling(BERTH), Some(0.25));
    }

    #[test]
    fn no_ratio_without_figures() {
        let mut w = Workload::new("x", "x", "g", "MiB/s", true);
        assert_eq!(w.ratio_to_best_peer(), None);
        w.values.insert(BERTH.into(), 10.0);
        assert_eq!(w.ratio_to_best_peer(), None);
        w.values.insert("rclone".into(), 0.0);
        assert_eq!(
            w.ratio_to_best_peer(),
            None,
            "a zero peer figure is no figure"
        );
        assert_eq!(w.better_ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn json_round_trip_keeps_figures_and_ratios() {
        let w = sample();
        let v = w.to_json();
        assert_eq!(v["ratio_to_best_peer"], json!(1.5));
        assert_eq!(v["ratio_to_ceiling"]["berth"], json!(0.5));
        assert_eq!(v["best_peer"], json!("s3fs"));
        assert_eq!(Workload::from_json(&v).unwrap(), w);
    }

    #[test]
    fn table_has_a_row_per_workload_and_marks_missing_peers() {
        let results = json!({"suites": {"peers": {"workloads": [sample().to_json()]}}});
        let table = markdown_table(&results).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| workload | unit | berth | mountpoint-s3 | rclone | s3fs |"));
        assert!(
            lines[2].contains("| 300 | n/a | 150 | *200* |"),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].ends_with("| 600 (s3-sdk) | 0.50 | 1.50 |"),
            "{}",
            lines[2]
        );
        let notes = markdown_notes(&results).unwrap();
        assert_eq!(notes, "- mountpoint-s3: did not build (all workloads)\n");
    }
}
