//! Text-mode key=value data segments (RFC 7143 section 6.1) and value helpers.
//!
//! A Login or Text data segment is a sequence of `key=value` strings, each
//! terminated by a NUL byte. This module splits such a segment into an ordered
//! list of [`TextPair`]s (order matters: list values and error reporting follow
//! the initiator's order) and encodes a list back. Every dimension of the input
//! is bounded so that a hostile initiator cannot make us allocate without limit.

use thiserror::Error;

/// Longest key name RFC 7143 section 6.1 allows ("up to 63 bytes").
pub const MAX_KEY_LEN_BYTES: usize = 63;

/// Longest value we accept at the parsing layer. RFC 7143 lets binary values
/// (CHAP challenges and responses) be long; 8192 bytes covers the 1024-byte
/// binary maximum in hex or base64 with room to spare.
pub const MAX_VALUE_LEN_BYTES: usize = 8192;

/// Longest value for ordinary (non-binary) keys: RFC 7143 section 6.1 limits
/// simple values to 255 bytes unless a key says otherwise.
pub const MAX_SIMPLE_VALUE_LEN_BYTES: usize = 255;

/// Largest whole text segment we parse or accumulate across continued PDUs.
/// Real logins are a few hundred bytes; 64 KiB leaves room for vendor keys
/// without letting a peer make us buffer unbounded data.
pub const MAX_TEXT_LEN_BYTES: usize = 64 * 1024;

/// Most key=value pairs accepted in one negotiation exchange. libiscsi and
/// open-iscsi send around 20; the cap keeps duplicate detection cheap.
pub const MAX_PAIRS: usize = 256;

/// Why a text data segment was refused. Offsets are byte offsets of the
/// offending pair's first byte within the segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    /// The whole segment is longer than [`MAX_TEXT_LEN_BYTES`].
    #[error("text segment of {len_bytes} bytes exceeds the {max_bytes}-byte limit")]
    TooLong {
        /// Length that was offered.
        len_bytes: usize,
        /// Limit that applies.
        max_bytes: usize,
    },
    /// More than [`MAX_PAIRS`] pairs.
    #[error("more than {max} key=value pairs")]
    TooManyPairs {
        /// Limit that applies.
        max: usize,
    },
    /// A non-empty string without '='.
    #[error("pair at offset {offset} has no '='")]
    MissingEquals {
        /// Offset of the pair.
        offset: usize,
    },
    /// A pair starting with '='.
    #[error("pair at offset {offset} has an empty key")]
    EmptyKey {
        /// Offset of the pair.
        offset: usize,
    },
    /// Key longer than [`MAX_KEY_LEN_BYTES`].
    #[error("key at offset {offset} is {len_bytes} bytes long (max {MAX_KEY_LEN_BYTES})")]
    KeyTooLong {
        /// Offset of the pair.
        offset: usize,
        /// Length of the key.
        len_bytes: usize,
    },
    /// Key with a byte outside the RFC key-name alphabet (letters, digits,
    /// `.`, `-`, `+`, `@`, `_`, plus `#` for `X#` keys).
    #[error("key at offset {offset} contains an invalid character")]
    InvalidKey {
        /// Offset of the pair.
        offset: usize,
    },
    /// Value longer than [`MAX_VALUE_LEN_BYTES`].
    #[error("value at offset {offset} is {len_bytes} bytes long (max {MAX_VALUE_LEN_BYTES})")]
    ValueTooLong {
        /// Offset of the pair.
        offset: usize,
        /// Length of the value.
        len_bytes: usize,
    },
    /// Value that is not UTF-8 (RFC 7143 text values are UTF-8).
    #[error("value at offset {offset} is not valid UTF-8")]
    ValueNotUtf8 {
        /// Offset of the pair.
        offset: usize,
    },
}

/// One `key=value` pair, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPair {
    /// Key name (ASCII, 1..=63 bytes).
    pub key: String,
    /// Value as sent (UTF-8, may be empty).
    pub value: String,
}

impl TextPair {
    /// Builds a pair from anything string-like.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

fn key_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_' | b'#')
}

/// Parses a text data segment into its pairs, in order.
///
/// Tolerated: a missing final NUL (some initiators omit it) and empty strings
/// between NULs (padding-like runs of NUL bytes carry no pair). Everything
/// else malformed is a typed [`TextError`].
pub fn parse_text(data: &[u8]) -> Result<Vec<TextPair>, TextError> {
    if data.len() > MAX_TEXT_LEN_BYTES {
        return Err(TextError::TooLong {
            len_bytes: data.len(),
            max_bytes: MAX_TEXT_LEN_BYTES,
        });
    }
    let mut pairs = Vec::new();
    let mut offset = 0usize;
    for piece in data.split(|&b| b == 0) {
        let start = offset;
        // +1 for the NUL separator; on the final piece this overshoots, harmlessly.
        offset = offset.saturating_add(piece.len()).saturating_add(1);
        if piece.is_empty() {
            continue;
        }
        if pairs.len() >= MAX_PAIRS {
            return Err(TextError::TooManyPairs { max: MAX_PAIRS });
        }
        let eq = piece
            .iter()
            .position(|&b| b == b'=')
            .ok_or(TextError::MissingEquals { offset: start })?;
        let (key, rest) = piece.split_at(eq);
        let value = rest.get(1..).unwrap_or(&[]);
        if key.is_empty() {
            return Err(TextError::EmptyKey { offset: start });
        }
        if key.len() > MAX_KEY_LEN_BYTES {
            return Err(TextError::KeyTooLong {
                offset: start,
                len_bytes: key.len(),
            });
        }
        if !key.iter().all(|&b| key_byte_ok(b)) {
            return Err(TextError::InvalidKey { offset: start });
        }
        if value.len() > MAX_VALUE_LEN_BYTES {
            return Err(TextError::ValueTooLong {
                offset: start,
                len_bytes: value.len(),
            });
        }
        // The key alphabet is ASCII, so this conversion cannot fail, but we
        // still go through the checked path rather than assume it.
        let key = std::str::from_utf8(key).map_err(|_| TextError::InvalidKey { offset: start })?;
        let value =
            std::str::from_utf8(value).map_err(|_| TextError::ValueNotUtf8 { offset: start })?;
        pairs.push(TextPair::new(key, value));
    }
    Ok(pairs)
}

/// Encodes pairs as `key=value\0...` (every pair NUL-terminated, as RFC 7143
/// requires of the sender).
pub fn encode_text(pairs: &[TextPair]) -> Vec<u8> {
    let len: usize = pairs.iter().map(|p| p.key.len() + p.value.len() + 2).sum();
    let mut out = Vec::with_capacity(len);
    for p in pairs {
        out.extend_from_slice(p.key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(p.value.as_bytes());
        out.push(0);
    }
    out
}

/// Returns the value of the first pair with `key` (exact, case-sensitive
/// match: RFC 7143 key names are case-sensitive).
pub fn find<'a>(pairs: &'a [TextPair], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.value.as_str())
}

/// Returns the first key that appears more than once, if any.
pub fn first_duplicate(pairs: &[TextPair]) -> Option<&str> {
    // Pairs are capped at MAX_PAIRS, so sorting references is cheap.
    let mut keys: Vec<&str> = pairs.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    keys.windows(2)
        .find(|w| w.first() == w.get(1))
        .and_then(|w| w.first().copied())
}

/// Why a single value could not be interpreted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    /// Empty value where one was required.
    #[error("empty value")]
    Empty,
    /// Not a decimal or `0x` hex number, or too large for 64 bits.
    #[error("not a valid number")]
    BadNumber,
    /// Not `Yes` or `No`.
    #[error("not Yes or No")]
    BadBool,
    /// Not valid `0x` hex or `0b` base64 binary.
    #[error("not a valid binary value")]
    BadBinary,
    /// Decoded binary value longer than allowed.
    #[error("binary value too long")]
    BinaryTooLong,
}

/// Parses a numerical value: decimal, or hex with a `0x`/`0X` prefix
/// (RFC 7143 section 6.1 numerical-value). Overflow is an error, not a wrap.
pub fn parse_number(s: &str) -> Result<u64, ValueError> {
    if s.is_empty() {
        return Err(ValueError::Empty);
    }
    let (digits, radix) = match s.get(..2) {
        Some("0x") | Some("0X") => (s.get(2..).unwrap_or(""), 16),
        _ => (s, 10),
    };
    // from_str_radix accepts a leading '+', which the RFC grammar does not.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ValueError::BadNumber);
    }
    u64::from_str_radix(digits, radix).map_err(|_| ValueError::BadNumber)
}

/// Parses a boolean value: exactly `Yes` or `No` (RFC 7143 is case-sensitive).
pub fn parse_bool(s: &str) -> Result<bool, ValueError> {
    match s {
        "Yes" => Ok(true),
        "No" => Ok(false),
        "" => Err(ValueError::Empty),
        _ => Err(ValueError::BadBool),
    }
}

/// Formats a boolean as `Yes`/`No`.
pub fn bool_str(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

/// Splits a list-of-values (comma separated). Empty elements are kept so the
/// caller can reject them.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',')
}

/// Encodes bytes as a `0x`-prefixed lower-case hex constant.
pub fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn b64_sextet(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes a binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143
/// section 6.1). An odd number of hex digits implies a leading zero nibble.
/// The decoded length is limited to `max_len_bytes`.
pub fn parse_binary(s: &str, max_len_bytes: usize) -> Result<Vec<u8>, ValueError> {
    let prefix = s.get(..2).ok_or(ValueError::BadBinary)?;
    let body = s.get(2..).unwrap_or("").as_bytes();
    if body.is_empty() {
        return Err(ValueError::BadBinary);
    }
    match prefix {
        "0x" | "0X" => {
            if body.len().div_ceil(2) > max_len_bytes {
                return Err(ValueError::BinaryTooLong);
            }
            let mut out = Vec::with_capacity(body.len().div_ceil(2));
            let mut rest = body;
            if body.len() % 2 == 1 {
                let (first, tail) = body.split_at(1);
                let n = first
                    .first()
                    .copied()
                    .and_then(hex_nibble)
                    .ok_or(ValueError::BadBinary)?;
                out.push(n);
                rest = tail;
            }
            for pair in rest.chunks_exact(2) {
                let hi = pair.first().copied().and_then(hex_nibble);
                let lo = pair.get(1).copied().and_then(hex_nibble);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push((hi << 4) | lo),
                    _ => return Err(ValueError::BadBinary),
                }
            }
            Ok(out)
        }
        "0b" | "0B" => decode_base64(body, max_len_bytes),
        _ => Err(ValueError::BadBinary),
    }
}

fn decode_base64(body: &[u8], max_len_bytes: usize) -> Result<Vec<u8>, ValueError> {
    // Base64 comes in whole 4-character groups.
    if !body.chunks_exact(4).remainder().is_empty() {
        return Err(ValueError::BadBinary);
    }
    let pad = body.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 {
        return Err(ValueError::BadBinary);
    }
    let out_len = (body.len() / 4) * 3 - pad;
    if out_len > max_len_bytes {
        return Err(ValueError::BinaryTooLong);
    }
    let data = body.get(..body.len() - pad).ok_or(ValueError::BadBinary)?;
    let mut out = Vec::with_capacity(out_len);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in data {
        let v = b64_sextet(b).ok_or(ValueError::BadBinary)?;
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            // Truncation to the low byte is the point of this cast.
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    // Left-over bits must be zero for a canonical encoding; non-zero would
    // mean two different strings decode to the same bytes.
    if acc & ((1 << bits) - 1) != 0 {
        return Err(ValueError::BadBinary);
    }
    if out.len() != out_len {
        return Err(ValueError::BadBinary);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_in_order() {
        let p = parse_text(b"A=1\0B=two\0C=\0").unwrap();
        assert_eq!(
            p,
            vec![
                TextPair::new("A", "1"),
                TextPair::new("B", "two"),
                TextPair::new("C", "")
            ]
        );
    }

    #[test]
    fn tolerates_missing_final_nul_and_empty_strings() {
        let p = parse_text(b"A=1\0\0B=x=y").unwrap();
        assert_eq!(p, vec![TextPair::new("A", "1"), TextPair::new("B", "x=y")]);
        assert!(parse_text(b"").unwrap().is_empty());
        assert!(parse_text(b"\0\0\0\0").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(
            parse_text(b"A=1\0novalue\0"),
            Err(TextError::MissingEquals { offset: 4 })
        );
        assert_eq!(parse_text(b"=1\0"), Err(TextError::EmptyKey { offset: 0 }));
        assert_eq!(
            parse_text(b"K\xff=1\0"),
            Err(TextError::InvalidKey { offset: 0 })
        );
        assert_eq!(
            parse_text(b"K y=1\0"),
            Err(TextError::InvalidKey { offset: 0 })
        );
        assert_eq!(
            parse_text(b"K=\xff\xfe\0"),
            Err(TextError::ValueNotUtf8 { offset: 0 })
        );
    }

    #[test]
    fn enforces_limits() {
        let key = "K".repeat(MAX_KEY_LEN_BYTES);
        assert!(parse_text(format!("{key}=1").as_bytes()).is_ok());
        let long_key = "K".repeat(MAX_KEY_LEN_BYTES + 1);
        assert!(matches!(
            parse_text(format!("{long_key}=1").as_bytes()),
            Err(TextError::KeyTooLong { len_bytes: 64, .. })
        ));
        let v = "v".repeat(MAX_VALUE_LEN_BYTES);
        assert!(parse_text(format!("K={v}").as_bytes()).is_ok());
        let v = "v".repeat(MAX_VALUE_LEN_BYTES + 1);
        assert!(matches!(
            parse_text(format!("K={v}").as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
        let many: String = (0..=MAX_PAIRS).map(|i| format!("K{i}=1\0")).collect();
        assert_eq!(
            parse_text(many.as_bytes()),
            Err(TextError::TooManyPairs { max: MAX_PAIRS })
        );
        let big = vec![b'a'; MAX_TEXT_LEN_BYTES + 1];
        assert!(matches!(parse_text(&big), Err(TextError::TooLong { .. })));
    }

    #[test]
    fn encode_round_trips() {
        let pairs = vec![TextPair::new("A", "1"), TextPair::new("X-foo.bar", "a,b")];
        let bytes = encode_text(&pairs);
        assert_eq!(bytes, b"A=1\0X-foo.bar=a,b\0");
        assert_eq!(parse_text(&bytes).unwrap(), pairs);
    }

    #[test]
    fn duplicates_found() {
        let p = parse_text(b"A=1\0B=2\0A=3\0").unwrap();
        assert_eq!(first_duplicate(&p), Some("A"));
        assert_eq!(find(&p, "A"), Some("1"));
        let p = parse_text(b"A=1\0B=2\0").unwrap();
        assert_eq!(first_duplicate(&p), None);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0"), Ok(0));
        assert_eq!(parse_number("262144"), Ok(262_144));
        assert_eq!(parse_number("0x40000"), Ok(262_144));
        assert_eq!(parse_number("0XfF"), Ok(255));
        assert_eq!(parse_number(""), Err(ValueError::Empty));
        assert_eq!(parse_number("+1"), Err(ValueError::BadNumber));
        assert_eq!(parse_number("-1"), Err(ValueError::BadNumber));
        assert_eq!(parse_number("0x"), Err(ValueError::BadNumber));
        assert_eq!(parse_number("12a"), Err(ValueError::BadNumber));
        assert_eq!(
            parse_number("99999999999999999999999"),
            Err(ValueError::BadNumber)
        );
    }

    #[test]
    fn bools_and_lists() {
        assert_eq!(parse_bool("Yes"), Ok(true));
        assert_eq!(parse_bool("No"), Ok(false));
        assert_eq!(parse_bool("yes"), Err(ValueError::BadBool));
        assert_eq!(bool_str(true), "Yes");
        let l: Vec<_> = split_list("CRC32C,None").collect();
        assert_eq!(l, vec!["CRC32C", "None"]);
    }

    #[test]
    fn binary_values() {
        assert_eq!(parse_binary("0x0102ff", 16), Ok(vec![1, 2, 255]));
        assert_eq!(parse_binary("0X1", 16), Ok(vec![1]));
        assert_eq!(parse_binary("0x102", 16), Ok(vec![1, 2]));
        assert_eq!(parse_binary("0xzz", 16), Err(ValueError::BadBinary));
        assert_eq!(parse_binary("0x", 16), Err(ValueError::BadBinary));
        assert_eq!(parse_binary("12", 16), Err(ValueError::BadBinary));
        assert_eq!(parse_binary("0x010203", 2), Err(ValueError::BinaryTooLong));
        // "hello" in base64.
        assert_eq!(parse_binary("0baGVsbG8=", 16), Ok(b"hello".to_vec()));
        assert_eq!(parse_binary("0bAQID", 16), Ok(vec![1, 2, 3]));
        assert_eq!(parse_binary("0bAQ==", 16), Ok(vec![1]));
        assert_eq!(parse_binary("0bAR==", 16), Err(ValueError::BadBinary));
        assert_eq!(parse_binary("0bAQI", 16), Err(ValueError::BadBinary));
        assert_eq!(parse_binary("0b====", 16), Err(ValueError::BadBinary));
        assert_eq!(encode_hex(&[0, 0xab, 0x10]), "0x00ab10");
        assert_eq!(parse_binary(&encode_hex(&[9, 8, 7]), 16), Ok(vec![9, 8, 7]));
    }
}
