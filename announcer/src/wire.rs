//! BGP-4 wire format: framing, code points, and the messages the session exchanges.
//!
//! OPEN messages (with their capabilities) are encoded and decoded through
//! `netgauze-bgp-pkt`. KEEPALIVE, NOTIFICATION and ROUTE-REFRESH are four-field messages
//! written here directly, because netgauze's typed NOTIFICATION enum does not keep unknown
//! codes and we want the raw `(code, subcode, data)` triple for status text. UPDATEs are
//! hand-encoded in [`crate::update`] (hot path) and inspected there per RFC 7606, because
//! netgauze's lenient mode does not classify errors into treat-as-withdraw / attribute
//! discard / session reset.

use std::fmt;
use std::net::Ipv4Addr;

use netgauze_bgp_pkt::capabilities::{
    BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::notification::OpenMessageError;
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::wire::deserializer::open::BgpOpenMessageParsingError;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use netgauze_parse_utils::WritablePdu;

/// Length of the fixed header: 16-byte marker, 2-byte length, 1-byte type.
pub const HEADER_LEN: usize = 19;
/// Maximum message size without RFC 8654.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Maximum message size with RFC 8654 extended messages (OPEN and KEEPALIVE stay at 4096).
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;
/// `AS_TRANS` (RFC 6793): stands in for a 4-octet AS in 2-octet fields.
pub const AS_TRANS: u16 = 23456;

macro_rules! code_points {
    ($(#[$m:meta])* $name:ident($ty:ty) { $($(#[$cm:meta])* $c:ident = $v:expr => $s:expr,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $ty);
        impl $name {
            $($(#[$cm])* pub const $c: Self = Self($v);)*
            /// The registered name, if this code point is known.
            pub fn name(self) -> Option<&'static str> {
                match self { $(Self::$c => Some($s),)* _ => None }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }
        /// The registered (RFC) name, else the type and value in hex.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

code_points! {
    /// BGP message type (RFC 4271 §4.1).
    MessageType(u8) {
        OPEN = 1 => "OPEN",
        UPDATE = 2 => "UPDATE",
        NOTIFICATION = 3 => "NOTIFICATION",
        KEEPALIVE = 4 => "KEEPALIVE",
        ROUTE_REFRESH = 5 => "ROUTE-REFRESH",
    }
}

code_points! {
    /// Path attribute type code.
    AttrType(u8) {
        ORIGIN = 1 => "ORIGIN",
        AS_PATH = 2 => "AS_PATH",
        NEXT_HOP = 3 => "NEXT_HOP",
        MULTI_EXIT_DISC = 4 => "MULTI_EXIT_DISC",
        LOCAL_PREF = 5 => "LOCAL_PREF",
        ATOMIC_AGGREGATE = 6 => "ATOMIC_AGGREGATE",
        AGGREGATOR = 7 => "AGGREGATOR",
        COMMUNITIES = 8 => "COMMUNITIES",
        ORIGINATOR_ID = 9 => "ORIGINATOR_ID",
        CLUSTER_LIST = 10 => "CLUSTER_LIST",
        MP_REACH_NLRI = 14 => "MP_REACH_NLRI",
        MP_UNREACH_NLRI = 15 => "MP_UNREACH_NLRI",
        EXTENDED_COMMUNITIES = 16 => "EXTENDED_COMMUNITIES",
        AS4_PATH = 17 => "AS4_PATH",
        AS4_AGGREGATOR = 18 => "AS4_AGGREGATOR",
        LARGE_COMMUNITIES = 32 => "LARGE_COMMUNITIES",
    }
}

code_points! {
    /// NOTIFICATION error code (RFC 4271 §4.5).
    ErrorCode(u8) {
        MESSAGE_HEADER = 1 => "Message Header Error",
        OPEN_MESSAGE = 2 => "OPEN Message Error",
        UPDATE_MESSAGE = 3 => "UPDATE Message Error",
        HOLD_TIMER_EXPIRED = 4 => "Hold Timer Expired",
        FSM = 5 => "Finite State Machine Error",
        CEASE = 6 => "Cease",
        ROUTE_REFRESH = 7 => "ROUTE-REFRESH Message Error",
    }
}

/// Path attribute flag bits.
pub mod attr_flags {
    /// Optional (vs well-known).
    pub const OPTIONAL: u8 = 0x80;
    /// Transitive.
    pub const TRANSITIVE: u8 = 0x40;
    /// Partial.
    pub const PARTIAL: u8 = 0x20;
    /// Two-octet attribute length.
    pub const EXTENDED_LENGTH: u8 = 0x10;
}

code_points! {
    /// Message Header Error subcodes (RFC 4271 §6.1).
    HeaderSubcode(u8) {
        /// The marker is not all ones.
        CONNECTION_NOT_SYNCHRONIZED = 1 => "Connection Not Synchronized",
        /// The length field is out of range for the message type.
        BAD_MESSAGE_LENGTH = 2 => "Bad Message Length",
        /// Unknown message type.
        BAD_MESSAGE_TYPE = 3 => "Bad Message Type",
    }
}

code_points! {
    /// OPEN Message Error subcodes (RFC 4271 §6.2, RFC 5492, RFC 9234).
    OpenSubcode(u8) {
        /// No specific reason.
        UNSPECIFIC = 0 => "Unspecific",
        /// Not BGP-4.
        UNSUPPORTED_VERSION_NUMBER = 1 => "Unsupported Version Number",
        /// The peer's AS is not the configured one.
        BAD_PEER_AS = 2 => "Bad Peer AS",
        /// Zero, or our own identifier over iBGP.
        BAD_BGP_IDENTIFIER = 3 => "Bad BGP Identifier",
        /// An optional parameter we do not know.
        UNSUPPORTED_OPTIONAL_PARAMETER = 4 => "Unsupported Optional Parameter",
        /// Hold time 1 or 2.
        UNACCEPTABLE_HOLD_TIME = 6 => "Unacceptable Hold Time",
        /// A required capability is missing (RFC 5492).
        UNSUPPORTED_CAPABILITY = 7 => "Unsupported Capability",
        /// BGP roles do not fit (RFC 9234).
        ROLE_MISMATCH = 11 => "Role Mismatch",
    }
}

code_points! {
    /// UPDATE Message Error subcodes (RFC 4271 §6.3).
    UpdateSubcode(u8) {
        /// The attribute list cannot be parsed.
        MALFORMED_ATTRIBUTE_LIST = 1 => "Malformed Attribute List",
        /// A well-known attribute we do not know.
        UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE = 2 => "Unrecognized Well-known Attribute",
        /// ORIGIN, AS_PATH or NEXT_HOP is missing.
        MISSING_WELL_KNOWN_ATTRIBUTE = 3 => "Missing Well-known Attribute",
        /// Flags contradict the attribute type.
        ATTRIBUTE_FLAGS_ERROR = 4 => "Attribute Flags Error",
        /// Length contradicts the attribute type.
        ATTRIBUTE_LENGTH_ERROR = 5 => "Attribute Length Error",
        /// ORIGIN value out of range.
        INVALID_ORIGIN_ATTRIBUTE = 6 => "Invalid ORIGIN Attribute",
        /// NEXT_HOP is not a usable address.
        INVALID_NEXT_HOP_ATTRIBUTE = 8 => "Invalid NEXT_HOP Attribute",
        /// An optional attribute is malformed.
        OPTIONAL_ATTRIBUTE_ERROR = 9 => "Optional Attribute Error",
        /// NLRI that cannot be parsed.
        INVALID_NETWORK_FIELD = 10 => "Invalid Network Field",
        /// AS_PATH cannot be parsed.
        MALFORMED_AS_PATH = 11 => "Malformed AS_PATH",
    }
}

code_points! {
    /// Finite State Machine Error subcodes (RFC 6608).
    FsmSubcode(u8) {
        /// No specific state.
        UNSPECIFIED = 0 => "Unspecified Error",
        /// A message other than OPEN/NOTIFICATION in OpenSent.
        UNEXPECTED_IN_OPENSENT = 1 => "Receive Unexpected Message in OpenSent State",
        /// A message other than KEEPALIVE/NOTIFICATION in OpenConfirm.
        UNEXPECTED_IN_OPENCONFIRM = 2 => "Receive Unexpected Message in OpenConfirm State",
        /// An OPEN in Established.
        UNEXPECTED_IN_ESTABLISHED = 3 => "Receive Unexpected Message in Established State",
    }
}

code_points! {
    /// Cease subcodes (RFC 4486, RFC 8538, RFC 9384).
    CeaseSubcode(u8) {
        /// A prefix limit was exceeded.
        MAXIMUM_NUMBER_OF_PREFIXES_REACHED = 1 => "Maximum Number of Prefixes Reached",
        /// The session was turned off (may carry a shutdown communication, RFC 9003).
        ADMINISTRATIVE_SHUTDOWN = 2 => "Administrative Shutdown",
        /// The peer was removed from the configuration.
        PEER_DE_CONFIGURED = 3 => "Peer De-configured",
        /// The session restarts, e.g. with new configuration (may carry a communication).
        ADMINISTRATIVE_RESET = 4 => "Administrative Reset",
        /// The connection is not wanted now.
        CONNECTION_REJECTED = 5 => "Connection Rejected",
        /// Some other configuration changed.
        OTHER_CONFIGURATION_CHANGE = 6 => "Other Configuration Change",
        /// The other connection of a collision won (RFC 4271 §6.8).
        CONNECTION_COLLISION_RESOLUTION = 7 => "Connection Collision Resolution",
        /// Out of memory or similar.
        OUT_OF_RESOURCES = 8 => "Out of Resources",
        /// Graceful restart state must be flushed (RFC 8538).
        HARD_RESET = 9 => "Hard Reset",
        /// BFD declared the peer down (RFC 9384).
        BFD_DOWN = 10 => "BFD Down",
    }
}

code_points! {
    /// ROUTE-REFRESH Message Error subcodes (RFC 7313).
    RouteRefreshSubcode(u8) {
        /// The message length is wrong.
        INVALID_MESSAGE_LENGTH = 1 => "Invalid Message Length",
    }
}

/// A subcode type that belongs to one NOTIFICATION error code.
pub trait Subcode: Copy + fmt::Display {
    /// The error code these subcodes qualify.
    const CODE: ErrorCode;
    /// The subcode's value on the wire.
    fn value(self) -> u8;
    /// The subcode with this wire value.
    fn from_value(value: u8) -> Self;
}

macro_rules! subcode_of {
    ($($ty:ident => $code:ident,)*) => {$(
        impl Subcode for $ty {
            const CODE: ErrorCode = ErrorCode::$code;
            fn value(self) -> u8 {
                self.0
            }
            fn from_value(value: u8) -> Self {
                $ty(value)
            }
        }
    )*};
}

subcode_of! {
    HeaderSubcode => MESSAGE_HEADER,
    OpenSubcode => OPEN_MESSAGE,
    UpdateSubcode => UPDATE_MESSAGE,
    FsmSubcode => FSM,
    CeaseSubcode => CEASE,
    RouteRefreshSubcode => ROUTE_REFRESH,
}

/// An address family this speaker can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// AFI 1, SAFI 1.
    Ipv4Unicast,
    /// AFI 2, SAFI 1.
    Ipv6Unicast,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::Ipv4Unicast, Family::Ipv6Unicast];

    /// Address Family Identifier.
    pub fn afi(self) -> u16 {
        match self {
            Family::Ipv4Unicast => 1,
            Family::Ipv6Unicast => 2,
        }
    }

    /// Subsequent Address Family Identifier (unicast).
    pub fn safi(self) -> u8 {
        1
    }

    /// The family for an AFI/SAFI pair, if we carry it.
    pub fn from_afi_safi(afi: u16, safi: u8) -> Option<Family> {
        match (afi, safi) {
            (1, 1) => Some(Family::Ipv4Unicast),
            (2, 1) => Some(Family::Ipv6Unicast),
            _ => None,
        }
    }

    /// The family of a prefix.
    pub fn of(prefix: &ipnet::IpNet) -> Family {
        match prefix {
            ipnet::IpNet::V4(_) => Family::Ipv4Unicast,
            ipnet::IpNet::V6(_) => Family::Ipv6Unicast,
        }
    }

    fn address_type(self) -> AddressType {
        match self {
            Family::Ipv4Unicast => AddressType::Ipv4Unicast,
            Family::Ipv6Unicast => AddressType::Ipv6Unicast,
        }
    }

    /// Index into per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Family::Ipv4Unicast => 0,
            Family::Ipv6Unicast => 1,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4Unicast => "ipv4-unicast",
            Family::Ipv6Unicast => "ipv6-unicast",
        })
    }
}

/// A NOTIFICATION message. Its `Display` is the status text ("OPEN Message Error / Bad Peer AS").
#[derive(Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code.
    pub code: ErrorCode,
    /// Error subcode (0 = unspecific).
    pub subcode: u8,
    /// Diagnostic data.
    pub data: Vec<u8>,
}

impl Notification {
    /// A NOTIFICATION with the given code, subcode and data.
    pub fn new(code: ErrorCode, subcode: u8, data: impl Into<Vec<u8>>) -> Self {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }

    /// A NOTIFICATION with a typed subcode (the error code follows from its type).
    pub fn of<S: Subcode>(subcode: S, data: impl Into<Vec<u8>>) -> Self {
        Self::new(S::CODE, subcode.value(), data)
    }

    /// UPDATE Message Error with a subcode and no data.
    pub fn update(subcode: UpdateSubcode) -> Self {
        Self::of(subcode, Vec::new())
    }

    /// Cease with a subcode and no data.
    pub fn cease(subcode: CeaseSubcode) -> Self {
        Self::of(subcode, Vec::new())
    }

    /// The subcode as `S`, when this NOTIFICATION has `S`'s error code.
    pub fn subcode_as<S: Subcode>(&self) -> Option<S> {
        (self.code == S::CODE).then(|| S::from_value(self.subcode))
    }

    /// Registered name of the subcode, if known.
    pub fn subcode_name(&self) -> Option<&'static str> {
        let v = self.subcode;
        match self.code {
            ErrorCode::MESSAGE_HEADER => HeaderSubcode(v).name(),
            // Subcode 0 is "unspecific" for every code but FSM (RFC 6608 names it).
            ErrorCode::OPEN_MESSAGE if v != 0 => OpenSubcode(v).name(),
            ErrorCode::UPDATE_MESSAGE => UpdateSubcode(v).name(),
            ErrorCode::FSM if v != 0 => FsmSubcode(v).name(),
            ErrorCode::CEASE => CeaseSubcode(v).name(),
            ErrorCode::ROUTE_REFRESH => RouteRefreshSubcode(v).name(),
            _ => None,
        }
    }

    /// Encode as a full message.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = begin_message(out, MessageType::NOTIFICATION);
        out.push(self.code.0);
        out.push(self.subcode);
        // The data is truncated so the message always fits in 4096 bytes.
        let room = MAX_MESSAGE_LEN - HEADER_LEN - 2;
        out.extend_from_slice(&self.data[..self.data.len().min(room)]);
        finish_message(out, start);
    }

    /// Decode a NOTIFICATION body (after the header).
    ///
    /// # Errors
    /// A body shorter than two bytes is a Bad Message Length.
    pub fn decode(body: &[u8]) -> Result<Self, Notification> {
        match body {
            [code, subcode, data @ ..] => Ok(Notification::new(ErrorCode(*code), *subcode, data)),
            _ => Err(bad_length(body.len() + HEADER_LEN)),
        }
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code.name() {
            Some(n) => f.write_str(n)?,
            None => write!(f, "Error code {}", self.code.0)?,
        }
        match self.subcode_name() {
            Some(s) => write!(f, " / {s}")?,
            None if self.subcode != 0 => write!(f, " / subcode {}", self.subcode)?,
            None => {}
        }
        // RFC 8203/9003 shutdown communication: a length byte then UTF-8 text.
        let reason = self.subcode_as::<CeaseSubcode>();
        if matches!(
            reason,
            Some(CeaseSubcode::ADMINISTRATIVE_SHUTDOWN | CeaseSubcode::ADMINISTRATIVE_RESET)
        ) {
            if let Some((&len, rest)) = self.data.split_first() {
                if let Some(text) = rest.get(..len as usize) {
                    if let Ok(text) = std::str::from_utf8(text) {
                        if !text.is_empty() {
                            write!(f, ": {text:?}")?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Notification({self}")?;
        if !self.data.is_empty() {
            write!(f, ", data={}", hex(&self.data))?;
        }
        f.write_str(")")
    }
}

/// Lowercase hex, for diagnostics and test diffs.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn bad_length(len: usize) -> Notification {
    Notification::of(
        HeaderSubcode::BAD_MESSAGE_LENGTH,
        (len.min(u16::MAX as usize) as u16).to_be_bytes(),
    )
}

/// Bounds-checked reader over untrusted bytes.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

/// The input ended before a field did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated;

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// The unread bytes.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
    /// Take `n` bytes.
    ///
    /// # Errors
    /// [`Truncated`] when fewer remain.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.buf.len() {
            return Err(Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    /// A reader over the next `n` bytes, which this reader skips.
    ///
    /// # Errors
    /// [`Truncated`] when fewer remain.
    pub fn sub(&mut self, n: usize) -> Result<Reader<'a>, Truncated> {
        self.take(n).map(Reader::new)
    }
    /// One byte.
    ///
    /// # Errors
    /// [`Truncated`] at the end.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }
    /// Big-endian u16.
    ///
    /// # Errors
    /// [`Truncated`] at the end.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// Big-endian u32.
    ///
    /// # Errors
    /// [`Truncated`] at the end.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Write a header with a length placeholder; returns the message start for [`finish_message`].
pub(crate) fn begin_message(out: &mut Vec<u8>, ty: MessageType) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0]);
    out.push(ty.0);
    start
}

/// Patch the length placeholder of the message that began at `start`.
pub(crate) fn finish_message(out: &mut [u8], start: usize) {
    let len = out.len() - start;
    debug_assert!(len <= MAX_EXTENDED_MESSAGE_LEN);
    out[start + 16..start + 18].copy_from_slice(&(len as u16).to_be_bytes());
}

/// The declared length of the message at the start of `buf`, once its header is complete.
///
/// Framing only: the marker and the length bounds are checked by [`decode`].
pub fn message_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    Some(u16::from_be_bytes([buf[16], buf[17]]) as usize)
}

/// Encode a KEEPALIVE.
pub fn encode_keepalive(out: &mut Vec<u8>) {
    let start = begin_message(out, MessageType::KEEPALIVE);
    finish_message(out, start);
}

/// Encode a ROUTE-REFRESH request (RFC 2918) for a family.
pub fn encode_route_refresh(out: &mut Vec<u8>, family: Family) {
    let start = begin_message(out, MessageType::ROUTE_REFRESH);
    out.extend_from_slice(&family.afi().to_be_bytes());
    out.push(0);
    out.push(family.safi());
    finish_message(out, start);
}

/// Graceful restart capability content (RFC 4724).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GracefulRestartCap {
    /// Restart State (R) bit: the sender has restarted.
    pub restarting: bool,
    /// Restart Time in seconds (12 bits).
    pub restart_time: u16,
    /// Families with their Forwarding State (F) bit.
    pub families: Vec<(Family, bool)>,
}

/// The capabilities an OPEN carries that this speaker understands.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// RFC 4760 multiprotocol families.
    pub families: Vec<Family>,
    /// RFC 6793: the 4-octet AS, when the capability is present.
    pub four_octet_as: Option<u32>,
    /// RFC 2918 route refresh (or the pre-standard Cisco code point).
    pub route_refresh: bool,
    /// RFC 7313 enhanced route refresh.
    pub enhanced_route_refresh: bool,
    /// RFC 4724 graceful restart.
    pub graceful_restart: Option<GracefulRestartCap>,
    /// RFC 8654 extended messages.
    pub extended_message: bool,
    /// Whether any multiprotocol capability was present (if none, IPv4 unicast is implied).
    pub any_multiprotocol: bool,
    /// Capability codes we do not act on, kept for status.
    pub other: Vec<u8>,
}

/// An OPEN message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The 2-octet My Autonomous System field.
    pub my_as: u16,
    /// Proposed hold time in seconds.
    pub hold_time: u16,
    /// BGP Identifier.
    pub router_id: Ipv4Addr,
    /// Capabilities.
    pub capabilities: Capabilities,
}

impl Open {
    /// The sender's AS: the 4-octet capability when present, else `my_as`.
    pub fn peer_as(&self) -> u32 {
        self.capabilities
            .four_octet_as
            .unwrap_or(u32::from(self.my_as))
    }

    /// Encode through netgauze.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let c = &self.capabilities;
        let mut caps: Vec<BgpCapability> = Vec::new();
        for f in &c.families {
            caps.push(BgpCapability::MultiProtocolExtensions(
                MultiProtocolExtensionsCapability::new(f.address_type()),
            ));
        }
        if c.route_refresh {
            caps.push(BgpCapability::RouteRefresh);
        }
        if c.enhanced_route_refresh {
            caps.push(BgpCapability::EnhancedRouteRefresh);
        }
        if c.extended_message {
            caps.push(BgpCapability::ExtendedMessage);
        }
        if let Some(gr) = &c.graceful_restart {
            let afs: Vec<GracefulRestartAddressFamily> = gr
                .families
                .iter()
                .map(|(f, fwd)| GracefulRestartAddressFamily::new(*fwd, f.address_type()))
                .collect();
            caps.push(BgpCapability::GracefulRestartCapability(
                GracefulRestartCapability::new(gr.restarting, false, gr.restart_time & 0x0fff, afs),
            ));
        }
        if let Some(asn) = c.four_octet_as {
            caps.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(asn)));
        }
        // One capability per optional parameter is what most speakers send; netgauze
        // writes a parameter per capability when given one-element lists.
        let params: Vec<BgpOpenMessageParameter> = caps
            .into_iter()
            .map(|cap| BgpOpenMessageParameter::new_capabilities(vec![cap]))
            .collect();
        let msg = BgpMessage::Open(BgpOpenMessage::new(
            self.my_as,
            self.hold_time,
            self.router_id,
            params,
        ));
        // An OPEN with our handful of capabilities is far below 4096 bytes and writing to a
        // Vec cannot fail; an error here is a programming bug.
        if let Err(e) = msg.write(out) {
            debug_assert!(false, "OPEN encoding failed: {e}");
        }
    }

    /// Decode an OPEN body (after the 19-byte header) through netgauze.
    ///
    /// # Errors
    /// The NOTIFICATION to send (OPEN Message Error with the RFC 4271 subcode).
    pub fn decode(body: &[u8]) -> Result<Open, Notification> {
        // Lenient on capabilities: an unknown or malformed capability is skipped, never fatal.
        let mut ctx = BgpParsingContext::new(
            true,
            Default::default(),
            Default::default(),
            true,
            true,
            false,
            true,
        );
        let mut cur = SliceReader::new(body);
        let open = BgpOpenMessage::parse(&mut cur, &mut ctx).map_err(open_error)?;
        if !cur.is_empty() {
            return Err(Notification::of(OpenSubcode::UNSPECIFIC, Vec::new()));
        }
        let mut c = Capabilities::default();
        for cap in open.capabilities() {
            match cap {
                BgpCapability::MultiProtocolExtensions(mp) => {
                    c.any_multiprotocol = true;
                    let f = match mp.address_type() {
                        AddressType::Ipv4Unicast => Some(Family::Ipv4Unicast),
                        AddressType::Ipv6Unicast => Some(Family::Ipv6Unicast),
                        _ => None,
                    };
                    if let Some(f) = f {
                        if !c.families.contains(&f) {
                            c.families.push(f);
                        }
                    }
                }
                BgpCapability::RouteRefresh | BgpCapability::CiscoRouteRefresh => {
                    c.route_refresh = true
                }
                BgpCapability::EnhancedRouteRefresh => c.enhanced_route_refresh = true,
                BgpCapability::ExtendedMessage => c.extended_message = true,
                BgpCapability::FourOctetAs(a) => c.four_octet_as = Some(a.asn4()),
                BgpCapability::GracefulRestartCapability(gr) => {
                    let families = gr
                        .address_families()
                        .iter()
                        .filter_map(|af| {
                            let f = match af.address_type() {
                                AddressType::Ipv4Unicast => Family::Ipv4Unicast,
                                AddressType::Ipv6Unicast => Family::Ipv6Unicast,
                                _ => return None,
                            };
                            Some((f, af.forwarding_state()))
                        })
                        .collect();
                    c.graceful_restart = Some(GracefulRestartCap {
                        restarting: gr.restart(),
                        restart_time: gr.time(),
                        families,
                    });
                }
                other => {
                    let code = match other.code() {
                        Ok(code) => code as u8,
                        Err(code) => code,
                    };
                    c.other.push(code);
                }
            }
        }
        Ok(Open {
            my_as: open.my_as(),
            hold_time: open.hold_time(),
            router_id: open.bgp_id(),
            capabilities: c,
        })
    }
}

fn open_error(e: BgpOpenMessageParsingError) -> Notification {
    let (subcode, data) = match OpenMessageError::from(e) {
        OpenMessageError::Unspecific { value } => (OpenSubcode::UNSPECIFIC, value),
        OpenMessageError::UnsupportedVersionNumber { value } => {
            (OpenSubcode::UNSUPPORTED_VERSION_NUMBER, value)
        }
        OpenMessageError::BadPeerAs { value } => (OpenSubcode::BAD_PEER_AS, value),
        OpenMessageError::BadBgpIdentifier { value } => (OpenSubcode::BAD_BGP_IDENTIFIER, value),
        OpenMessageError::UnsupportedOptionalParameter { value } => {
            (OpenSubcode::UNSUPPORTED_OPTIONAL_PARAMETER, value)
        }
        OpenMessageError::UnacceptableHoldTime { value } => {
            (OpenSubcode::UNACCEPTABLE_HOLD_TIME, value)
        }
        OpenMessageError::UnsupportedCapability { value } => {
            (OpenSubcode::UNSUPPORTED_CAPABILITY, value)
        }
        OpenMessageError::RoleMismatch { value } => (OpenSubcode::ROLE_MISMATCH, value),
    };
    Notification::of(subcode, data.into_vec())
}

/// A framed, header-checked message; UPDATE bodies are left for [`crate::update::inspect`].
#[derive(Debug)]
pub enum Message<'a> {
    /// OPEN.
    Open(Open),
    /// UPDATE body (after the header).
    Update(&'a [u8]),
    /// NOTIFICATION.
    Notification(Notification),
    /// KEEPALIVE.
    Keepalive,
    /// ROUTE-REFRESH with AFI, message subtype (RFC 7313) and SAFI.
    RouteRefresh {
        /// AFI.
        afi: u16,
        /// 0 = request, 1 = BoRR, 2 = EoRR.
        subtype: u8,
        /// SAFI.
        safi: u8,
    },
}

/// Decode one complete message (`msg.len()` equals its declared length).
///
/// `max_len` is 4096, or 65535 once extended messages are negotiated.
///
/// # Errors
/// The NOTIFICATION the session must send.
pub fn decode(msg: &[u8], max_len: usize) -> Result<Message<'_>, Notification> {
    let mut r = Reader::new(msg);
    let marker = r.take(16).map_err(|_| bad_length(msg.len()))?;
    if marker.iter().any(|&b| b != 0xff) {
        return Err(Notification::of(
            HeaderSubcode::CONNECTION_NOT_SYNCHRONIZED,
            Vec::new(),
        ));
    }
    let len = r.u16().map_err(|_| bad_length(msg.len()))? as usize;
    let ty = MessageType(r.u8().map_err(|_| bad_length(msg.len()))?);
    if len != msg.len() || !(HEADER_LEN..=max_len).contains(&len) {
        return Err(bad_length(len));
    }
    let body = r.rest();
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(bad_length(len))
        }
    };
    match ty {
        MessageType::OPEN => {
            if !(29..=MAX_MESSAGE_LEN).contains(&len) {
                return Err(bad_length(len));
            }
            Open::decode(body).map(Message::Open)
        }
        MessageType::UPDATE => {
            if len < 23 {
                return Err(bad_length(len));
            }
            Ok(Message::Update(body))
        }
        MessageType::NOTIFICATION => Notification::decode(body).map(Message::Notification),
        MessageType::KEEPALIVE => exact(0).map(|()| Message::Keepalive),
        MessageType::ROUTE_REFRESH => {
            if body.len() != 4 {
                return Err(Notification::of(
                    RouteRefreshSubcode::INVALID_MESSAGE_LENGTH,
                    msg.to_vec(),
                ));
            }
            Ok(Message::RouteRefresh {
                afi: u16::from_be_bytes([body[0], body[1]]),
                subtype: body[2],
                safi: body[3],
            })
        }
        other => Err(Notification::of(
            HeaderSubcode::BAD_MESSAGE_TYPE,
            vec![other.0],
        )),
    }
}
