//! RFC 3339 timestamps, as STIX, OpenCTI and Threat Bus write them.
//!
//! Hand-written instead of pulling in `time`/`chrono`: the bridge only needs to parse one
//! format, compare instants and print UTC with `Z`, which is ~150 lines of arithmetic.
//! Supported: years 0000–9999, `T`/`t` separator, 1–9 fractional digits, `Z`/`z` or
//! `±hh:mm` offsets. Leap seconds (`:60`) are rejected, like Python's `datetime` (and so
//! the `stix2` library Threat Bus parses with) rejects them.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

const SECS_PER_DAY: i64 = 86_400;
const NANOS_PER_SEC: u32 = 1_000_000_000;
/// 0000-01-01T00:00:00Z, in seconds since the Unix epoch.
const MIN_SECS: i64 = -62_167_219_200;
/// 9999-12-31T23:59:59Z, in seconds since the Unix epoch.
const MAX_SECS: i64 = 253_402_300_799;

/// An instant in UTC with nanosecond precision. Ordering is chronological, so two
/// spellings of the same instant (`.000Z` vs `Z`, `+02:00` vs `Z`) compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z (negative before).
    secs: i64,
    /// Always `< 1_000_000_000`: the fraction is never negative, so ordering by
    /// `(secs, nanos)` is chronological.
    nanos: u32,
}

/// Why a string is not an RFC 3339 timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// The text does not have the `YYYY-MM-DDTHH:MM:SS[.f](Z|±hh:mm)` shape.
    #[error("not RFC 3339 (expected YYYY-MM-DDTHH:MM:SS[.fraction] then Z or ±hh:mm): {0}")]
    Syntax(&'static str),
    /// A field is outside its range (month 13, February 30, hour 24, …).
    #[error("field out of range: {0}")]
    Range(&'static str),
    /// The instant, once converted to UTC, falls outside 0000–9999.
    #[error("outside the years 0000-9999 once converted to UTC")]
    OutOfYearRange,
}

impl Timestamp {
    /// 1970-01-01T00:00:00Z.
    pub const EPOCH: Timestamp = Timestamp { secs: 0, nanos: 0 };

    /// From milliseconds since the epoch (as the store records times), clamped to the
    /// year 9999.
    pub fn from_unix_millis(ms: u64) -> Timestamp {
        let secs = i64::try_from(ms / 1000).unwrap_or(MAX_SECS).min(MAX_SECS);
        Timestamp {
            secs,
            nanos: (ms % 1000) as u32 * 1_000_000,
        }
    }

    /// The system clock now (the epoch if the clock is set outside 0000–9999).
    pub fn now() -> Timestamp {
        Timestamp::from_system_time(SystemTime::now()).unwrap_or(Timestamp::EPOCH)
    }

    /// Parses an RFC 3339 timestamp and converts it to UTC.
    pub fn parse(text: &str) -> Result<Timestamp, TimestampError> {
        let mut cur = Cursor::new(text.as_bytes());
        let year = cur.number(4, "year")?;
        cur.byte(b'-', "'-' after the year")?;
        let month = cur.number(2, "month")?;
        cur.byte(b'-', "'-' after the month")?;
        let day = cur.number(2, "day")?;
        cur.one_of(b"Tt", "'T' between date and time")?;
        let hour = cur.number(2, "hour")?;
        cur.byte(b':', "':' after the hour")?;
        let minute = cur.number(2, "minute")?;
        cur.byte(b':', "':' after the minute")?;
        let second = cur.number(2, "second")?;
        let nanos = cur.fraction()?;
        let offset_secs = cur.offset()?;
        if !cur.at_end() {
            return Err(TimestampError::Syntax("unexpected text after the offset"));
        }
        check_ranges(year, month, day, hour, minute, second)?;
        let local =
            days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + minute * 60 + second;
        Timestamp::from_unix(local - offset_secs, nanos).ok_or(TimestampError::OutOfYearRange)
    }

    /// From seconds and nanoseconds since the Unix epoch; `None` outside 0000–9999 or for
    /// `nanos >= 1e9`.
    pub fn from_unix(secs: i64, nanos: u32) -> Option<Timestamp> {
        if (MIN_SECS..=MAX_SECS).contains(&secs) && nanos < NANOS_PER_SEC {
            Some(Timestamp { secs, nanos })
        } else {
            None
        }
    }

    /// From the system clock's representation; `None` outside 0000–9999. The caller reads
    /// the clock, so this module stays free of side effects.
    pub fn from_system_time(time: SystemTime) -> Option<Timestamp> {
        match time.duration_since(UNIX_EPOCH) {
            Ok(after) => {
                let secs = i64::try_from(after.as_secs()).ok()?;
                Timestamp::from_unix(secs, after.subsec_nanos())
            }
            Err(err) => {
                let before = err.duration();
                let secs = i64::try_from(before.as_secs()).ok()?;
                match before.subsec_nanos() {
                    0 => Timestamp::from_unix(-secs, 0),
                    n => Timestamp::from_unix(-secs - 1, NANOS_PER_SEC - n),
                }
            }
        }
    }

    /// Whole seconds since the Unix epoch (floor).
    pub fn unix_seconds(&self) -> i64 {
        self.secs
    }

    /// Nanoseconds past [`Timestamp::unix_seconds`], `0..1_000_000_000`.
    pub fn subsec_nanos(&self) -> u32 {
        self.nanos
    }

    /// Milliseconds since the Unix epoch, truncated towards the past.
    pub fn unix_millis(&self) -> i64 {
        self.secs * 1000 + i64::from(self.nanos / 1_000_000)
    }

    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`: what OpenCTI itself writes (JavaScript
    /// `toISOString`). Digits beyond milliseconds are truncated, which keeps the order of
    /// any two timestamps (so `last_seen >= first_seen` survives formatting).
    pub fn to_rfc3339_millis(&self) -> String {
        let (date, time) = self.civil();
        format!("{date}T{time}.{:03}Z", self.nanos / 1_000_000)
    }

    /// Splits into a `YYYY-MM-DD` and an `HH:MM:SS` string, in UTC.
    fn civil(&self) -> (String, String) {
        let days = self.secs.div_euclid(SECS_PER_DAY);
        let in_day = self.secs.rem_euclid(SECS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        let (h, mi, s) = (in_day / 3600, in_day % 3600 / 60, in_day % 60);
        (
            format!("{y:04}-{m:02}-{d:02}"),
            format!("{h:02}:{mi:02}:{s:02}"),
        )
    }
}

/// Canonical UTC form with the shortest of 0, 3, 6 or 9 fractional digits that is exact,
/// e.g. `2024-01-02T03:04:05Z`, `…05.100Z`, `…05.000001Z`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (date, time) = self.civil();
        let n = self.nanos;
        if n == 0 {
            write!(f, "{date}T{time}Z")
        } else if n % 1_000_000 == 0 {
            write!(f, "{date}T{time}.{:03}Z", n / 1_000_000)
        } else if n % 1000 == 0 {
            write!(f, "{date}T{time}.{:06}Z", n / 1000)
        } else {
            write!(f, "{date}T{time}.{n:09}Z")
        }
    }
}

fn check_ranges(
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
) -> Result<(), TimestampError> {
    if !(1..=12).contains(&month) {
        return Err(TimestampError::Range("month must be 01-12"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(TimestampError::Range("day does not exist in that month"));
    }
    if hour > 23 {
        return Err(TimestampError::Range("hour must be 00-23"));
    }
    if minute > 59 {
        return Err(TimestampError::Range("minute must be 00-59"));
    }
    if second > 59 {
        return Err(TimestampError::Range(
            "second must be 00-59 (no leap seconds)",
        ));
    }
    Ok(())
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm: eras of
/// 400 years, years starting in March so the leap day is the last day of the year).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A byte cursor over the timestamp text. Works on bytes: every valid character is ASCII,
/// so a multi-byte character simply fails the next expectation.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn byte(&mut self, expected: u8, what: &'static str) -> Result<(), TimestampError> {
        self.one_of(&[expected], what).map(|_| ())
    }

    fn one_of(&mut self, allowed: &[u8], what: &'static str) -> Result<u8, TimestampError> {
        match self.peek() {
            Some(b) if allowed.contains(&b) => {
                self.pos += 1;
                Ok(b)
            }
            _ => Err(TimestampError::Syntax(what)),
        }
    }

    /// Exactly `width` decimal digits.
    fn number(&mut self, width: usize, what: &'static str) -> Result<i64, TimestampError> {
        let mut value = 0i64;
        for _ in 0..width {
            match self.peek() {
                Some(b) if b.is_ascii_digit() => {
                    value = value * 10 + i64::from(b - b'0');
                    self.pos += 1;
                }
                _ => return Err(TimestampError::Syntax(what)),
            }
        }
        Ok(value)
    }

    /// An optional `.` followed by 1–9 digits, as nanoseconds.
    fn fraction(&mut self) -> Result<u32, TimestampError> {
        if self.peek() != Some(b'.') {
            return Ok(0);
        }
        self.pos += 1;
        let mut nanos = 0u32;
        let mut digits = 0u32;
        while let Some(b) = self.peek().filter(u8::is_ascii_digit) {
            digits += 1;
            if digits > 9 {
                return Err(TimestampError::Syntax(
                    "more than 9 fractional digits (nanoseconds)",
                ));
            }
            nanos = nanos * 10 + u32::from(b - b'0');
            self.pos += 1;
        }
        if digits == 0 {
            return Err(TimestampError::Syntax("'.' without fractional digits"));
        }
        Ok(nanos * 10u32.pow(9 - digits))
    }

    /// `Z`/`z` or `±hh:mm`, as seconds east of UTC.
    fn offset(&mut self) -> Result<i64, TimestampError> {
        let sign = match self.one_of(b"Zz+-", "offset 'Z' or '+hh:mm'/'-hh:mm'")? {
            b'+' => 1,
            b'-' => -1,
            _ => return Ok(0),
        };
        let hours = self.number(2, "offset hours")?;
        self.byte(b':', "':' in the offset")?;
        let minutes = self.number(2, "offset minutes")?;
        if hours > 23 || minutes > 59 {
            return Err(TimestampError::Range("offset must be within ±23:59"));
        }
        Ok(sign * (hours * 3600 + minutes * 60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(text: &str) -> Timestamp {
        match Timestamp::parse(text) {
            Ok(t) => t,
            Err(e) => panic!("{text:?} should parse: {e}"),
        }
    }

    #[test]
    fn epoch_and_known_instants() {
        assert_eq!(ts("1970-01-01T00:00:00Z").unix_seconds(), 0);
        // The create in stream-sample.txt: its `created` equals its event_id in ms.
        assert_eq!(
            ts("2024-03-01T10:00:15.712Z").unix_millis(),
            1_709_287_215_712
        );
        assert_eq!(ts("0000-01-01T00:00:00Z").unix_seconds(), MIN_SECS);
        assert_eq!(ts("9999-12-31T23:59:59Z").unix_seconds(), MAX_SECS);
        assert_eq!(ts("1969-12-31T23:59:59.5Z").unix_seconds(), -1);
        assert_eq!(ts("1969-12-31T23:59:59.5Z").subsec_nanos(), 500_000_000);
    }

    #[test]
    fn threatbus_reserialisation_compares_equal() {
        assert_eq!(ts("2024-01-02T03:04:05.000Z"), ts("2024-01-02T03:04:05Z"));
        assert_eq!(ts("2024-01-02T03:04:05.1Z"), ts("2024-01-02T03:04:05.100Z"));
        assert_eq!(
            ts("2024-01-02T03:04:05.123456Z"),
            ts("2024-01-02T03:04:05.123456000Z")
        );
        assert_ne!(
            ts("2024-01-02T03:04:05.123456Z"),
            ts("2024-01-02T03:04:05.123457Z")
        );
    }

    #[test]
    fn offsets_convert_to_utc() {
        assert_eq!(ts("2024-03-01T12:00:00+02:00"), ts("2024-03-01T10:00:00Z"));
        assert_eq!(ts("2024-03-01T04:30:00-05:30"), ts("2024-03-01T10:00:00Z"));
        assert_eq!(
            ts("2024-12-31T23:30:00-01:00").to_rfc3339_millis(),
            "2025-01-01T00:30:00.000Z"
        );
        assert_eq!(
            ts("2024-03-01T00:15:00+01:00").to_rfc3339_millis(),
            "2024-02-29T23:15:00.000Z"
        );
        assert_eq!(ts("2024-03-01t10:00:00z"), ts("2024-03-01T10:00:00Z"));
    }

    #[test]
    fn leap_years() {
        assert!(Timestamp::parse("2024-02-29T00:00:00Z").is_ok());
        assert!(Timestamp::parse("2000-02-29T00:00:00Z").is_ok());
        assert!(Timestamp::parse("0000-02-29T00:00:00Z").is_ok());
        assert_eq!(
            Timestamp::parse("2023-02-29T00:00:00Z"),
            Err(TimestampError::Range("day does not exist in that month"))
        );
        assert!(Timestamp::parse("1900-02-29T00:00:00Z").is_err());
        assert!(Timestamp::parse("2024-04-31T00:00:00Z").is_err());
        assert_eq!(
            ts("2024-02-29T00:00:00Z").unix_seconds() + SECS_PER_DAY,
            ts("2024-03-01T00:00:00Z").unix_seconds()
        );
    }

    #[test]
    fn formatting() {
        let t = ts("2024-01-02T03:04:05.123456789Z");
        assert_eq!(t.to_rfc3339_millis(), "2024-01-02T03:04:05.123Z");
        assert_eq!(t.to_string(), "2024-01-02T03:04:05.123456789Z");
        assert_eq!(
            ts("2024-01-02T03:04:05.000Z").to_string(),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(
            ts("2024-01-02T03:04:05.1Z").to_string(),
            "2024-01-02T03:04:05.100Z"
        );
        assert_eq!(
            ts("2024-01-02T03:04:05.00012Z").to_string(),
            "2024-01-02T03:04:05.000120Z"
        );
        assert_eq!(
            ts("0000-01-01T00:00:00Z").to_rfc3339_millis(),
            "0000-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2024-01-02",
            "2024-01-02T03:04:05",
            "2024-1-02T03:04:05Z",
            "2024-01-02 03:04:05Z",
            "2024-01-02T24:00:00Z",
            "2024-01-02T23:60:00Z",
            "2024-01-02T23:59:60Z",
            "2024-13-02T00:00:00Z",
            "2024-00-02T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T03:04:05.1234567890Z",
            "2024-01-02T03:04:05+24:00",
            "2024-01-02T03:04:05+0200",
            "2024-01-02T03:04:05Zjunk",
            "2024-01-02T03:04:05 Z",
            "+2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05\u{e9}",
        ] {
            assert!(Timestamp::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn utc_result_must_stay_in_years_0000_to_9999() {
        assert_eq!(
            Timestamp::parse("0000-01-01T00:30:00+01:00"),
            Err(TimestampError::OutOfYearRange)
        );
        assert_eq!(
            Timestamp::parse("9999-12-31T23:30:00-01:00"),
            Err(TimestampError::OutOfYearRange)
        );
    }

    #[test]
    fn from_system_time() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_709_287_215, 712_000_000);
        assert_eq!(
            Timestamp::from_system_time(t),
            Some(ts("2024-03-01T10:00:15.712Z"))
        );
        let before = UNIX_EPOCH - std::time::Duration::new(1, 250_000_000);
        assert_eq!(
            Timestamp::from_system_time(before),
            Some(ts("1969-12-31T23:59:58.750Z"))
        );
    }

    proptest! {
        #[test]
        fn display_round_trips(secs in MIN_SECS..=MAX_SECS, nanos in 0u32..NANOS_PER_SEC) {
            let t = Timestamp::from_unix(secs, nanos).ok_or_else(|| TestCaseError::fail("range"))?;
            prop_assert_eq!(Timestamp::parse(&t.to_string()), Ok(t));
            let millis = Timestamp::parse(&t.to_rfc3339_millis()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(millis.unix_millis(), t.unix_millis());
        }

        #[test]
        fn days_round_trip(days in -719_528i64..=2_932_896) {
            let (y, m, d) = civil_from_days(days);
            prop_assert_eq!(days_from_civil(y, m, d), days);
            prop_assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
        }

        #[test]
        fn parse_never_panics(text in "[0-9TtZz:.+ -]{0,40}|.{0,40}") {
            let _ = Timestamp::parse(&text);
        }
    }
}
