//! Byte sizes as people write them on a command line: `768M`, `40G`, `1.5G`, `512K`, `1T`,
//! or a plain number of bytes. Suffixes are binary (K = 1024), with or without `iB`/`B`.

/// Parses a size (binary units: K = 1024, with or without `iB`/`B`); the error says what was
/// expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const BINARY: parse_size::Config = parse_size::Config::new().with_binary();
    match BINARY.parse_size(s.trim()) {
        Ok(0) => Err("a size must be at least one byte".into()),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(format!("expected a size such as 768M, 40G or 1.5G ({e})")),
    }
}

/// Parses a count of parameters (decimal units: K = 10³, M = 10⁶, G or B = 10⁹).
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    // "B" for billions, as model sizes are written (parse-size would read bytes).
    let t = match t.strip_suffix(['b', 'B']) {
        Some(n)
            if n.trim_end()
                .ends_with(|c: char| c.is_ascii_digit() || c == '.') =>
        {
            format!("{n}G")
        }
        _ => t.to_string(),
    };
    match parse_size::parse_size(&t) {
        Ok(0) => Err("a count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!(
            "expected a parameter count such as 20M or 1.5G ({e})"
        )),
    }
}

/// A size for messages: `1.5 GiB`, `768 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("768M"), Ok(768 << 20));
        assert_eq!(parse_size("40G"), Ok(40 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 1T "), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1e3M"), Ok(1000 << 20));
        for bad in ["", "G", "-1G", "0", "1.2.3G", "12X", "nanG", "99999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn counts_parse_with_decimal_suffixes_and_b_for_billions() {
        assert_eq!(parse_count("1500"), Ok(1500));
        assert_eq!(parse_count("20K"), Ok(20_000));
        assert_eq!(parse_count("20M"), Ok(20_000_000));
        assert_eq!(parse_count("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_count("7B"), Ok(7_000_000_000));
        assert_eq!(parse_count(" 2.5b "), Ok(2_500_000_000));
        assert_eq!(parse_count("7 B"), Ok(7_000_000_000));
        for bad in ["", "lots", "0", "-3M", "B", "1.5X"] {
            assert!(parse_count(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn sizes_format_readably() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(768 << 20), "768.0 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
