//! The one parser of every duration flag. Each variable keeps the unit its name gives
//! (`_MS` milliseconds, `_SECS` seconds), written as a whole number.

use std::time::Duration;

/// The unit a variable's number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Secs,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Millis => "milliseconds",
            Unit::Secs => "seconds",
        }
    }
}

/// `"1500"` in `unit`; the text of an error names the unit expected.
pub fn parse(text: &str, unit: Unit) -> Result<Duration, String> {
    let n: u64 = text
        .parse()
        .map_err(|e| format!("{e} (expected a whole number of {})", unit.name()))?;
    Ok(match unit {
        Unit::Millis => Duration::from_millis(n),
        Unit::Secs => Duration::from_secs(n),
    })
}

/// Value parser of the `_MS` flags.
pub fn millis(text: &str) -> Result<Duration, String> {
    parse(text, Unit::Millis)
}

/// Value parser of the `_SECS` flags (and `SLUICE_REPLAY_TTL`).
pub fn secs(text: &str) -> Result<Duration, String> {
    parse(text, Unit::Secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_unit() {
        assert_eq!(millis("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(secs("0"), Ok(Duration::ZERO));
        // What the integer flags accepted before, they still accept.
        assert_eq!(millis("+5"), Ok(Duration::from_millis(5)));
    }

    #[test]
    fn refuses_what_is_not_a_whole_number() {
        for bad in ["soon", "", "1.5", "-1", "10s", " 10"] {
            let e = secs(bad).unwrap_err();
            assert!(e.contains("seconds"), "{bad}: {e}");
        }
        assert!(millis("x").unwrap_err().contains("milliseconds"));
    }
}
