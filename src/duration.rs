//! Durations as people write them on command lines and in environment variables: `30s`,
//! `1h30m`, `500ms`, `7d` (humantime's syntax), or a bare number of seconds.

use std::time::Duration;

/// A duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason} (expected a number with a unit, e.g. 500ms, 30s, 1h30m, 7d; a bare number is seconds)"
)]
pub struct DurationError {
    /// What was given.
    pub input: String,
    /// Why it is not a duration.
    pub reason: String,
}

/// Parses `30s`, `1h30m`, `500ms`, `2 days` (humantime), or a bare number of seconds (`90`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let text = s.trim();
    let fail = |reason: String| DurationError {
        input: s.to_string(),
        reason,
    };
    if text.is_empty() {
        return Err(fail("empty".into()));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| fail("too long".into()));
    }
    humantime::parse_duration(text).map_err(|e| fail(e.to_string()))
}

/// A duration as `1h 30m`, `500ms`, `2s` (humantime's format).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_accepted_before_still_is() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("48h"), Ok(Duration::from_secs(48 * 3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 15s "), Ok(Duration::from_secs(15)));
    }

    #[test]
    fn compound_and_sub_second_durations_parse() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m 5s"), Ok(Duration::from_secs(65)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn bad_input_says_what_is_expected() {
        for bad in ["", "abc", "10x", "-5s", "5 parsecs", "99999999999999999999"] {
            let err = parse_duration(bad).expect_err(bad);
            assert_eq!(err.input, bad);
            let text = err.to_string();
            assert!(text.starts_with("invalid duration"), "{text}");
            assert!(text.contains("1h30m"), "{text}");
        }
    }

    #[test]
    fn formatting_reads_back() {
        let d = Duration::from_secs(5400);
        assert_eq!(format_duration(d), "1h 30m");
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
}
