//! Holding announced addresses on a local interface (rtnetlink), so the node accepts
//! traffic for them.
//!
//! [`AddressHolder`] owns one link (by default [`DEFAULT_LINK`], `portico0`). It is a
//! `dummy` link where the kernel has that type, else a `bridge` without ports, which
//! likewise only carries local addresses. Either way the link is up and has ARP off.
//! Adding an address that is already held and removing one that is not are no-ops, so a
//! driver can replay its whole desired set after a restart ([`AddressHolder::sync`]).
//!
//! Addresses are held as host routes (`/32`, `/128`); IPv6 ones skip duplicate address
//! detection (`IFA_F_NODAD`), as every node of the cluster may hold the same VIP.
//!
//! The netlink socket belongs to the network namespace of the thread that opened it.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{AddressMessageBuilder, Handle, LinkBridge, LinkDummy, LinkUnspec};

use crate::Error;

/// The link Portico holds addresses on unless told otherwise.
pub const DEFAULT_LINK: &str = "portico0";

/// The kind of link that holds the addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A `dummy` link (needs `CONFIG_DUMMY`).
    Dummy,
    /// A `bridge` without ports: the fallback where `dummy` is missing.
    Bridge,
}

impl LinkKind {
    /// Dummy first, bridge when the kernel has no dummy type.
    pub const PREFERRED: [LinkKind; 2] = [LinkKind::Dummy, LinkKind::Bridge];

    fn from_info_kind(kind: &InfoKind) -> Option<LinkKind> {
        match kind {
            InfoKind::Dummy => Some(LinkKind::Dummy),
            InfoKind::Bridge => Some(LinkKind::Bridge),
            _ => None,
        }
    }
}

/// A local link holding announced addresses.
#[derive(Debug)]
pub struct AddressHolder {
    handle: Handle,
    name: String,
    index: u32,
    kind: LinkKind,
}

/// The errno of a netlink NACK, if the error is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn io_error(op: &'static str, e: rtnetlink::Error) -> Error {
    let source = match errno(&e) {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::other(e.to_string()),
    };
    Error::Io { op, source }
}

impl AddressHolder {
    /// Opens a netlink connection (spawned on the current tokio runtime) and ensures the
    /// link `name` exists (dummy, else bridge) and is up.
    ///
    /// # Errors
    /// See [`AddressHolder::open_with`]; also when the netlink socket cannot be opened.
    pub async fn connect(name: &str) -> Result<AddressHolder, Error> {
        Self::connect_with(name, &LinkKind::PREFERRED).await
    }

    /// Like [`AddressHolder::connect`], trying the link kinds `kinds` in order.
    ///
    /// # Errors
    /// See [`AddressHolder::open_with`]; also when the netlink socket cannot be opened.
    pub async fn connect_with(name: &str, kinds: &[LinkKind]) -> Result<AddressHolder, Error> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Io {
            op: "netlink socket",
            source,
        })?;
        tokio::spawn(connection);
        Self::open_with(handle, name, kinds).await
    }

    /// Ensures the link `name` exists and is up, creating it as the first kind of `kinds`
    /// the kernel supports. An existing link of one of `kinds` is reused as it is (with
    /// its addresses).
    ///
    /// # Errors
    /// The name belongs to a link of another kind, no kind of `kinds` is supported, or a
    /// netlink request fails (e.g. without CAP_NET_ADMIN).
    pub async fn open_with(
        handle: Handle,
        name: &str,
        kinds: &[LinkKind],
    ) -> Result<AddressHolder, Error> {
        if let Some(link) = find_link(&handle, name).await? {
            let kind = link_kind(&link).filter(|k| kinds.contains(k)).ok_or_else(|| {
                Error::Config(format!(
                    "link {name} exists but is not of kind {kinds:?}; remove it or choose another name"
                ))
            })?;
            let holder = AddressHolder {
                handle,
                name: name.to_owned(),
                index: link.header.index,
                kind,
            };
            holder.set_up().await?;
            return Ok(holder);
        }
        let mut last_unsupported = None;
        for &kind in kinds {
            let message = match kind {
                LinkKind::Dummy => LinkDummy::new(name).up().arp(false).build(),
                LinkKind::Bridge => LinkBridge::new(name).up().arp(false).build(),
            };
            match handle.link().add(message).execute().await {
                Ok(()) => {}
                // The kernel has no such link type (EOPNOTSUPP after a failed module load).
                Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => {
                    tracing::debug!(
                        link = name,
                        ?kind,
                        "link kind not supported; trying the next"
                    );
                    last_unsupported = Some(kind);
                    continue;
                }
                // Someone created it meanwhile: reuse it if it fits.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    return Box::pin(Self::open_with(handle, name, kinds)).await;
                }
                Err(e) => return Err(io_error("RTM_NEWLINK", e)),
            }
            let link = find_link(&handle, name)
                .await?
                .ok_or_else(|| Error::Config(format!("link {name} vanished after creation")))?;
            let holder = AddressHolder {
                handle,
                name: name.to_owned(),
                index: link.header.index,
                kind,
            };
            // Creating with IFF_UP is not honoured by every kernel: set it explicitly.
            holder.set_up().await?;
            tracing::info!(link = name, ?kind, "created address-holding link");
            return Ok(holder);
        }
        Err(Error::Config(format!(
            "cannot create link {name}: the kernel supports none of {kinds:?} (last tried {last_unsupported:?})"
        )))
    }

    async fn set_up(&self) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(self.index).up().build())
            .execute()
            .await
            .map_err(|e| io_error("RTM_SETLINK up", e))
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The link's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the link is a dummy or the bridge fallback.
    pub fn kind(&self) -> LinkKind {
        self.kind
    }

    /// Holds `address` (as a host route). Returns whether it was newly added.
    ///
    /// # Errors
    /// The netlink request fails for another reason than "already there".
    pub async fn add(&self, address: IpAddr) -> Result<bool, Error> {
        let mut request = self
            .handle
            .address()
            .add(self.index, address, host_len(address));
        if address.is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(io_error("RTM_NEWADDR", e)),
        }
    }

    /// Stops holding `address`. Returns whether it was held.
    ///
    /// # Errors
    /// The netlink request fails for another reason than "not there".
    pub async fn remove(&self, address: IpAddr) -> Result<bool, Error> {
        let message = match address {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(self.index)
                .address(a, 32)
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(self.index)
                .address(a, 128)
                .build(),
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(io_error("RTM_DELADDR", e)),
        }
    }

    /// The addresses on the link, sorted (IPv6 link-local addresses the kernel adds
    /// itself are left out).
    ///
    /// # Errors
    /// The netlink dump fails.
    pub async fn addresses(&self) -> Result<BTreeSet<IpAddr>, Error> {
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        let mut out = BTreeSet::new();
        while let Some(message) = dump
            .try_next()
            .await
            .map_err(|e| io_error("RTM_GETADDR", e))?
        {
            // IFA_LOCAL is the local address for IPv4; IPv6 only has IFA_ADDRESS.
            let local = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = local.or_else(|| {
                message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            match address {
                Some(IpAddr::V6(v6)) if v6.is_unicast_link_local() => {}
                Some(ip) => {
                    out.insert(ip);
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Makes the held set exactly `want`: adds what is missing, removes the rest.
    /// Returns how many addresses were added and removed.
    ///
    /// # Errors
    /// A netlink request fails; addresses handled before it stay as they are.
    pub async fn sync(&self, want: &BTreeSet<IpAddr>) -> Result<(usize, usize), Error> {
        let have = self.addresses().await?;
        let mut added = 0;
        let mut removed = 0;
        for a in want.difference(&have) {
            added += usize::from(self.add(*a).await?);
        }
        for a in have.difference(want) {
            removed += usize::from(self.remove(*a).await?);
        }
        Ok((added, removed))
    }

    /// Deletes the link and with it every held address.
    ///
    /// # Errors
    /// The netlink request fails for another reason than "already gone".
    pub async fn delete(self) -> Result<(), Error> {
        match self.handle.link().del(self.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(io_error("RTM_DELLINK", e)),
        }
    }
}

fn host_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(io_error("RTM_GETLINK", e)),
    }
}

fn link_kind(link: &LinkMessage) -> Option<LinkKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => LinkKind::from_info_kind(kind),
            _ => None,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_is_preferred_over_the_bridge_fallback() {
        assert_eq!(LinkKind::PREFERRED, [LinkKind::Dummy, LinkKind::Bridge]);
        assert_eq!(
            LinkKind::from_info_kind(&InfoKind::Bridge),
            Some(LinkKind::Bridge)
        );
        assert_eq!(LinkKind::from_info_kind(&InfoKind::Veth), None);
    }

    #[test]
    fn addresses_are_held_as_host_routes() {
        assert_eq!(host_len("192.0.2.1".parse().unwrap()), 32);
        assert_eq!(host_len("fd00::1".parse().unwrap()), 128);
    }

    #[test]
    fn netlink_nacks_map_to_os_errors() {
        let mut m = rtnetlink::packet_core::ErrorMessage::default();
        m.code = std::num::NonZeroI32::new(-libc::EEXIST);
        let e = rtnetlink::Error::NetlinkError(m);
        assert_eq!(errno(&e), Some(libc::EEXIST));
        let Error::Io { source, .. } = io_error("RTM_NEWADDR", e) else {
            panic!("not an I/O error");
        };
        assert_eq!(source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(errno(&rtnetlink::Error::RequestFailed), None);
    }
}
