//! SCSI-3 persistent reservations (SPC-4 §5.12, PERSISTENT RESERVE IN/OUT §6.15/§6.16)
//! and SPC-2 RESERVE/RELEASE, as plain data plus pure functions.
//!
//! One [`PrState`] exists per logical unit. The engine keeps it under the LUN's lock and
//! calls, for every command:
//!
//! 1. [`check_access`] before executing anything (a [`Conflict`] becomes status
//!    RESERVATION CONFLICT, 0x18, with no sense data);
//! 2. [`pr_in`] / [`pr_out`] for PERSISTENT RESERVE IN / OUT, and [`reserve6`] /
//!    [`release6`] for RESERVE / RELEASE (6) and (10);
//! 3. [`nexus_lost`] when an I_T nexus goes away (session closed or reinstated), and
//!    [`lun_reset`] on LOGICAL UNIT RESET / target reset.
//!
//! [`PrOutEffect`] tells the engine which unit attentions to queue, which I_T nexuses'
//! tasks to abort (PREEMPT AND ABORT), and whether the APTPL image must be rewritten
//! ([`PrState::encode`]) or deleted (when [`PrState::aptpl`] is false).
//!
//! Scope of the implementation:
//! - Only LU_SCOPE (0) reservations; every type of SPC-4 table 188 (WR_EX, EX_AC,
//!   WR_EX_RO, EX_AC_RO, WR_EX_AR, EX_AC_AR).
//! - SPEC_I_PT and ALL_TG_PT are not supported (REPORT CAPABILITIES reports SIP_C=0,
//!   ATP_C=0); setting either is INVALID FIELD IN PARAMETER LIST.
//! - REGISTER AND MOVE is supported for iSCSI TransportIDs of format 01b
//!   (`name,i,0x<isid>`); the RELATIVE TARGET PORT IDENTIFIER is taken as given (the
//!   engine knows which ports exist). REPLACE LOST RESERVATION is rejected with INVALID
//!   FIELD IN CDB: reservations are never lost here.
//! - CRH=0: RESERVE/RELEASE follow SPC-2 §5.5.1 strictly: while any persistent
//!   registration exists they conflict, and while an SPC-2 reservation exists every
//!   PERSISTENT RESERVE IN/OUT conflicts, whichever I_T nexus sends it.

use super::cdb::{Command, PrInAction, PrOutAction};
use super::sense::{Asc, Sense};

/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT_STATUS: u8 = 0x18;

/// Most registrations kept per logical unit; further REGISTERs of new I_T nexuses get
/// INSUFFICIENT REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 1024;

/// Longest initiator name stored (RFC 7143 limits iSCSI names to 223 bytes).
pub const MAX_NAME_BYTES: usize = 255;

/// SCSI protocol identifier for iSCSI (SPC-4 table 362).
const PROTOCOL_ISCSI: u8 = 0x5;

/// An I_T nexus: initiator port (iSCSI name + ISID) and relative target port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexus {
    /// Initiator iSCSI name, lowercase (iSCSI names compare case-insensitively).
    pub initiator: String,
    pub isid: [u8; 6],
    /// RELATIVE TARGET PORT IDENTIFIER of the target port.
    pub target_port: u16,
}

impl Nexus {
    /// Builds a nexus, lowercasing the initiator name.
    pub fn new(initiator: &str, isid: [u8; 6], target_port: u16) -> Self {
        Nexus {
            initiator: initiator.to_ascii_lowercase(),
            isid,
            target_port,
        }
    }

    /// The initiator port name `"<name>,i,0x<isid>"` (RFC 7143 §4.2.7.1 / SPC-4 7.6.4.6).
    pub fn initiator_port_name(&self) -> String {
        let mut s = String::with_capacity(self.initiator.len() + 17);
        s.push_str(&self.initiator);
        s.push_str(",i,0x");
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The iSCSI initiator port TransportID (SPC-4 7.6.4.6, FORMAT CODE 01b): header,
    /// NUL-terminated port name, zero padding to a multiple of four bytes, at least 24
    /// bytes in total.
    pub fn transport_id(&self) -> Vec<u8> {
        let name = self.initiator_port_name();
        let additional = (name.len() + 1).next_multiple_of(4).max(20);
        let mut v = Vec::with_capacity(4 + additional);
        v.push(0x40 | PROTOCOL_ISCSI);
        v.push(0);
        // Bounded by MAX_NAME_BYTES for registered nexuses; saturate for anything else.
        v.extend_from_slice(&u16::try_from(additional).unwrap_or(u16::MAX).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.resize(4 + additional, 0);
        v
    }

    /// Parses an iSCSI TransportID of FORMAT CODE 01b into a nexus on `target_port`;
    /// `None` for any other format or protocol, or a malformed name.
    pub fn from_transport_id(bytes: &[u8], target_port: u16) -> Option<Nexus> {
        let b0 = *bytes.first()?;
        if b0 != 0x40 | PROTOCOL_ISCSI {
            return None;
        }
        let additional = usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]));
        let body = bytes.get(4..4 + additional)?;
        let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
        let text = std::str::from_utf8(body.get(..end)?).ok()?;
        let sep = text.to_ascii_lowercase().rfind(",i,0x")?;
        let name = text.get(..sep)?;
        let hex = text.get(sep + 5..)?;
        if name.is_empty() || name.len() > MAX_NAME_BYTES || hex.len() != 12 {
            return None;
        }
        let mut isid = [0u8; 6];
        for (i, out) in isid.iter_mut().enumerate() {
            *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Nexus::new(name, isid, target_port))
    }
}

/// Persistent reservation TYPE codes (SPC-4 table 188).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    /// Every supported type, in code order.
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    /// The 4-bit TYPE code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Parses a TYPE code; `None` for obsolete and reserved values.
    pub fn from_code(code: u8) -> Option<Self> {
        PrType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// WR_EX_AR / EX_AC_AR: every registrant is a reservation holder.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// WR_EX_RO / EX_AC_RO.
    pub fn registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Exclusive-access types (reads from non-holders conflict too).
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// One registered I_T nexus and its reservation key (never zero).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registration {
    pub nexus: Nexus,
    pub key: u64,
}

/// The persistent reservation (LU_SCOPE only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reservation {
    /// The holder; `None` for all-registrants types, where every registrant holds it.
    pub holder: Option<Nexus>,
    pub pr_type: PrType,
}

/// Reservation state of one logical unit.
///
/// Invariants (checked by [`PrState::decode`]): at most [`MAX_REGISTRATIONS`]
/// registrations, one per nexus, keys non-zero; a reservation exists only while some
/// registration does; a non-all-registrants reservation's holder is registered and an
/// all-registrants one has no single holder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrState {
    generation: u32,
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
    aptpl: bool,
    /// SPC-2 RESERVE holder; never persisted or replicated.
    spc2: Option<Nexus>,
}

/// What the engine must do after a successful PERSISTENT RESERVE OUT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrOutEffect {
    /// Unit attentions to establish, per I_T nexus (RESERVATIONS PREEMPTED 2A/03,
    /// RESERVATIONS RELEASED 2A/04, REGISTRATIONS PREEMPTED 2A/05).
    pub unit_attentions: Vec<(Nexus, Asc)>,
    /// PREEMPT AND ABORT: abort every task of these I_T nexuses, except the PERSISTENT
    /// RESERVE OUT command itself (the sending nexus can be listed).
    pub abort_tasks_of: Vec<Nexus>,
    /// Anything in the state changed (generation included): replicate to the peer.
    pub changed: bool,
    /// The APTPL image changed: write [`PrState::encode`] to the LUN metadata if
    /// [`PrState::aptpl`] is true, delete it otherwise.
    pub persist: bool,
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrOutError {
    /// CHECK CONDITION with this sense data.
    #[error("check condition: {0:?}")]
    Sense(Sense),
    /// Status RESERVATION CONFLICT (0x18), no sense data.
    #[error("reservation conflict")]
    ReservationConflict,
}

impl From<Sense> for PrOutError {
    fn from(s: Sense) -> Self {
        PrOutError::Sense(s)
    }
}

/// The command conflicts with a reservation: complete it with status RESERVATION
/// CONFLICT (0x18) and no sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reservation conflict")]
pub struct Conflict;

/// Why [`PrState::decode`] rejected its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrDecodeError {
    #[error("truncated persistent reservation image")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported persistent reservation image version {0}")]
    UnsupportedVersion(u8),
    #[error("checksum mismatch")]
    Checksum,
    #[error("trailing bytes after the image")]
    TrailingBytes,
    #[error("reserved flag bits set: {0:#04x}")]
    BadFlags(u8),
    #[error("{0} registrations exceed the limit")]
    TooManyRegistrations(usize),
    #[error("bad initiator name")]
    BadName,
    #[error("registration with reservation key zero")]
    ZeroKey,
    #[error("duplicate registration")]
    DuplicateRegistration,
    #[error("bad reservation type {0}")]
    BadType(u8),
    #[error("reservation holder inconsistent with registrations")]
    BadHolder,
}

const MAGIC: &[u8; 4] = b"TSPR";
const VERSION: u8 = 1;
const FLAG_APTPL: u8 = 0x01;
const FLAG_RESERVATION: u8 = 0x02;
const NO_HOLDER: u16 = 0xFFFF;

impl PrState {
    /// PRGENERATION.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Registrations, in registration order.
    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    /// The persistent reservation, if any.
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// Last APTPL bit received in a successful REGISTER / REGISTER AND IGNORE EXISTING
    /// KEY / REGISTER AND MOVE (SPC-4 5.12.5).
    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    /// The SPC-2 RESERVE holder, if any.
    pub fn spc2_holder(&self) -> Option<&Nexus> {
        self.spc2.as_ref()
    }

    /// Reservation key of `nexus`, if registered.
    pub fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| &r.nexus == nexus)
            .map(|r| r.key)
    }

    /// The RESERVATION KEY that READ RESERVATION reports: the holder's key, or zero for
    /// all-registrants types; `None` without a reservation.
    pub fn reservation_key(&self) -> Option<u64> {
        let r = self.reservation.as_ref()?;
        Some(match &r.holder {
            Some(h) => self.key_of(h).unwrap_or(0),
            None => 0,
        })
    }

    /// True if `nexus` is a persistent reservation holder (SPC-4 5.12.10).
    pub fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.pr_type.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => r.holder.as_ref() == Some(nexus),
        }
    }

    /// Applies a power on / restart: without APTPL everything is lost; with it the
    /// registrations and reservation survive, PRGENERATION restarts at zero (SPC-4
    /// 6.16.2) and the SPC-2 reservation is gone.
    pub fn power_on(&mut self) {
        if self.aptpl {
            self.generation = 0;
            self.spc2 = None;
        } else {
            *self = PrState::default();
        }
    }

    /// Serializes the persistent part (everything but the SPC-2 reservation) for the
    /// APTPL metadata file and for replication. Layout, big-endian:
    /// `"TSPR" | version u8 (1) | flags u8 (bit0 APTPL, bit1 reservation) | generation u32
    /// | count u16 | count × (key u64 | isid [6] | target_port u16 | name_len u8 | name)
    /// | [type u8 | holder index u16 (0xFFFF: all registrants)] | crc32c u32` (CRC of
    /// everything before it).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20 + self.registrations.len() * 48);
        v.extend_from_slice(MAGIC);
        v.push(VERSION);
        let mut flags = 0;
        if self.aptpl {
            flags |= FLAG_APTPL;
        }
        if self.reservation.is_some() {
            flags |= FLAG_RESERVATION;
        }
        v.push(flags);
        v.extend_from_slice(&self.generation.to_be_bytes());
        // pr_out keeps the count at or below MAX_REGISTRATIONS and names at or below
        // MAX_NAME_BYTES, so neither conversion saturates in practice.
        let count = u16::try_from(self.registrations.len()).unwrap_or(u16::MAX);
        v.extend_from_slice(&count.to_be_bytes());
        for r in self.registrations.iter().take(usize::from(count)) {
            v.extend_from_slice(&r.key.to_be_bytes());
            v.extend_from_slice(&r.nexus.isid);
            v.extend_from_slice(&r.nexus.target_port.to_be_bytes());
            let name = r.nexus.initiator.as_bytes();
            let name = name.get(..name.len().min(MAX_NAME_BYTES)).unwrap_or(name);
            v.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
            v.extend_from_slice(name);
        }
        if let Some(res) = &self.reservation {
            v.push(res.pr_type.code());
            let holder = res
                .holder
                .as_ref()
                .and_then(|h| self.registrations.iter().position(|r| &r.nexus == h))
                .and_then(|i| u16::try_from(i).ok())
                .unwrap_or(NO_HOLDER);
            v.extend_from_slice(&holder.to_be_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_be_bytes());
        v
    }

    /// Parses [`PrState::encode`] output, checking the checksum and every invariant.
    /// Never panics. The result has no SPC-2 reservation; call [`PrState::power_on`]
    /// when loading after a restart.
    pub fn decode(bytes: &[u8]) -> Result<PrState, PrDecodeError> {
        let body_len = bytes.len().checked_sub(4).ok_or(PrDecodeError::Truncated)?;
        let (body, crc) = bytes.split_at(body_len);
        let mut r = Reader { bytes: body };
        if r.take(4)? != MAGIC {
            return Err(PrDecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(PrDecodeError::UnsupportedVersion(version));
        }
        let stored_crc = u32::from_be_bytes(crc.try_into().map_err(|_| PrDecodeError::Truncated)?);
        if crc32c::crc32c(body) != stored_crc {
            return Err(PrDecodeError::Checksum);
        }
        let flags = r.u8()?;
        if flags & !(FLAG_APTPL | FLAG_RESERVATION) != 0 {
            return Err(PrDecodeError::BadFlags(flags));
        }
        let generation = r.u32()?;
        let count = usize::from(r.u16()?);
        if count > MAX_REGISTRATIONS {
            return Err(PrDecodeError::TooManyRegistrations(count));
        }
        let mut registrations: Vec<Registration> = Vec::with_capacity(count);
        for _ in 0..count {
            let key = r.u64()?;
            let isid: [u8; 6] = r
                .take(6)?
                .try_into()
                .map_err(|_| PrDecodeError::Truncated)?;
            let target_port = r.u16()?;
            let name_len = usize::from(r.u8()?);
            let name =
                std::str::from_utf8(r.take(name_len)?).map_err(|_| PrDecodeError::BadName)?;
            if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase() || b == 0) {
                return Err(PrDecodeError::BadName);
            }
            if key == 0 {
                return Err(PrDecodeError::ZeroKey);
            }
            let nexus = Nexus {
                initiator: name.to_owned(),
                isid,
                target_port,
            };
            if registrations.iter().any(|x| x.nexus == nexus) {
                return Err(PrDecodeError::DuplicateRegistration);
            }
            registrations.push(Registration { nexus, key });
        }
        let reservation = if flags & FLAG_RESERVATION != 0 {
            let code = r.u8()?;
            let pr_type = PrType::from_code(code).ok_or(PrDecodeError::BadType(code))?;
            let idx = r.u16()?;
            let holder = if idx == NO_HOLDER {
                None
            } else {
                Some(
                    registrations
                        .get(usize::from(idx))
                        .ok_or(PrDecodeError::BadHolder)?
                        .nexus
                        .clone(),
                )
            };
            if holder.is_none() != pr_type.all_registrants() || registrations.is_empty() {
                return Err(PrDecodeError::BadHolder);
            }
            Some(Reservation { holder, pr_type })
        } else {
            None
        };
        if !r.bytes.is_empty() {
            return Err(PrDecodeError::TrailingBytes);
        }
        Ok(PrState {
            generation,
            registrations,
            reservation,
            aptpl: flags & FLAG_APTPL != 0,
            spc2: None,
        })
    }

    fn index_of(&self, nexus: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|r| &r.nexus == nexus)
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// Removes registration `idx`, releasing the reservation if it held it (SPC-4
    /// 5.12.11.2.2 / 5.12.11.2.3: releasing by unregistering).
    fn unregister(&mut self, idx: usize, eff: &mut PrOutEffect) {
        if idx >= self.registrations.len() {
            return;
        }
        let removed = self.registrations.remove(idx);
        let Some(res) = &self.reservation else {
            return;
        };
        if res.pr_type.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if res.holder.as_ref() == Some(&removed.nexus) {
            let ty = res.pr_type;
            self.reservation = None;
            if ty.registrants_only() {
                for r in &self.registrations {
                    eff.unit_attentions
                        .push((r.nexus.clone(), Asc::RESERVATIONS_RELEASED));
                }
            }
        }
    }
}

/// Bounds-checked big-endian reader for [`PrState::decode`].
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PrDecodeError> {
        if n > self.bytes.len() {
            return Err(PrDecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PrDecodeError> {
        self.take(N)?
            .try_into()
            .map_err(|_| PrDecodeError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, PrDecodeError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, PrDecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, PrDecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PrDecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

mod report;
pub use report::pr_in;

// ---------------------------------------------------------------------------------
// PERSISTENT RESERVE OUT
// ---------------------------------------------------------------------------------

/// The basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3).
struct BasicParams {
    key: u64,
    sark: u64,
    aptpl: bool,
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

impl BasicParams {
    fn parse(params: &[u8], param_len: u32, register: bool) -> Result<BasicParams, PrOutError> {
        let flags = params.get(20).copied().unwrap_or(0);
        if flags & 0x08 != 0 {
            // SPEC_I_PT: unsupported (SIP_C=0), and invalid outside REGISTER anyway.
            return Err(Sense::invalid_field_in_parameter_list(20, Some(3)).into());
        }
        if param_len != 24 || params.len() < 24 {
            return Err(Sense::parameter_list_length_error().into());
        }
        if register && flags & 0x04 != 0 {
            // ALL_TG_PT: unsupported (ATP_C=0); ignored by the other service actions.
            return Err(Sense::invalid_field_in_parameter_list(20, Some(2)).into());
        }
        Ok(BasicParams {
            key: be_u64(params, 0),
            sark: be_u64(params, 8),
            aptpl: flags & 0x01 != 0,
        })
    }
}

/// SCOPE must be LU_SCOPE and TYPE a supported code (INVALID FIELD IN CDB otherwise).
fn scope_type(scope: u8, pr_type: u8) -> Result<PrType, PrOutError> {
    if scope != 0 {
        return Err(Sense::invalid_field_in_cdb(2, Some(7)).into());
    }
    PrType::from_code(pr_type).ok_or_else(|| Sense::invalid_field_in_cdb(2, Some(3)).into())
}

/// The I_T nexus must be registered with exactly `key` (RESERVATION CONFLICT otherwise).
fn require_key(state: &PrState, nexus: &Nexus, key: u64) -> Result<(), PrOutError> {
    match state.key_of(nexus) {
        Some(k) if k == key => Ok(()),
        _ => Err(PrOutError::ReservationConflict),
    }
}

/// Processes a PERSISTENT RESERVE OUT from `nexus` (SPC-4 §5.12.5–5.12.11, §6.16).
///
/// `scope` / `pr_type` are the CDB's SCOPE and TYPE nibbles, `params` the Data-Out
/// buffer and `param_len_in_cdb` the CDB's PARAMETER LIST LENGTH. On error the state is
/// unchanged.
pub fn pr_out(
    state: &mut PrState,
    nexus: &Nexus,
    action: PrOutAction,
    scope: u8,
    pr_type: u8,
    params: &[u8],
    param_len_in_cdb: u32,
) -> Result<PrOutEffect, PrOutError> {
    // SPC-2 §5.5.1: every PR OUT conflicts while an SPC-2 reservation exists.
    if state.spc2.is_some() {
        return Err(PrOutError::ReservationConflict);
    }
    let before = state.clone();
    let mut work = state.clone();
    let mut eff = PrOutEffect::default();
    match action {
        PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey => {
            let p = BasicParams::parse(params, param_len_in_cdb, true)?;
            let ignore = action == PrOutAction::RegisterAndIgnoreExistingKey;
            register(&mut work, nexus, &p, ignore, &mut eff)?;
        }
        PrOutAction::Reserve => {
            let p = BasicParams::parse(params, param_len_in_cdb, false)?;
            let ty = scope_type(scope, pr_type)?;
            require_key(&work, nexus, p.key)?;
            match &work.reservation {
                Some(res) => {
                    if !(work.is_holder(nexus) && res.pr_type == ty) {
                        return Err(PrOutError::ReservationConflict);
                    }
                }
                None => {
                    work.reservation = Some(Reservation {
                        holder: (!ty.all_registrants()).then(|| nexus.clone()),
                        pr_type: ty,
                    });
                }
            }
        }
        PrOutAction::Release => {
            let p = BasicParams::parse(params, param_len_in_cdb, false)?;
            require_key(&work, nexus, p.key)?;
            if let Some(res) = &work.reservation {
                if work.is_holder(nexus) {
                    if scope != 0 || pr_type != res.pr_type.code() {
                        return Err(Sense::illegal_request(
                            Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                        )
                        .into());
                    }
                    let ty = res.pr_type;
                    work.reservation = None;
                    if ty.registrants_only() || ty.all_registrants() {
                        for r in work.registrations.iter().filter(|r| &r.nexus != nexus) {
                            eff.unit_attentions
                                .push((r.nexus.clone(), Asc::RESERVATIONS_RELEASED));
                        }
                    }
                }
            }
        }
        PrOutAction::Clear => {
            let p = BasicParams::parse(params, param_len_in_cdb, false)?;
            require_key(&work, nexus, p.key)?;
            for r in work.registrations.iter().filter(|r| &r.nexus != nexus) {
                eff.unit_attentions
                    .push((r.nexus.clone(), Asc::RESERVATIONS_PREEMPTED));
            }
            work.registrations.clear();
            work.reservation = None;
            work.bump_generation();
        }
        PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
            let p = BasicParams::parse(params, param_len_in_cdb, false)?;
            require_key(&work, nexus, p.key)?;
            preempt(&mut work, nexus, &p, scope, pr_type, &mut eff)?;
            if action == PrOutAction::Preempt {
                eff.abort_tasks_of.clear();
            }
        }
        PrOutAction::RegisterAndMove => {
            register_and_move(&mut work, nexus, scope, pr_type, params, param_len_in_cdb)?;
        }
        PrOutAction::ReplaceLostReservation => {
            // Reservations are never lost by this device server (RLR_C=0).
            return Err(Sense::invalid_field_in_cdb(1, Some(4)).into());
        }
    }
    *state = work;
    eff.changed = *state != before;
    eff.persist = eff.changed && (state.aptpl || before.aptpl);
    Ok(eff)
}

/// REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 5.12.7).
fn register(
    state: &mut PrState,
    nexus: &Nexus,
    p: &BasicParams,
    ignore_existing: bool,
    eff: &mut PrOutEffect,
) -> Result<(), PrOutError> {
    match state.index_of(nexus) {
        None => {
            if !ignore_existing && p.key != 0 {
                return Err(PrOutError::ReservationConflict);
            }
            if p.sark == 0 {
                // Unregistered nexus "unregistering": GOOD, nothing happens.
                return Ok(());
            }
            if state.registrations.len() >= MAX_REGISTRATIONS
                || nexus.initiator.is_empty()
                || nexus.initiator.len() > MAX_NAME_BYTES
            {
                return Err(
                    Sense::illegal_request(Asc::INSUFFICIENT_REGISTRATION_RESOURCES).into(),
                );
            }
            state.registrations.push(Registration {
                nexus: nexus.clone(),
                key: p.sark,
            });
        }
        Some(idx) => {
            let current = state.registrations.get(idx).map(|r| r.key);
            if !ignore_existing && current != Some(p.key) {
                return Err(PrOutError::ReservationConflict);
            }
            if p.sark == 0 {
                state.unregister(idx, eff);
            } else if let Some(r) = state.registrations.get_mut(idx) {
                r.key = p.sark;
            }
        }
    }
    state.aptpl = p.aptpl;
    state.bump_generation();
    Ok(())
}

/// PREEMPT / PREEMPT AND ABORT (SPC-4 5.12.11.4). Fills `abort_tasks_of` with every
/// nexus the SERVICE ACTION RESERVATION KEY identifies; the caller drops it for PREEMPT.
fn preempt(
    state: &mut PrState,
    nexus: &Nexus,
    p: &BasicParams,
    scope: u8,
    pr_type: u8,
    eff: &mut PrOutEffect,
) -> Result<(), PrOutError> {
    let sark = p.sark;
    let reservation = state.reservation.clone();
    // Removes every registration other than the sender's that `hit` selects, queueing
    // REGISTRATIONS PREEMPTED and recording the nexuses for PREEMPT AND ABORT.
    let remove_where = |state: &mut PrState, eff: &mut PrOutEffect, hit: &dyn Fn(u64) -> bool| {
        for r in state.registrations.iter().filter(|r| hit(r.key)) {
            eff.abort_tasks_of.push(r.nexus.clone());
            if &r.nexus != nexus {
                eff.unit_attentions
                    .push((r.nexus.clone(), Asc::REGISTRATIONS_PREEMPTED));
            }
        }
        state
            .registrations
            .retain(|r| &r.nexus == nexus || !hit(r.key));
    };
    let identifies_any = state.registrations.iter().any(|r| r.key == sark);
    match reservation {
        None => {
            if sark == 0 {
                return Err(Sense::invalid_field_in_parameter_list(8, None).into());
            }
            if !identifies_any {
                return Err(PrOutError::ReservationConflict);
            }
            remove_where(state, eff, &|k| k == sark);
        }
        Some(res) if res.pr_type.all_registrants() => {
            if sark == 0 {
                let ty = scope_type(scope, pr_type)?;
                remove_where(state, eff, &|_| true);
                state.reservation = Some(Reservation {
                    holder: (!ty.all_registrants()).then(|| nexus.clone()),
                    pr_type: ty,
                });
            } else {
                if !identifies_any {
                    return Err(PrOutError::ReservationConflict);
                }
                remove_where(state, eff, &|k| k == sark);
            }
        }
        Some(res) => {
            let holder_key = state.reservation_key().unwrap_or(0);
            if sark != 0 && sark == holder_key {
                let ty = scope_type(scope, pr_type)?;
                remove_where(state, eff, &|k| k == sark);
                state.reservation = Some(Reservation {
                    holder: (!ty.all_registrants()).then(|| nexus.clone()),
                    pr_type: ty,
                });
                // The survivors lose the old reservation's type (SPC-4 5.12.11.4.3).
                if ty != res.pr_type {
                    for r in state.registrations.iter().filter(|r| &r.nexus != nexus) {
                        eff.unit_attentions
                            .push((r.nexus.clone(), Asc::RESERVATIONS_RELEASED));
                    }
                }
            } else {
                if sark == 0 {
                    return Err(Sense::invalid_field_in_parameter_list(8, None).into());
                }
                if !identifies_any {
                    return Err(PrOutError::ReservationConflict);
                }
                remove_where(state, eff, &|k| k == sark);
            }
        }
    }
    state.bump_generation();
    Ok(())
}

/// REGISTER AND MOVE (SPC-4 5.12.8, parameter list §6.16.4).
fn register_and_move(
    state: &mut PrState,
    nexus: &Nexus,
    scope: u8,
    pr_type: u8,
    params: &[u8],
    param_len: u32,
) -> Result<(), PrOutError> {
    if param_len < 24 || params.len() < 24 || params.len() < param_len as usize {
        return Err(Sense::parameter_list_length_error().into());
    }
    let tid_len = be_u32(params, 20);
    if u64::from(tid_len) + 24 != u64::from(param_len) {
        return Err(Sense::parameter_list_length_error().into());
    }
    let ty = scope_type(scope, pr_type)?;
    // The moved reservation has one named holder: an all-registrants type cannot have one
    // (SPC-4 5.12.8), so such a TYPE is an invalid field.
    if ty.all_registrants() {
        return Err(Sense::invalid_field_in_cdb(2, Some(3)).into());
    }
    let key = be_u64(params, 0);
    let sark = be_u64(params, 8);
    let flags = params.get(17).copied().unwrap_or(0);
    let unreg = flags & 0x02 != 0;
    let aptpl = flags & 0x01 != 0;
    let rtpi = be_u16(params, 18);
    require_key(state, nexus, key)?;
    match &state.reservation {
        Some(res) if !res.pr_type.all_registrants() && res.holder.as_ref() == Some(nexus) => {}
        _ => return Err(PrOutError::ReservationConflict),
    }
    if sark == 0 {
        return Err(Sense::invalid_field_in_parameter_list(8, None).into());
    }
    if rtpi == 0 {
        return Err(Sense::invalid_field_in_parameter_list(18, None).into());
    }
    let tid = params.get(24..).unwrap_or(&[]);
    let dest = Nexus::from_transport_id(tid, rtpi)
        .ok_or_else(|| PrOutError::from(Sense::invalid_field_in_parameter_list(24, None)))?;
    if &dest == nexus {
        return Err(Sense::invalid_field_in_parameter_list(24, None).into());
    }
    if state.index_of(&dest).is_none() {
        if state.registrations.len() >= MAX_REGISTRATIONS {
            return Err(Sense::illegal_request(Asc::INSUFFICIENT_REGISTRATION_RESOURCES).into());
        }
        state.registrations.push(Registration {
            nexus: dest.clone(),
            key: sark,
        });
    }
    state.reservation = Some(Reservation {
        holder: Some(dest),
        pr_type: ty,
    });
    if unreg {
        state.registrations.retain(|r| &r.nexus != nexus);
    }
    state.aptpl = aptpl;
    state.bump_generation();
    Ok(())
}

mod access;
pub use access::{check_access, lun_reset, nexus_lost, release6, reserve6};

#[cfg(test)]
mod tests;
