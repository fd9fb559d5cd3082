//! SCSI: CDB decoding, sense data, INQUIRY/VPD/mode page builders.
//!
//! Everything here is pure: decoders turn CDB / parameter-list bytes into typed values
//! or [`Sense`], and builders turn a [`LunInfo`] (plus per-LUN [`ModeState`]) into the
//! full Data-In payload. Truncating a payload to the ALLOCATION LENGTH is the caller's
//! job, as is checking LBAs against the LUN's capacity.

pub mod capacity;
pub mod cdb;
pub mod inquiry;
pub mod lun_info;
pub mod mode;
pub mod pr;
pub mod report_luns;
pub mod rsoc;
pub mod rtpg;
pub mod sense;
pub mod status;
pub mod xcopy;

pub use capacity::{read_capacity10, read_capacity16};
pub use cdb::{cdb_len, decode, CdbError, CdbSize, Command, ModeSenseCdb, Rw};
pub use inquiry::{standard_inquiry, vpd_page};
pub use lun_info::LunInfo;
pub use mode::{mode_select, mode_sense, ModeState};
pub use report_luns::{decode_lun, encode_lun, report_luns};
pub use rsoc::{report_supported_opcodes, Filter, OpcodeInfo, SUPPORTED_OPCODES};
pub use rtpg::{report_target_port_groups, AluaState, PortGroup};
pub use sense::{Asc, FieldPointer, Sense, SenseBytes, SenseFormat, SenseKey, SenseKeySpecific};
