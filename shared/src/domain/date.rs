//! INTERNALDATE (`"17-Jul-1996 02:44:25 -0700"`) to a UTC instant, so dates from servers
//! in different time zones compare as instants.

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Seconds since the Unix epoch, or `None` if the text is not an IMAP date-time.
pub fn internal_date_epoch(text: &str) -> Option<i64> {
    let text = text.trim();
    let (date, rest) = text.split_once(' ').map(|(d, r)| (d.trim(), r.trim()))?;
    // " 1-Jan-2020" arrives trimmed as "1-Jan-2020"
    let mut dp = date.split('-');
    let day: i64 = dp.next()?.trim().parse().ok()?;
    let month_name = dp.next()?.to_ascii_lowercase();
    let month = MONTHS.iter().position(|m| *m == month_name)? as i64 + 1;
    let year: i64 = dp.next()?.parse().ok()?;
    let (time, zone) = rest.split_once(' ')?;
    let mut tp = time.split(':');
    let (h, m, s): (i64, i64, i64) = (
        tp.next()?.parse().ok()?,
        tp.next()?.parse().ok()?,
        tp.next()?.parse().ok()?,
    );
    let zone = zone.trim();
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let zh: i64 = zone.get(1..3)?.parse().ok()?;
    let zm: i64 = zone.get(3..5)?.parse().ok()?;
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + h * 3600 + m * 60 + s - sign * (zh * 3600 + zm * 60))
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day counted from 1970-01-01: the inverse of
/// [`days_from_civil`] (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_go_both_ways() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2026, 12, 1), (1969, 12, 31)] {
            assert_eq!(
                civil_from_days(days_from_civil(y, m, d)),
                (y, m as u32, d as u32)
            );
        }
    }

    #[test]
    fn zones_compare_as_instants() {
        assert_eq!(internal_date_epoch("01-Jan-1970 00:00:00 +0000"), Some(0));
        assert_eq!(
            internal_date_epoch("17-Jul-1996 02:44:25 -0700"),
            internal_date_epoch("17-Jul-1996 09:44:25 +0000")
        );
        assert_eq!(
            internal_date_epoch(" 1-Mar-2024 12:00:00 +0530"),
            Some(1_709_274_600)
        );
        assert_eq!(internal_date_epoch("garbage"), None);
    }
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time in seconds: when a pause ends, for people.
pub fn utc_minute(unix_secs: i64) -> String {
    let (y, m, d) = civil_from_days(unix_secs.div_euclid(86_400));
    let in_day = unix_secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        in_day / 3600,
        in_day % 3600 / 60
    )
}

#[cfg(test)]
mod utc_minute_tests {
    #[test]
    fn a_unix_time_reads_as_its_utc_minute() {
        assert_eq!(super::utc_minute(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc_minute(1_796_650_079), "2026-12-07 13:27 UTC");
        assert_eq!(super::utc_minute(-1), "1969-12-31 23:59 UTC");
    }
}
