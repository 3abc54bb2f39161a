//! Duration, byte-size and Kubernetes quantity strings as users write them in a gateway spec.

use std::time::Duration;

/// Parse a Kubernetes/Go-style duration (`250ms`, `5s`, `1m30s`, `1.5h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("is empty; use a duration such as \"250ms\" or \"5s\"".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?} has no unit; use ms, s, m or h (e.g. \"5s\")"))?;
        if num_len == 0 {
            return Err(format!(
                "{s:?} is not a duration such as \"250ms\" or \"5s\""
            ));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration such as \"250ms\" or \"5s\""))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "{s:?} has unknown unit {other:?}; use ms, s, m or h"
                ));
            }
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e9 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parse a byte quantity such as `64Mi`, `1G` or `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let value: u64 = s[..split]
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as \"64Mi\""))?;
    let factor: u64 = match &s[split..] {
        "" => 1,
        "k" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?} has unknown suffix {other:?}; use Ki, Mi or Gi"
            ));
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse a Kubernetes resource quantity (`10m`, `64Mi`, `1.5`, `2e3`) the way the API server
/// reads one: a signed decimal number, then one optional suffix, binary (`Ki` … `Ei`), decimal
/// (`n u m k M G T P E`) or an exponent (`e3`, `E-2`). The value is returned as a float, which
/// is exact enough to compare a request with a limit.
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a Kubernetes quantity such as \"50m\" or \"64Mi\"");
    let (sign, body) = match s.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, s.strip_prefix('+').unwrap_or(s)),
    };
    let number_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(number_end);
    if !number.chars().any(|c| c.is_ascii_digit()) || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp => {
            let digits = exp.strip_prefix(['e', 'E']).ok_or_else(bad)?;
            let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            let e: i32 = digits.parse().map_err(|_| bad())?;
            10f64.powi(e)
        }
    };
    let out = sign * value * factor;
    if out.is_finite() {
        Ok(out)
    } else {
        Err(format!("{s:?} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn bytes_parse() {
        assert_eq!(parse_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("1Ti").is_err());
    }

    #[test]
    fn quantities_parse_like_the_api_server() {
        for (ok, value) in [
            ("10m", 0.01),
            ("1", 1.0),
            ("0.5", 0.5),
            (".5", 0.5),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1Gi", 1024.0 * 1024.0 * 1024.0),
            ("1e3", 1000.0),
            ("100k", 1e5),
            ("2E-2", 0.02),
            ("-1", -1.0),
        ] {
            assert_eq!(parse_quantity(ok), Ok(value), "{ok}");
        }
        for bad in [
            "", "m", "banana", "lots", "10 m", "1.2.3", "64MB", "1e", "Mi", "1e+",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }
}
