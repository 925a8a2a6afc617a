//! Routing: which provider (and which directory service) gets a referral (DESIGN §7).
//!
//! Owns the rule evaluation: ordered rules from config, first match with capacity wins,
//! then (with `routing.directory`) every directory service the referral fits, by local
//! priority; the fallback provider takes the rest, and the decision says which rule, which
//! service, and why each service passed over was turned away. A directory service is
//! chosen only if it is active, assured recently enough, says it has capacity (Gravity's
//! status), belongs to a provider the gateway serves, and that provider is under its
//! open-Task limit. It is a pure function of the referral's facts, the config, the
//! directory snapshot, the day and the providers' open-Task counts (which the caller reads
//! inside the same store transaction that writes the Task), so the same input and state
//! always route the same way. It must not read the store itself.

use std::collections::BTreeSet;

use crate::config::{Config, Route};
use crate::directory::{assured_recently, Candidate, CapacityStatus, Directory};

/// The facts of a referral that routing may look at.
pub struct Facts<'a> {
    /// Need category names.
    pub needs: &'a [String],
    /// SNOMED codes: those of the needs and of any coded reasons.
    pub codes: Vec<&'a str>,
    pub district: &'a str,
    pub practice: &'a str,
    /// Age in whole years, when the birth date is known.
    pub age: Option<u32>,
}

/// Where a referral went and why; recorded on the Task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub provider: String,
    /// The rule's name, `directory` (a directory service the referral fits), or `fallback`.
    pub rule: String,
    pub reason: String,
    /// The directory service chosen: (HealthcareService id, name).
    pub service: Option<(String, String)>,
}

/// Routes by the first matching rule whose provider (or service) has capacity, then the
/// directory's services. `open_tasks(provider)` gives the provider's current number of open
/// Tasks; `today` judges how recent an assurance is.
pub fn route<E>(
    cfg: &Config,
    dir: &Directory,
    today: time::Date,
    facts: &Facts<'_>,
    mut open_tasks: impl FnMut(&str) -> Result<u64, E>,
) -> Result<Decision, E> {
    let mut skipped = Vec::new();
    let mut tried = BTreeSet::new();
    for rule in &cfg.routing.routes {
        let Some(why) = matches(rule, facts) else {
            continue;
        };
        if let Some(sid) = &rule.service {
            let Some(c) = dir.candidate(cfg, sid) else {
                skipped.push(format!(
                    "rule {} matched but service {sid} is not in the directory",
                    rule.name
                ));
                continue;
            };
            let Some(fit) = fits(&c, facts, rule_narrows(rule)) else {
                continue;
            };
            tried.insert(sid.clone());
            match admit(cfg, &c, today, &mut open_tasks)? {
                Ok((provider, room)) => {
                    return Ok(Decision {
                        provider,
                        rule: rule.name.clone(),
                        reason: with_passed_over(format!("{why}; {fit}; {room}"), &skipped),
                        service: Some((c.service.id.clone(), c.service.name.clone())),
                    })
                }
                Err(turned_away) => {
                    skipped.push(format!("rule {} matched but {turned_away}", rule.name))
                }
            }
            continue;
        }
        let capacity = cfg
            .provider(&rule.provider)
            .map(|p| p.capacity)
            .unwrap_or(0);
        let open = open_tasks(&rule.provider)?;
        if open < capacity {
            return Ok(Decision {
                provider: rule.provider.clone(),
                rule: rule.name.clone(),
                reason: format!(
                    "{why}; {} has capacity ({open} of {capacity} open)",
                    rule.provider
                ),
                service: None,
            });
        }
        skipped.push(format!(
            "rule {} matched but {} is at capacity ({open} of {capacity} open)",
            rule.name, rule.provider
        ));
    }
    if cfg.routing.directory {
        for c in dir.in_order(cfg) {
            if tried.contains(&c.service.id) {
                continue;
            }
            let Some(fit) = fits(&c, facts, false) else {
                continue;
            };
            match admit(cfg, &c, today, &mut open_tasks)? {
                Ok((provider, room)) => {
                    return Ok(Decision {
                        provider,
                        rule: "directory".into(),
                        reason: with_passed_over(
                            format!(
                                "directory service {} ({}) fits: {fit}; {room}",
                                c.service.id, c.service.name
                            ),
                            &skipped,
                        ),
                        service: Some((c.service.id.clone(), c.service.name.clone())),
                    })
                }
                Err(turned_away) => skipped.push(turned_away),
            }
        }
    }
    let reason = if skipped.is_empty() {
        "no rule matched; fallback provider".to_string()
    } else {
        format!("{}; fallback provider", skipped.join("; "))
    };
    Ok(Decision {
        provider: cfg.routing.fallback_provider.clone(),
        rule: "fallback".into(),
        reason,
        service: None,
    })
}

/// `reason`, and why each service tried before was turned away.
fn with_passed_over(reason: String, skipped: &[String]) -> String {
    if skipped.is_empty() {
        reason
    } else {
        format!("{reason}; passed over: {}", skipped.join("; "))
    }
}

/// Whether a rule states its own needs or districts (then a service it names need not
/// list them itself).
fn rule_narrows(rule: &Route) -> bool {
    !rule.needs.is_empty() || !rule.postcode_districts.is_empty()
}

/// Why the referral fits service `c` (its needs, postcode districts, ages, practices), or
/// `None`. With `ruled`, a rule has already matched the referral's needs and area, so a
/// service that lists none of its own is not held to them.
fn fits(c: &Candidate<'_>, f: &Facts<'_>, ruled: bool) -> Option<String> {
    let s = c.service;
    let mut why = Vec::new();
    match c.needs.iter().find(|n| f.needs.contains(n)) {
        Some(n) => why.push(format!("need {n}")),
        None if c.needs.is_empty() && ruled => {}
        None => return None,
    }
    if c.districts.iter().any(|d| d == f.district) {
        why.push(format!("serves {}", f.district));
    } else if !(c.districts.is_empty() && ruled) {
        return None;
    }
    if s.min_age.is_some_and(|lo| f.age.is_none_or(|a| a < lo))
        || s.max_age.is_some_and(|hi| f.age.is_none_or(|a| a > hi))
    {
        return None;
    }
    if s.min_age.is_some() || s.max_age.is_some() {
        why.push("age in the service's range".into());
    }
    if !c.practices.is_empty() {
        c.practices.iter().find(|p| *p == f.practice)?;
        why.push(format!("practice {}", f.practice));
    }
    Some(why.join(", "))
}

/// Whether service `c` may take a referral now: (its provider, why there is room), or why
/// it was turned away.
fn admit<E>(
    cfg: &Config,
    c: &Candidate<'_>,
    today: time::Date,
    open_tasks: &mut impl FnMut(&str) -> Result<u64, E>,
) -> Result<Result<(String, String), String>, E> {
    let s = c.service;
    let name = format!("service {} ({})", s.id, s.name);
    if !s.active {
        return Ok(Err(format!("{name} is not active (status {})", s.status)));
    }
    let months = cfg.directory.assured_within_months;
    if !assured_recently(s.assured, months, today) {
        return Ok(Err(match s.assured {
            Some(a) => format!("{name} was last assured on {a}, more than {months} months ago"),
            None => format!("{name} has never been assured (no assured_date)"),
        }));
    }
    match s.capacity {
        Some(CapacityStatus::NoCapacity) => {
            return Ok(Err(format!("{name} says it has no capacity")))
        }
        Some(CapacityStatus::Waitlist) => {
            return Ok(Err(format!("{name} says it has only a waiting list")))
        }
        _ => {}
    }
    let Some(p) = cfg.provider(&s.organization) else {
        return Ok(Err(format!(
            "{name} belongs to an organisation the gateway does not serve ({})",
            s.organization
        )));
    };
    let open = open_tasks(&p.id)?;
    if open >= p.capacity {
        return Ok(Err(format!(
            "{name}: {} is at capacity ({open} of {} open)",
            p.id, p.capacity
        )));
    }
    Ok(Ok((
        p.id.clone(),
        format!("{} has capacity ({open} of {} open)", p.id, p.capacity),
    )))
}

/// Why `rule` matches, or `None`.
fn matches(rule: &Route, f: &Facts<'_>) -> Option<String> {
    let mut why = Vec::new();
    if !rule.needs.is_empty() {
        let hit = rule
            .needs
            .iter()
            .find(|n| f.needs.contains(n) || f.codes.contains(&n.as_str()))?;
        why.push(format!("need {hit}"));
    }
    if !rule.postcode_districts.is_empty() {
        rule.postcode_districts.iter().find(|d| *d == f.district)?;
        why.push("postcode district in the rule's area".to_string());
    }
    if !rule.practices.is_empty() {
        rule.practices.iter().find(|p| *p == f.practice)?;
        why.push(format!("practice {}", f.practice));
    }
    // An age band needs a known age.
    if rule.min_age.is_some_and(|lo| f.age.is_none_or(|a| a < lo))
        || rule.max_age.is_some_and(|hi| f.age.is_none_or(|a| a > hi))
    {
        return None;
    }
    if rule.min_age.is_some() || rule.max_age.is_some() {
        why.push("age in the rule's band".to_string());
    }
    if why.is_empty() {
        why.push("rule matches every referral".to_string());
    }
    Some(format!("rule {} matched: {}", rule.name, why.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn cfg() -> Config {
        Config::parse(crate::config::EMBEDDED_DEFAULT, "embedded").unwrap()
    }

    fn facts<'a>(needs: &'a [String], district: &'a str, age: u32) -> Facts<'a> {
        Facts {
            needs,
            codes: vec![],
            district,
            practice: "P81001",
            age: Some(age),
        }
    }

    #[test]
    fn first_match_with_capacity_wins() {
        let cfg = cfg();
        let needs = vec!["loneliness".to_string()];
        let d = route(
            &cfg,
            &Directory::default(),
            time::macros::date!(2026 - 11 - 22),
            &facts(&needs, "BB9", 70),
            |_| Ok::<_, Infallible>(0),
        )
        .unwrap();
        assert_eq!(d.provider, "pendle-crafts");
        assert_eq!(d.rule, "loneliness-pendle");
        // At capacity: the next rule, here the fallback.
        let d = route(
            &cfg,
            &Directory::default(),
            time::macros::date!(2026 - 11 - 22),
            &facts(&needs, "BB9", 70),
            |p| Ok::<_, Infallible>(if p == "pendle-crafts" { 25 } else { 0 }),
        )
        .unwrap();
        assert_eq!(d.provider, "pendle-cvs-hub");
        assert_eq!(d.rule, "fallback");
        assert!(d.reason.contains("at capacity"), "{}", d.reason);
    }

    #[test]
    fn age_band_and_area() {
        let cfg = cfg();
        let needs = vec!["debt".to_string()];
        // Outside Burnley: the working-age rule applies to a 40-year-old ...
        let d = route(
            &cfg,
            &Directory::default(),
            time::macros::date!(2026 - 11 - 22),
            &facts(&needs, "BB9", 40),
            |_| Ok::<_, Infallible>(0),
        )
        .unwrap();
        assert_eq!(d.rule, "money-working-age");
        // ... but not to an 80-year-old, who goes to the hub.
        let d = route(
            &cfg,
            &Directory::default(),
            time::macros::date!(2026 - 11 - 22),
            &facts(&needs, "BB9", 80),
            |_| Ok::<_, Infallible>(0),
        )
        .unwrap();
        assert_eq!(d.rule, "fallback");
        let d = route(
            &cfg,
            &Directory::default(),
            time::macros::date!(2026 - 11 - 22),
            &facts(&needs, "BB11", 80),
            |_| Ok::<_, Infallible>(0),
        )
        .unwrap();
        assert_eq!(d.rule, "money-burnley");
    }
}
