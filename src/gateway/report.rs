//! The figures' use cases: keeping each referral's facts and the counters in the
//! transaction of every write to its ServiceRequest, Tasks and score Observations
//! ([`tx_track`]); answering `$evaluate-measure` from the counters; and `report rebuild`,
//! which recomputes all of it from the stored resources and says where it differs.
//!
//! Keys (all under `m/`): `m/r/{sr}` a referral's [`Facts`]; `m/c/{YYYY-MM}/{cell}` a
//! counter of the referrals received that month; `m/open/{provider}` the referrals open at
//! a provider and `m/o/{provider}/{received}/{sr}` each of them, oldest first.
//!
//! Must not: scan referrals to answer a report, or give anyone but a commissioner (or an
//! auditor) a figure.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{fail, keys, tx_count, tx_json, tx_put_json, Gateway, TxResult};
use crate::auth::Principal;
use crate::clock::micros_of;
use crate::config::{Config, Role};
use crate::error::{Error, Result};
use crate::fhir;
use crate::report::{self, Facts, Load, Period, TaskFacts};
use crate::store::Tx;

fn facts_key(sr: &str) -> String {
    format!("m/r/{sr}")
}
fn cell_key(month: &str, cell: &str) -> String {
    format!("m/c/{month}/{cell}")
}
fn open_count_key(provider: &str) -> String {
    format!("m/open/{provider}")
}
fn open_key(provider: &str, received: i64, sr: &str) -> String {
    format!("m/o/{provider}/{received:020}/{sr}")
}

/// The ServiceRequest a referral resource belongs to.
fn referral_of<'a>(rtype: &str, r: &'a Value) -> Option<&'a str> {
    match rtype {
        "ServiceRequest" => r.get("id").and_then(Value::as_str),
        "Task" => r
            .get("focus")
            .and_then(|f| fhir::ref_id(f, "ServiceRequest")),
        "Observation" => r
            .get("basedOn")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|b| fhir::ref_id(b, "ServiceRequest")),
        _ => None,
    }
}

/// Version 1 of a resource, read in the transaction.
fn tx_first_version(tx: &Tx<'_>, rtype: &str, id: &str) -> TxResult<Option<Value>> {
    if let Some(v1) = tx_json(tx, &keys::version(rtype, id, 1))? {
        return Ok(Some(v1));
    }
    Ok(tx_json(tx, &keys::current(rtype, id))?.filter(|c| fhir::version_of(c) == 1))
}

/// Folds a just-written version of a referral's ServiceRequest, Task or Observation into
/// its facts and moves the counters by the difference, in the write's transaction.
pub(crate) fn tx_track(tx: &Tx<'_>, cfg: &Config, rtype: &str, written: &Value) -> TxResult<()> {
    let Some(sr) = referral_of(rtype, written).map(str::to_string) else {
        return Ok(());
    };
    let key = facts_key(&sr);
    let old: Facts = match tx.get(key.as_bytes())? {
        Some(b) => serde_json::from_slice(&b)
            .or_else(|e| fail(Error::Internal(format!("stored {key} unreadable: {e}"))))?,
        None => Facts::default(),
    };
    let mut new = old.clone();
    let at = micros_of(fhir::last_updated_of(written));
    match rtype {
        "ServiceRequest" => {
            let first = tx_first_version(tx, "ServiceRequest", &sr)?;
            let first_written = first
                .as_ref()
                .map(|v| micros_of(fhir::last_updated_of(v)))
                .unwrap_or(at);
            let patient = match written
                .get("subject")
                .and_then(|s| fhir::ref_id(s, "Patient"))
            {
                Some(p) => tx_first_version(tx, "Patient", p)?,
                None => None,
            };
            new.fold_service_request(cfg, written, first_written, patient.as_ref());
        }
        "Task" => {
            let id = written
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            new.tasks
                .entry(id.to_string())
                .or_default()
                .fold(written, at);
        }
        _ => new.fold_observation(cfg, written, at),
    }
    if new == old {
        return Ok(());
    }
    apply(tx, &sr, Some(&old), &new)
}

/// Moves the counters and the open index from `old` facts to `new`, and stores `new`.
fn apply(tx: &Tx<'_>, sr: &str, old: Option<&Facts>, new: &Facts) -> TxResult<()> {
    let before = old.map(report::cells).unwrap_or_default();
    let after = report::cells(new);
    let mut deltas: BTreeMap<&(String, String), i64> = BTreeMap::new();
    for (k, v) in &before {
        *deltas.entry(k).or_insert(0) -= v;
    }
    for (k, v) in &after {
        *deltas.entry(k).or_insert(0) += v;
    }
    for ((month, cell), d) in deltas {
        if d != 0 {
            let k = cell_key(month, cell);
            let n = tx_count(tx, &k)? as i64 + d;
            if n <= 0 {
                tx.remove(k.as_bytes())?;
            } else {
                tx.put(k.as_bytes(), n.to_string().as_bytes())?;
            }
        }
    }
    let was = old.and_then(|o| o.open_at().map(|p| (p.to_string(), o.received)));
    let is = new.open_at().map(|p| (p.to_string(), new.received));
    if was != is {
        if let Some((p, r)) = &was {
            tx.remove(open_key(p, *r, sr).as_bytes())?;
            let n = tx_count(tx, &open_count_key(p))?.saturating_sub(1);
            tx.put(open_count_key(p).as_bytes(), n.to_string().as_bytes())?;
        }
        if let Some((p, r)) = &is {
            tx.put(open_key(p, *r, sr).as_bytes(), b"")?;
            let n = tx_count(tx, &open_count_key(p))? + 1;
            tx.put(open_count_key(p).as_bytes(), n.to_string().as_bytes())?;
        }
    }
    tx_put_json(tx, &facts_key(sr), new)
}

/// A period of whole months: `periodStart` a month or its first day, `periodEnd` a month or
/// its last day; at most ten years.
pub fn months_of(start: &str, end: &str) -> Result<(Vec<String>, String, String)> {
    let bad = |name: &str, why: &str| Error::invalid("value", name.to_string(), why.to_string());
    let parse = |s: &str, name: &str, first: bool| -> Result<(i32, u8)> {
        let (y, m, d) = match s.len() {
            7 => (s.get(..4), s.get(5..7), None),
            10 => (s.get(..4), s.get(5..7), s.get(8..10)),
            _ => (None, None, None),
        };
        let (Some(y), Some(m)) = (
            y.and_then(|y| y.parse::<i32>().ok()),
            m.and_then(|m| m.parse::<u8>().ok()),
        ) else {
            return Err(bad(
                name,
                "must be a month (2026-01) or a date (2026-01-01)",
            ));
        };
        let month = time::Month::try_from(m)
            .map_err(|_| bad(name, "must be a month (2026-01) or a date (2026-01-01)"))?;
        if let Some(d) = d {
            let d: u8 = d
                .parse()
                .map_err(|_| bad(name, "must be a month (2026-01) or a date (2026-01-01)"))?;
            let last = month.length(y);
            let want = if first { 1 } else { last };
            if d != want {
                return Err(bad(
                    name,
                    if first {
                        "figures are kept by calendar month: periodStart must be the first day of a month"
                    } else {
                        "figures are kept by calendar month: periodEnd must be the last day of a month"
                    },
                ));
            }
        }
        Ok((y, m))
    };
    let (sy, sm) = parse(start, "periodStart", true)?;
    let (ey, em) = parse(end, "periodEnd", false)?;
    let (a, b) = (sy * 12 + i32::from(sm) - 1, ey * 12 + i32::from(em) - 1);
    if b < a {
        return Err(bad("periodEnd", "must not be before periodStart"));
    }
    if b - a >= 120 {
        return Err(bad("periodEnd", "a period is at most ten years"));
    }
    let months: Vec<String> = (a..=b)
        .map(|i| format!("{:04}-{:02}", i / 12, i % 12 + 1))
        .collect();
    let last = time::Month::try_from(em)
        .map(|m| m.length(ey))
        .unwrap_or(28);
    Ok((
        months,
        format!("{sy:04}-{sm:02}-01"),
        format!("{ey:04}-{em:02}-{last:02}"),
    ))
}

/// The keys `report rebuild` finds wrong: each said in words, and (unless checking only)
/// put right in transactions of up to 5,000 keys.
struct Fix {
    check_only: bool,
    differences: Vec<String>,
    /// Key → the value to put, or `None` to remove it.
    pending: Vec<(String, Option<Vec<u8>>)>,
    written: bool,
}

impl Fix {
    fn new(check_only: bool) -> Fix {
        Fix {
            check_only,
            differences: Vec::new(),
            pending: Vec::new(),
            written: false,
        }
    }

    fn differ(
        &mut self,
        gw: &Gateway,
        key: String,
        have: Option<Vec<u8>>,
        want: Option<Vec<u8>>,
    ) -> Result<()> {
        let words = |v: Option<&Vec<u8>>| match v {
            None => "absent".to_string(),
            Some(b) if key.starts_with("m/r/") => format!("{} bytes", b.len()),
            Some(b) => String::from_utf8_lossy(b).to_string(),
        };
        self.differences.push(format!(
            "{key}: {} → {}",
            words(have.as_ref()),
            words(want.as_ref())
        ));
        if !self.check_only {
            self.pending.push((key, want));
            if self.pending.len() >= 5_000 {
                self.flush(gw)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self, gw: &Gateway) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        gw.commit(|tx| {
            for (k, v) in &pending {
                match v {
                    Some(v) => tx.put(k.as_bytes(), v)?,
                    None => tx.remove(k.as_bytes())?,
                }
            }
            Ok(())
        })?;
        self.written = true;
        Ok(())
    }

    /// Writes what is left; true if anything was written (then made durable).
    fn finish(&mut self, gw: &Gateway) -> Result<bool> {
        self.flush(gw)?;
        if self.written {
            gw.store.durable_blocking()?;
        }
        Ok(self.written)
    }
}

/// What `report rebuild` found and did.
#[derive(Debug, Default, Serialize)]
pub struct Rebuilt {
    pub referrals: usize,
    pub counters: usize,
    /// Keys whose rebuilt value differs from the stored one (`key: stored → rebuilt`).
    pub differences: Vec<String>,
    pub written: bool,
}

impl Rebuilt {
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} referrals, {} counters: {}\n",
            self.referrals,
            self.counters,
            if self.differences.is_empty() {
                "the kept figures agree with the stored referrals".to_string()
            } else {
                format!("{} keys differ", self.differences.len())
            }
        );
        for d in self.differences.iter().take(50) {
            s.push_str(&format!("  {d}\n"));
        }
        if self.differences.len() > 50 {
            s.push_str(&format!("  … and {} more\n", self.differences.len() - 50));
        }
        if self.written {
            s.push_str("the figures were rewritten from the stored referrals\n");
        }
        s
    }
}

impl Gateway {
    fn may_read_figures(who: &Principal) -> Result<()> {
        match who.role {
            Role::Commissioner | Role::Auditor => Ok(()),
            _ => Err(Error::Forbidden),
        }
    }

    /// `GET /fhir/Measure/{id}`.
    pub fn read_measure(&self, who: &Principal, id: &str) -> Result<Value> {
        Self::may_read_figures(who)?;
        report::measure(&self.cfg, fhir::CANONICAL, id)
            .ok_or_else(|| Error::not_found(format!("Measure/{id}")))
    }

    /// `GET /fhir/Measure`: every Measure.
    pub fn measures(&self, who: &Principal) -> Result<Vec<Value>> {
        Self::may_read_figures(who)?;
        Ok(report::MEASURES
            .iter()
            .filter_map(|m| report::measure(&self.cfg, fhir::CANONICAL, m.0))
            .collect())
    }

    /// `GET /fhir/Measure/{id}/$evaluate-measure?periodStart=&periodEnd=`: the MeasureReport,
    /// from the counters of the period's months (and, for provider load, as it is now).
    pub fn evaluate_measure(
        &self,
        who: &Principal,
        id: &str,
        start: &str,
        end: &str,
    ) -> Result<Value> {
        Self::may_read_figures(who)?;
        if !report::MEASURES.iter().any(|m| m.0 == id) {
            return Err(Error::not_found(format!("Measure/{id}")));
        }
        let (months, start, end) = months_of(start, end)?;
        let (totals, by_month) = self.period_counters(&months)?;
        let loads = if id == "provider-load" {
            self.loads()?
        } else {
            Vec::new()
        };
        let now = crate::clock::Now::current();
        report::evaluate(
            &self.cfg,
            fhir::CANONICAL,
            id,
            &Period {
                start: &start,
                end: &end,
                totals: &totals,
                by_month: &by_month,
            },
            &loads,
            &now.instant,
        )
        .ok_or_else(|| Error::not_found(format!("Measure/{id}")))
    }

    /// Every Measure's MeasureReport over one period, from one reading of its counters (the
    /// commissioner's `/reports` page): in `report::MEASURES` order.
    pub fn evaluate_all(&self, who: &Principal, start: &str, end: &str) -> Result<Vec<Value>> {
        Self::may_read_figures(who)?;
        let (months, start, end) = months_of(start, end)?;
        let (totals, by_month) = self.period_counters(&months)?;
        let loads = self.loads()?;
        let now = crate::clock::Now::current();
        let period = Period {
            start: &start,
            end: &end,
            totals: &totals,
            by_month: &by_month,
        };
        Ok(report::MEASURES
            .iter()
            .filter_map(|m| {
                report::evaluate(
                    &self.cfg,
                    fhir::CANONICAL,
                    m.0,
                    &period,
                    &loads,
                    &now.instant,
                )
            })
            .collect())
    }

    /// The counters of `months`, summed over the period and by month.
    fn period_counters(&self, months: &[String]) -> Result<(report::Totals, report::ByMonth)> {
        let mut totals = report::Totals::new();
        let mut by_month = report::ByMonth::new();
        for m in months {
            let prefix = format!("m/c/{m}/");
            let mut month = report::Totals::new();
            self.each_under(&prefix, |k, v| {
                let cell = k.strip_prefix(prefix.as_str()).unwrap_or(k).to_string();
                let n: i64 = String::from_utf8_lossy(v).parse().unwrap_or(0);
                *totals.entry(cell.clone()).or_insert(0) += n;
                month.insert(cell, n);
                Ok(())
            })?;
            by_month.insert(m.clone(), month);
        }
        Ok((totals, by_month))
    }

    fn loads(&self) -> Result<Vec<Load>> {
        let now = crate::clock::Now::current().micros;
        let mut out = Vec::new();
        for p in &self.cfg.providers {
            let open = self
                .store
                .get(open_count_key(&p.id).as_bytes())?
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let oldest = self
                .store
                .scan(format!("m/o/{}/", p.id).as_bytes(), None, 1)?
                .first()
                .and_then(|(k, _)| {
                    let k = String::from_utf8_lossy(k).to_string();
                    k.split('/').nth(3).and_then(|r| r.parse::<i64>().ok())
                })
                .map(|received| ((now - received) / 86_400_000_000).max(0));
            out.push(Load {
                provider: p.id.clone(),
                open,
                capacity: p.capacity,
                oldest_days: oldest,
            });
        }
        Ok(out)
    }

    /// Every current resource id of `rtype`, hot and archived.
    fn ids_of(&self, rtype: &str) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for prefix in [format!("r/{rtype}/"), format!("z/{rtype}/")] {
            self.each_under(&prefix, |k, _| {
                ids.push(k.strip_prefix(prefix.as_str()).unwrap_or(k).to_string());
                Ok(())
            })?;
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Every version of a resource, oldest first.
    fn versions(&self, rtype: &str, id: &str) -> Result<Vec<Value>> {
        let Some(current) = self.load(rtype, id)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for v in 1..fhir::version_of(&current) {
            if let Some(r) = self.load_version(rtype, id, v)? {
                out.push(r);
            }
        }
        out.push(current);
        Ok(out)
    }

    /// `sp-gateway report rebuild`: every referral's facts and every counter recomputed from
    /// the stored resources (archived ones too), compared with what is kept, and (unless
    /// `check_only`) written in place of it. For a stopped store.
    pub fn rebuild_reports(&self, check_only: bool) -> Result<Rebuilt> {
        let cfg = &self.cfg;
        // Tasks by their ServiceRequest, each folded over every version.
        let mut tasks: BTreeMap<String, Vec<(String, TaskFacts)>> = BTreeMap::new();
        for id in self.ids_of("Task")? {
            let versions = self.versions("Task", &id)?;
            let Some(sr) = versions
                .last()
                .and_then(|t| referral_of("Task", t))
                .map(str::to_string)
            else {
                continue;
            };
            let mut tf = TaskFacts::default();
            for v in &versions {
                tf.fold(v, micros_of(fhir::last_updated_of(v)));
            }
            tasks.entry(sr).or_default().push((id, tf));
        }
        // Facts are compared (and rewritten) referral by referral, so that the rebuild holds
        // only the Tasks' facts, the counters and the open referrals' keys, not every
        // referral's facts twice.
        let mut fix = Fix::new(check_only);
        let mut counters: BTreeMap<(String, String), i64> = BTreeMap::new();
        let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut open: BTreeMap<String, u64> = BTreeMap::new();
        let mut referrals = 0;
        let srs = self.ids_of("ServiceRequest")?;
        for sr_id in &srs {
            let Some(sr) = self.load("ServiceRequest", sr_id)? else {
                continue;
            };
            referrals += 1;
            let first = self
                .load_version("ServiceRequest", sr_id, 1)?
                .map(|v| micros_of(fhir::last_updated_of(&v)))
                .unwrap_or_else(|| micros_of(fhir::last_updated_of(&sr)));
            let patient = match sr.get("subject").and_then(|s| fhir::ref_id(s, "Patient")) {
                Some(p) => self.load_version("Patient", p, 1)?,
                None => None,
            };
            let mut f = Facts::default();
            f.fold_service_request(cfg, &sr, first, patient.as_ref());
            for (id, tf) in tasks.remove(sr_id).unwrap_or_default() {
                f.tasks.insert(id, tf);
            }
            for (k, _) in self.scan(keys::obs_by_sr(sr_id).as_bytes(), 100_000)? {
                let k = String::from_utf8_lossy(&k).to_string();
                if let Some(o) = k.rsplit('/').next() {
                    if let Some(obs) = self.load("Observation", o)? {
                        f.fold_observation(cfg, &obs, micros_of(fhir::last_updated_of(&obs)));
                    }
                }
            }
            for (k, v) in report::cells(&f) {
                *counters.entry(k).or_insert(0) += v;
            }
            if let Some(p) = f.open_at() {
                want.insert(open_key(p, f.received, sr_id), Vec::new());
                *open.entry(p.to_string()).or_insert(0) += 1;
            }
            let bytes = serde_json::to_vec(&f).map_err(|e| Error::Internal(e.to_string()))?;
            let key = facts_key(sr_id);
            let have = self.store.get(key.as_bytes())?;
            if have.as_deref() != Some(bytes.as_slice()) {
                fix.differ(self, key, have, Some(bytes))?;
            }
        }
        // Facts of referrals that are no longer stored.
        self.each_under("m/r/", |k, v| {
            let sr = k.trim_start_matches("m/r/");
            if srs.binary_search_by(|x| x.as_str().cmp(sr)).is_err() {
                fix.differ(self, k.to_string(), Some(v.to_vec()), None)?;
            }
            Ok(())
        })?;
        let n_counters = counters.len();
        for ((month, cell), n) in counters {
            if n > 0 {
                want.insert(cell_key(&month, &cell), n.to_string().into_bytes());
            }
        }
        for (p, n) in open {
            want.insert(open_count_key(&p), n.to_string().into_bytes());
        }
        // The counters and the open referrals as kept now.
        let mut have: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for prefix in ["m/c/", "m/o/", "m/open/"] {
            self.each_under(prefix, |k, v| {
                have.insert(k.to_string(), v.to_vec());
                Ok(())
            })?;
        }
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                fix.differ(self, k.clone(), have.get(k).cloned(), Some(v.clone()))?;
            }
        }
        for (k, v) in &have {
            // An open count of 0 kept as "0" is the same as none.
            let zero = k.starts_with("m/open/") && v.as_slice() == b"0";
            if !want.contains_key(k) && !zero {
                fix.differ(self, k.clone(), Some(v.clone()), None)?;
            }
        }
        let written = fix.finish(self)?;
        Ok(Rebuilt {
            referrals,
            counters: n_counters,
            differences: fix.differences,
            written,
        })
    }

    /// Every key under `prefix` with its value, a page at a time.
    fn each_under(&self, prefix: &str, mut f: impl FnMut(&str, &[u8]) -> Result<()>) -> Result<()> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .store
                .scan(prefix.as_bytes(), after.as_deref(), 10_000)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                f(&String::from_utf8_lossy(k), v)?;
            }
            if page.len() < 10_000 {
                break;
            }
        }
        Ok(())
    }
}
