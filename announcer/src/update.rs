//! UPDATE messages: fast outbound packing and RFC 7606 inbound inspection.
//!
//! Outbound UPDATEs are hand-encoded: the attribute block for a group of prefixes is
//! built once, then NLRI bytes are appended until the message is full. This keeps the
//! 100k-prefix push to a few milliseconds (netgauze would allocate a typed value per
//! prefix). Inbound UPDATEs are only inspected — Portico imports nothing — so the inspector
//! validates framing and attributes, counts prefixes and classifies errors per RFC 7606.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::wire::{
    attr_flags, begin_message, finish_message, AttrType, Family, MessageType, Notification, Reader,
    UpdateSubcode, AS_TRANS, HEADER_LEN,
};

/// A large community (RFC 8092).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    /// Global administrator (an ASN).
    pub global_admin: u32,
    /// First local data part.
    pub local_data1: u32,
    /// Second local data part.
    pub local_data2: u32,
}

/// The attributes a route is announced with that are chosen per route (ORIGIN, AS_PATH
/// and NEXT_HOP are derived from the session).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct RouteAttrs {
    /// MULTI_EXIT_DISC.
    pub med: Option<u32>,
    /// LOCAL_PREF; sent to iBGP peers only (100 when unset).
    pub local_pref: Option<u32>,
    /// COMMUNITIES (RFC 1997), as `asn << 16 | value`.
    pub communities: Vec<u32>,
    /// LARGE_COMMUNITIES.
    pub large_communities: Vec<LargeCommunity>,
}

/// Default LOCAL_PREF for iBGP announcements without one.
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// What the session negotiated that shapes an outbound UPDATE.
#[derive(Clone, Debug)]
pub struct EncodeContext {
    /// Our AS.
    pub local_as: u32,
    /// iBGP (same AS): empty AS_PATH, LOCAL_PREF sent.
    pub ibgp: bool,
    /// The peer supports 4-octet AS numbers.
    pub four_octet_as: bool,
    /// NEXT_HOP for IPv4 prefixes.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// MP_REACH next hop for IPv6 prefixes.
    pub next_hop_v6: Option<Ipv6Addr>,
    /// Maximum message size (4096, or 65535 with extended messages).
    pub max_len: usize,
}

/// No next hop is known for a family, so its prefixes cannot be announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoNextHop(pub Family);

fn put_attr_header(out: &mut Vec<u8>, flags: u8, ty: AttrType, len: usize) {
    if len > 255 {
        out.push(flags | attr_flags::EXTENDED_LENGTH);
        out.push(ty.0);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(flags);
        out.push(ty.0);
        out.push(len as u8);
    }
}

/// ORIGIN, AS_PATH (and AS4_PATH), MED, LOCAL_PREF, COMMUNITIES, LARGE_COMMUNITIES.
fn common_attrs(ctx: &EncodeContext, attrs: &RouteAttrs, out: &mut Vec<u8>) {
    const WELL_KNOWN: u8 = attr_flags::TRANSITIVE;
    const OPT_TRANS: u8 = attr_flags::OPTIONAL | attr_flags::TRANSITIVE;
    put_attr_header(out, WELL_KNOWN, AttrType::ORIGIN, 1);
    out.push(0); // IGP
    let mut as4_path = false;
    if ctx.ibgp {
        put_attr_header(out, WELL_KNOWN, AttrType::AS_PATH, 0);
    } else if ctx.four_octet_as {
        put_attr_header(out, WELL_KNOWN, AttrType::AS_PATH, 6);
        out.extend_from_slice(&[2, 1]); // AS_SEQUENCE of one
        out.extend_from_slice(&ctx.local_as.to_be_bytes());
    } else {
        put_attr_header(out, WELL_KNOWN, AttrType::AS_PATH, 4);
        out.extend_from_slice(&[2, 1]);
        let two = u16::try_from(ctx.local_as).unwrap_or(AS_TRANS);
        as4_path = ctx.local_as > u32::from(u16::MAX);
        out.extend_from_slice(&two.to_be_bytes());
    }
    if let Some(med) = attrs.med {
        put_attr_header(out, attr_flags::OPTIONAL, AttrType::MULTI_EXIT_DISC, 4);
        out.extend_from_slice(&med.to_be_bytes());
    }
    if ctx.ibgp {
        put_attr_header(out, WELL_KNOWN, AttrType::LOCAL_PREF, 4);
        let lp = attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF);
        out.extend_from_slice(&lp.to_be_bytes());
    }
    if !attrs.communities.is_empty() {
        put_attr_header(
            out,
            OPT_TRANS,
            AttrType::COMMUNITIES,
            attrs.communities.len() * 4,
        );
        for c in &attrs.communities {
            out.extend_from_slice(&c.to_be_bytes());
        }
    }
    if as4_path {
        put_attr_header(out, OPT_TRANS, AttrType::AS4_PATH, 6);
        out.extend_from_slice(&[2, 1]);
        out.extend_from_slice(&ctx.local_as.to_be_bytes());
    }
    if !attrs.large_communities.is_empty() {
        let len = attrs.large_communities.len() * 12;
        put_attr_header(out, OPT_TRANS, AttrType::LARGE_COMMUNITIES, len);
        for lc in &attrs.large_communities {
            out.extend_from_slice(&lc.global_admin.to_be_bytes());
            out.extend_from_slice(&lc.local_data1.to_be_bytes());
            out.extend_from_slice(&lc.local_data2.to_be_bytes());
        }
    }
}

/// Encoded size of a prefix in NLRI: length byte plus the significant octets.
#[inline]
fn prefix_wire_len(p: &IpNet) -> usize {
    1 + (p.prefix_len() as usize).div_ceil(8)
}

#[inline]
fn put_prefix(out: &mut Vec<u8>, p: &IpNet) {
    let n = (p.prefix_len() as usize).div_ceil(8);
    out.push(p.prefix_len());
    match p {
        IpNet::V4(v4) => out.extend_from_slice(&v4.network().octets()[..n]),
        IpNet::V6(v6) => out.extend_from_slice(&v6.network().octets()[..n]),
    }
}

/// Append as many prefixes from `prefixes` as fit in `room` bytes; returns how many.
#[inline]
fn put_prefixes(out: &mut Vec<u8>, prefixes: &[IpNet], room: usize) -> usize {
    let mut used = 0;
    let mut count = 0;
    for p in prefixes {
        let l = prefix_wire_len(p);
        if used + l > room {
            break;
        }
        put_prefix(out, p);
        used += l;
        count += 1;
    }
    count
}

/// Encode announcements of `prefixes` (all of one family) sharing `attrs`, packed into as
/// few UPDATEs as `ctx.max_len` allows. Returns the number of messages written.
///
/// # Errors
/// [`NoNextHop`] when the context has no next hop for the family; nothing is written.
pub fn encode_announcements(
    ctx: &EncodeContext,
    family: Family,
    attrs: &RouteAttrs,
    prefixes: &[IpNet],
    out: &mut Vec<u8>,
) -> Result<usize, NoNextHop> {
    let mut block = Vec::with_capacity(128);
    common_attrs(ctx, attrs, &mut block);
    let mut messages = 0;
    let mut rest = prefixes;
    match family {
        Family::Ipv4Unicast => {
            let nh = ctx.next_hop_v4.ok_or(NoNextHop(family))?;
            put_attr_header(&mut block, attr_flags::TRANSITIVE, AttrType::NEXT_HOP, 4);
            block.extend_from_slice(&nh.octets());
            let room = ctx.max_len - HEADER_LEN - 4 - block.len();
            while !rest.is_empty() {
                let start = begin_message(out, MessageType::UPDATE);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&(block.len() as u16).to_be_bytes());
                out.extend_from_slice(&block);
                let n = put_prefixes(out, rest, room);
                if n == 0 {
                    // Cannot happen for valid max_len; never loop forever.
                    out.truncate(start);
                    break;
                }
                finish_message(out, start);
                rest = &rest[n..];
                messages += 1;
            }
        }
        Family::Ipv6Unicast => {
            let nh = ctx.next_hop_v6.ok_or(NoNextHop(family))?;
            // MP_REACH_NLRI: 4-byte header (extended length), AFI, SAFI, NH len, NH, reserved.
            let fixed = HEADER_LEN + 4 + block.len() + 4 + 2 + 1 + 1 + 16 + 1;
            let room = ctx.max_len - fixed;
            while !rest.is_empty() {
                let start = begin_message(out, MessageType::UPDATE);
                out.extend_from_slice(&[0, 0]);
                let attr_len_pos = out.len();
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&block);
                out.push(attr_flags::OPTIONAL | attr_flags::EXTENDED_LENGTH);
                out.push(AttrType::MP_REACH_NLRI.0);
                let mp_len_pos = out.len();
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&family.afi().to_be_bytes());
                out.push(family.safi());
                out.push(16);
                out.extend_from_slice(&nh.octets());
                out.push(0);
                let n = put_prefixes(out, rest, room);
                if n == 0 {
                    out.truncate(start);
                    break;
                }
                let mp_len = out.len() - mp_len_pos - 2;
                out[mp_len_pos..mp_len_pos + 2].copy_from_slice(&(mp_len as u16).to_be_bytes());
                let attr_len = out.len() - attr_len_pos - 2;
                out[attr_len_pos..attr_len_pos + 2]
                    .copy_from_slice(&(attr_len as u16).to_be_bytes());
                finish_message(out, start);
                rest = &rest[n..];
                messages += 1;
            }
        }
    }
    Ok(messages)
}

/// Encode withdrawals of `prefixes` (all of one family), packed like announcements.
/// Returns the number of messages written.
pub fn encode_withdrawals(
    ctx: &EncodeContext,
    family: Family,
    prefixes: &[IpNet],
    out: &mut Vec<u8>,
) -> usize {
    let mut messages = 0;
    let mut rest = prefixes;
    while !rest.is_empty() {
        let start = begin_message(out, MessageType::UPDATE);
        let n = match family {
            Family::Ipv4Unicast => {
                let pos = out.len();
                out.extend_from_slice(&[0, 0]);
                let n = put_prefixes(out, rest, ctx.max_len - HEADER_LEN - 4);
                let wlen = out.len() - pos - 2;
                out[pos..pos + 2].copy_from_slice(&(wlen as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                n
            }
            Family::Ipv6Unicast => {
                out.extend_from_slice(&[0, 0]);
                let attr_len_pos = out.len();
                out.extend_from_slice(&[0, 0]);
                out.push(attr_flags::OPTIONAL | attr_flags::EXTENDED_LENGTH);
                out.push(AttrType::MP_UNREACH_NLRI.0);
                let mp_len_pos = out.len();
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&family.afi().to_be_bytes());
                out.push(family.safi());
                let n = put_prefixes(out, rest, ctx.max_len - HEADER_LEN - 4 - 4 - 3);
                let mp_len = out.len() - mp_len_pos - 2;
                out[mp_len_pos..mp_len_pos + 2].copy_from_slice(&(mp_len as u16).to_be_bytes());
                let attr_len = out.len() - attr_len_pos - 2;
                out[attr_len_pos..attr_len_pos + 2]
                    .copy_from_slice(&(attr_len as u16).to_be_bytes());
                n
            }
        };
        if n == 0 {
            out.truncate(start);
            break;
        }
        finish_message(out, start);
        rest = &rest[n..];
        messages += 1;
    }
    messages
}

/// Encode the End-of-RIB marker for a family (RFC 4724 §2).
pub fn encode_end_of_rib(family: Family, out: &mut Vec<u8>) {
    let start = begin_message(out, MessageType::UPDATE);
    out.extend_from_slice(&[0, 0]);
    match family {
        Family::Ipv4Unicast => out.extend_from_slice(&[0, 0]),
        Family::Ipv6Unicast => {
            out.extend_from_slice(&[0, 6]);
            out.extend_from_slice(&[attr_flags::OPTIONAL, AttrType::MP_UNREACH_NLRI.0, 3]);
            out.extend_from_slice(&family.afi().to_be_bytes());
            out.push(family.safi());
        }
    }
    finish_message(out, start);
}

/// What RFC 7606 says to do with a received UPDATE that did not need a session reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ErrorAction {
    /// Well-formed.
    #[default]
    None,
    /// A malformed attribute was discarded; the routes stand (RFC 7606 §2 "attribute discard").
    AttributeDiscard,
    /// The routes in the UPDATE are treated as withdrawn (RFC 7606 §2 "treat-as-withdraw").
    TreatAsWithdraw,
}

/// What an inbound UPDATE contained.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UpdateSummary {
    /// Prefixes announced (classic and MP_REACH NLRI).
    pub announced: usize,
    /// Prefixes withdrawn (classic and MP_UNREACH NLRI).
    pub withdrawn: usize,
    /// The UPDATE is an End-of-RIB marker for this family.
    pub end_of_rib: Option<Family>,
    /// RFC 7606 outcome.
    pub action: ErrorAction,
    /// The attribute that decided `action`, for diagnostics.
    pub culprit: Option<AttrType>,
}

/// Negotiated state the inspector needs.
#[derive(Clone, Copy, Debug)]
pub struct InspectContext {
    /// The peer sends 4-octet AS_PATHs.
    pub four_octet_as: bool,
    /// The peer is internal (LOCAL_PREF is mandatory).
    pub ibgp: bool,
}

fn reset(sub: UpdateSubcode) -> Notification {
    Notification::update(sub)
}

/// Count the prefixes of an NLRI field, checking its syntax.
fn count_nlri(mut r: Reader<'_>, max_bits: u8) -> Result<usize, ()> {
    let mut n = 0;
    while !r.is_empty() {
        let bits = r.u8().map_err(|_| ())?;
        if bits > max_bits {
            return Err(());
        }
        r.take((bits as usize).div_ceil(8)).map_err(|_| ())?;
        n += 1;
    }
    Ok(n)
}

fn max_bits(f: Family) -> u8 {
    match f {
        Family::Ipv4Unicast => 32,
        Family::Ipv6Unicast => 128,
    }
}

fn valid_as_path(mut r: Reader<'_>, asn_len: usize) -> bool {
    while !r.is_empty() {
        let (Ok(ty), Ok(count)) = (r.u8(), r.u8()) else {
            return false;
        };
        if !(1..=4).contains(&ty) || count == 0 || r.take(count as usize * asn_len).is_err() {
            return false;
        }
    }
    true
}

/// Inspect an UPDATE body (after the 19-byte header).
///
/// # Errors
/// The NOTIFICATION to send when RFC 4271/7606 require a session reset: the withdrawn
/// routes or attribute lengths overrun the message, NLRI is malformed, MP_REACH/MP_UNREACH
/// is malformed or repeated, or an unrecognized well-known attribute is present.
pub fn inspect(body: &[u8], ctx: InspectContext) -> Result<UpdateSummary, Notification> {
    let mut s = UpdateSummary::default();
    let mut r = Reader::new(body);
    let malformed_list = || reset(UpdateSubcode::MALFORMED_ATTRIBUTE_LIST);
    let wlen = r.u16().map_err(|_| malformed_list())? as usize;
    let withdrawn = r.sub(wlen).map_err(|_| malformed_list())?;
    let alen = r.u16().map_err(|_| malformed_list())? as usize;
    let mut attrs = r.sub(alen).map_err(|_| malformed_list())?;
    let nlri = r;
    s.withdrawn =
        count_nlri(withdrawn, 32).map_err(|()| reset(UpdateSubcode::INVALID_NETWORK_FIELD))?;
    s.announced = count_nlri(nlri, 32).map_err(|()| reset(UpdateSubcode::INVALID_NETWORK_FIELD))?;

    let escalate = |s: &mut UpdateSummary, a: ErrorAction, t: AttrType| {
        if a > s.action {
            s.action = a;
            s.culprit = Some(t);
        }
    };
    let mut seen = [false; 256];
    let mut has_mp_reach = false;
    let mut mp_unreach_family: Option<(u16, u8, usize)> = None;
    while !attrs.is_empty() {
        // RFC 7606 §4: an attribute header or length overrunning the attribute block is
        // treat-as-withdraw; the total length still locates the NLRI.
        let header = (|| {
            let flags = attrs.u8()?;
            let ty = AttrType(attrs.u8()?);
            let len = if flags & attr_flags::EXTENDED_LENGTH != 0 {
                attrs.u16()? as usize
            } else {
                attrs.u8()? as usize
            };
            let value = attrs.sub(len)?;
            Ok::<_, crate::wire::Truncated>((flags, ty, value))
        })();
        let Ok((flags, ty, value)) = header else {
            escalate(&mut s, ErrorAction::TreatAsWithdraw, AttrType(0));
            break;
        };
        let is_mp = ty == AttrType::MP_REACH_NLRI || ty == AttrType::MP_UNREACH_NLRI;
        if seen[ty.0 as usize] {
            if is_mp {
                return Err(malformed_list());
            }
            // RFC 7606 §3(g): keep the first, discard the repeats.
            escalate(&mut s, ErrorAction::AttributeDiscard, ty);
            continue;
        }
        seen[ty.0 as usize] = true;
        let optional = flags & attr_flags::OPTIONAL != 0;
        let len = value.remaining();
        let well_known_flags_ok = !optional && flags & attr_flags::TRANSITIVE != 0;
        let taw = ErrorAction::TreatAsWithdraw;
        let discard = ErrorAction::AttributeDiscard;
        match ty {
            AttrType::ORIGIN => {
                if !well_known_flags_ok || len != 1 || value.rest()[0] > 2 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::AS_PATH => {
                let asn_len = if ctx.four_octet_as { 4 } else { 2 };
                if !well_known_flags_ok || !valid_as_path(value, asn_len) {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::NEXT_HOP => {
                if !well_known_flags_ok || len != 4 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::MULTI_EXIT_DISC | AttrType::ORIGINATOR_ID => {
                if !optional || len != 4 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::LOCAL_PREF => {
                if !ctx.ibgp {
                    // RFC 7606 §7.5: from an external peer it is discarded.
                    escalate(&mut s, discard, ty);
                } else if !well_known_flags_ok || len != 4 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::ATOMIC_AGGREGATE => {
                if len != 0 {
                    escalate(&mut s, discard, ty);
                }
            }
            AttrType::AGGREGATOR => {
                let want = if ctx.four_octet_as { 8 } else { 6 };
                if len != want {
                    escalate(&mut s, discard, ty);
                }
            }
            AttrType::AS4_AGGREGATOR => {
                if len != 8 {
                    escalate(&mut s, discard, ty);
                }
            }
            AttrType::AS4_PATH => {
                // RFC 6793 §6: a malformed AS4_PATH is discarded.
                if !valid_as_path(value, 4) {
                    escalate(&mut s, discard, ty);
                }
            }
            AttrType::COMMUNITIES | AttrType::CLUSTER_LIST => {
                if !optional || len == 0 || len % 4 != 0 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::EXTENDED_COMMUNITIES => {
                if len == 0 || len % 8 != 0 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::LARGE_COMMUNITIES => {
                if len == 0 || len % 12 != 0 {
                    escalate(&mut s, taw, ty);
                }
            }
            AttrType::MP_REACH_NLRI => {
                // RFC 7606 §5.3/§7.11: malformed MP_REACH_NLRI resets the session.
                let mut v = value;
                let bad = || reset(UpdateSubcode::OPTIONAL_ATTRIBUTE_ERROR);
                let afi = v.u16().map_err(|_| bad())?;
                let safi = v.u8().map_err(|_| bad())?;
                let nh_len = v.u8().map_err(|_| bad())? as usize;
                v.take(nh_len).map_err(|_| bad())?;
                v.u8().map_err(|_| bad())?;
                has_mp_reach = true;
                if let Some(f) = Family::from_afi_safi(afi, safi) {
                    let ok_nh = match f {
                        Family::Ipv4Unicast => nh_len == 4 || nh_len == 16 || nh_len == 32,
                        Family::Ipv6Unicast => nh_len == 16 || nh_len == 32,
                    };
                    if !ok_nh {
                        return Err(bad());
                    }
                    s.announced += count_nlri(v, max_bits(f)).map_err(|()| bad())?;
                }
            }
            AttrType::MP_UNREACH_NLRI => {
                let mut v = value;
                let bad = || reset(UpdateSubcode::OPTIONAL_ATTRIBUTE_ERROR);
                let afi = v.u16().map_err(|_| bad())?;
                let safi = v.u8().map_err(|_| bad())?;
                let mut n = 0;
                if let Some(f) = Family::from_afi_safi(afi, safi) {
                    n = count_nlri(v, max_bits(f)).map_err(|()| bad())?;
                    s.withdrawn += n;
                }
                mp_unreach_family = Some((afi, safi, n));
            }
            _ => {
                if !optional {
                    // RFC 4271 §6.3: unrecognized well-known attribute.
                    let mut data = vec![flags, ty.0];
                    data.extend_from_slice(value.rest());
                    return Err(Notification::of(
                        UpdateSubcode::UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE,
                        data,
                    ));
                }
            }
        }
    }

    // RFC 7606 §3(d): missing well-known mandatory attributes when NLRI is present.
    let classic_nlri = nlri.remaining() > 0;
    if (classic_nlri || has_mp_reach) && s.action < ErrorAction::TreatAsWithdraw {
        let missing = if !seen[AttrType::ORIGIN.0 as usize] {
            Some(AttrType::ORIGIN)
        } else if !seen[AttrType::AS_PATH.0 as usize] {
            Some(AttrType::AS_PATH)
        } else if classic_nlri && !seen[AttrType::NEXT_HOP.0 as usize] {
            Some(AttrType::NEXT_HOP)
        } else if ctx.ibgp && !seen[AttrType::LOCAL_PREF.0 as usize] {
            Some(AttrType::LOCAL_PREF)
        } else {
            None
        };
        if let Some(t) = missing {
            escalate(&mut s, ErrorAction::TreatAsWithdraw, t);
        }
    }

    // End-of-RIB: an empty UPDATE (IPv4), or only an empty MP_UNREACH_NLRI.
    if body.len() == 4 {
        s.end_of_rib = Some(Family::Ipv4Unicast);
    } else if wlen == 0 && !classic_nlri && !has_mp_reach {
        if let Some((afi, safi, 0)) = mp_unreach_family {
            let only_attr = alen <= 7;
            if only_attr {
                s.end_of_rib = Family::from_afi_safi(afi, safi);
            }
        }
    }
    Ok(s)
}
