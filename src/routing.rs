//! Routing: which provider gets a referral (DESIGN §7).
//!
//! Owns the rule evaluation: ordered rules from config, first match with capacity wins, the
//! fallback provider takes the rest, and the decision says which rule and why. It is a pure
//! function of the referral's facts, the config and the providers' open-Task counts (which
//! the caller reads inside the same store transaction that writes the Task), so the same
//! input and state always route the same way. It must not read the store itself.

use crate::config::{Config, Route};

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
    /// The rule's name, or `fallback`.
    pub rule: String,
    pub reason: String,
}

/// Routes by the first matching rule whose provider has capacity. `open_tasks(provider)`
/// gives the provider's current number of open Tasks.
pub fn route<E>(
    cfg: &Config,
    facts: &Facts<'_>,
    mut open_tasks: impl FnMut(&str) -> Result<u64, E>,
) -> Result<Decision, E> {
    let mut skipped = Vec::new();
    for rule in &cfg.routing.routes {
        let Some(why) = matches(rule, facts) else {
            continue;
        };
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
            });
        }
        skipped.push(format!(
            "rule {} matched but {} is at capacity ({open} of {capacity} open)",
            rule.name, rule.provider
        ));
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
    })
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
        let d = route(&cfg, &facts(&needs, "BB9", 70), |_| Ok::<_, Infallible>(0)).unwrap();
        assert_eq!(d.provider, "pendle-crafts");
        assert_eq!(d.rule, "loneliness-pendle");
        // At capacity: the next rule, here the fallback.
        let d = route(&cfg, &facts(&needs, "BB9", 70), |p| {
            Ok::<_, Infallible>(if p == "pendle-crafts" { 25 } else { 0 })
        })
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
        let d = route(&cfg, &facts(&needs, "BB9", 40), |_| Ok::<_, Infallible>(0)).unwrap();
        assert_eq!(d.rule, "money-working-age");
        // ... but not to an 80-year-old, who goes to the hub.
        let d = route(&cfg, &facts(&needs, "BB9", 80), |_| Ok::<_, Infallible>(0)).unwrap();
        assert_eq!(d.rule, "fallback");
        let d = route(&cfg, &facts(&needs, "BB11", 80), |_| Ok::<_, Infallible>(0)).unwrap();
        assert_eq!(d.rule, "money-burnley");
    }
}
