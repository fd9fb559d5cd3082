//! Single values of the configuration (sizes, iSCSI names, address blocks) and the
//! identities derived from it (serials, NAA ids): split from config.rs, which keeps the
//! file's structure and validation.

use std::net::IpAddr;

use super::MAX_ISCSI_NAME_LEN;

/// An address block in an ACL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix_len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // Treat IPv4-mapped IPv6 peers as IPv4, as dual-stack sockets report them.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix_len)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix_len)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Checks an iqn./eui./naa. name (RFC 7143 section 4.2.7).
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_ISCSI_NAME_LEN {
        return Err(format!(
            "`{name}`: iSCSI names are 1..={MAX_ISCSI_NAME_LEN} bytes"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if !(lower.starts_with("iqn.") || lower.starts_with("eui.") || lower.starts_with("naa.")) {
        return Err(format!(
            "`{name}`: an iSCSI name starts with iqn., eui. or naa."
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
    {
        return Err(format!(
            "`{name}`: only letters, digits, '-', '.' and ':' are allowed"
        ));
    }
    Ok(())
}

/// Parses a size: an integer number of bytes, or a string like "10GiB", "512MiB", "1TiB",
/// "4096" (binary units only, to avoid the GB/GiB ambiguity on a storage product).
pub fn parse_size(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if *n > 0 => Ok(*n as u64),
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("`{s}` is not a size like \"10GiB\""))?;
            let shift = match unit.trim() {
                "" | "B" => 0,
                "KiB" | "K" => 10,
                "MiB" | "M" => 20,
                "GiB" | "G" => 30,
                "TiB" | "T" => 40,
                u => {
                    return Err(format!(
                        "`{s}`: unknown unit `{u}` (use B, KiB, MiB, GiB or TiB)"
                    ))
                }
            };
            n.checked_mul(1u64 << shift)
                .ok_or_else(|| format!("`{s}` overflows"))
        }
        _ => Err(format!(
            "`{v}` must be a positive integer of bytes or a string like \"10GiB\""
        )),
    }
}

/// FNV-1a 64: a stable hash (unlike `DefaultHasher`, whose output may change between Rust
/// releases), so identities derived from config never change across upgrades or nodes.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The unit serial number derived from configuration: 16 hex digits.
pub fn derive_serial(target: &str, lun: u64) -> String {
    format!(
        "{:016x}",
        stable_hash(&[
            target.to_ascii_lowercase().as_bytes(),
            &lun.to_be_bytes(),
            b"serial"
        ])
    )
}

/// The 64-bit identifier used to build the LUN's NAA designator, derived like the serial.
pub fn derive_naa_id(target: &str, lun: u64) -> u64 {
    stable_hash(&[
        target.to_ascii_lowercase().as_bytes(),
        &lun.to_be_bytes(),
        b"naa",
    ])
}
