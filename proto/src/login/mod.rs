//! Login: text keys, operational negotiation, CHAP, and the target login state machine.
//!
//! * [`text`]: parse and encode `key=value` data segments, value helpers.
//! * [`negotiate`]: operational key negotiation per RFC 7143 section 13.
//! * [`chap`]: CHAP-MD5, target and initiator side.
//! * [`target`]: the per-connection login state machine and the
//!   full-feature `SendTargets` helper.

pub mod chap;
pub mod negotiate;
pub mod target;
pub mod text;

pub use chap::{ChapCredentials, ChapEntropy, ChapError};
pub use negotiate::{SessionParams, SessionType, TargetLimits};
pub use target::{
    answer_text_request, Auth, DiscoveryTarget, LoginConfig, LoginOutcome, LoginRequest,
    LoginResponse, LoginResult, LoginStatus, LoginStep, Stage, TargetConfig, TargetLogin,
};
pub use text::{TextError, TextPair};
