//! The netlink address holder in throwaway namespaces: the link it creates (dummy, or a
//! bridge where the kernel has no dummy), idempotent adds and removes, and what iproute2
//! sees of it.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

use portico_announcer::netlink::{AddressHolder, LinkKind, DEFAULT_LINK};
use portico_announcer::Error;
use portico_integration::{NetNs, TestNet};
use serde_json::Value;

/// Runs `f` on a current-thread runtime with this thread inside `ns`, so the netlink
/// socket the holder opens belongs to `ns`.
fn in_ns<F: Future>(ns: &NetNs, f: impl FnOnce() -> F) -> F::Output {
    let _inside = ns.enter().unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f())
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| ip(a)).collect()
}

/// `ip -j -d link show <name>` in `ns`.
fn link_json(ns: &NetNs, name: &str) -> Value {
    let out = ns
        .run(&["ip", "-j", "-d", "link", "show", "dev", name])
        .unwrap();
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

/// `address/prefixlen` of every global address on `name`, as iproute2 reports them,
/// failing on addresses still in duplicate address detection.
fn iproute_addresses(ns: &NetNs, name: &str) -> BTreeSet<String> {
    let out = ns
        .run(&["ip", "-j", "addr", "show", "dev", name, "scope", "global"])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        // iproute2 prints addresses its scope filter dropped as empty objects.
        .filter_map(|a| {
            let local = a["local"].as_str()?;
            assert!(a.get("tentative").is_none(), "tentative address: {a}");
            Some(format!("{local}/{}", a["prefixlen"]))
        })
        .collect()
}

/// Whether this kernel can create dummy links (probed with iproute2, independently of
/// the code under test).
fn kernel_has_dummy(ns: &NetNs) -> bool {
    let ok = ns
        .run(&["ip", "link", "add", "probe0", "type", "dummy"])
        .is_ok();
    if ok {
        ns.run(&["ip", "link", "del", "probe0"]).unwrap();
    }
    ok
}

#[test]
fn holder_uses_dummy_where_the_kernel_has_it_and_a_bridge_where_it_does_not() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    let expected = if kernel_has_dummy(&node) {
        LinkKind::Dummy
    } else {
        LinkKind::Bridge
    };
    let kind = in_ns(&node, || async {
        let holder = AddressHolder::connect(DEFAULT_LINK).await.unwrap();
        assert_eq!(holder.name(), "portico0");
        holder.kind()
    });
    assert_eq!(kind, expected);
    let link = link_json(&node, DEFAULT_LINK);
    let info_kind = link["linkinfo"]["info_kind"].as_str().unwrap();
    assert_eq!(
        info_kind,
        match expected {
            LinkKind::Dummy => "dummy",
            LinkKind::Bridge => "bridge",
        }
    );
    let flags: Vec<&str> = link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"UP"), "{flags:?}");
    assert!(flags.contains(&"NOARP"), "{flags:?}");
}

#[test]
fn bridge_fallback_adds_and_removes_addresses_idempotently() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    in_ns(&node, || async {
        let holder = AddressHolder::connect_with(DEFAULT_LINK, &[LinkKind::Bridge])
            .await
            .unwrap();
        assert_eq!(holder.kind(), LinkKind::Bridge);

        assert!(holder.add(ip("192.0.2.10")).await.unwrap());
        assert!(!holder.add(ip("192.0.2.10")).await.unwrap(), "second add");
        assert!(holder.add(ip("fd00::10")).await.unwrap());
        assert!(!holder.add(ip("fd00::10")).await.unwrap(), "second add");
        assert_eq!(
            holder.addresses().await.unwrap(),
            set(&["192.0.2.10", "fd00::10"])
        );
        assert_eq!(
            iproute_addresses(&node, DEFAULT_LINK),
            ["192.0.2.10/32", "fd00::10/128"]
                .map(String::from)
                .into_iter()
                .collect()
        );

        assert!(holder.remove(ip("192.0.2.10")).await.unwrap());
        assert!(
            !holder.remove(ip("192.0.2.10")).await.unwrap(),
            "second remove"
        );
        assert!(
            !holder.remove(ip("198.51.100.1")).await.unwrap(),
            "never held"
        );
        assert!(!holder.remove(ip("fd00::99")).await.unwrap(), "never held");
        assert_eq!(holder.addresses().await.unwrap(), set(&["fd00::10"]));
    });
}

#[test]
fn held_addresses_are_local_to_the_node() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    in_ns(&node, || async {
        let holder = AddressHolder::connect(DEFAULT_LINK).await.unwrap();
        holder.add(ip("192.0.2.20")).await.unwrap();
        holder.add(ip("fd00::20")).await.unwrap();
    });
    let local = node
        .run(&["ip", "route", "show", "table", "local", "192.0.2.20"])
        .unwrap();
    assert!(local.contains("local 192.0.2.20"), "{local}");
    node.run(&["ping", "-c", "1", "-W", "2", "192.0.2.20"])
        .unwrap();
    node.run(&["ping", "-6", "-c", "1", "-W", "2", "fd00::20"])
        .unwrap();
}

#[test]
fn reopening_reuses_the_link_and_sync_converges_on_the_wanted_set() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    in_ns(&node, || async {
        let first = AddressHolder::connect(DEFAULT_LINK).await.unwrap();
        first.add(ip("192.0.2.1")).await.unwrap();
        first.add(ip("192.0.2.2")).await.unwrap();
        let index = first.index();
        drop(first);

        // A restarted speaker finds the link and what it held.
        let holder = AddressHolder::connect(DEFAULT_LINK).await.unwrap();
        assert_eq!(holder.index(), index);
        assert_eq!(
            holder.addresses().await.unwrap(),
            set(&["192.0.2.1", "192.0.2.2"])
        );

        let want = set(&["192.0.2.2", "192.0.2.3", "fd00::3"]);
        assert_eq!(holder.sync(&want).await.unwrap(), (2, 1));
        assert_eq!(holder.addresses().await.unwrap(), want);
        assert_eq!(holder.sync(&want).await.unwrap(), (0, 0), "idempotent");

        holder.delete().await.unwrap();
    });
    let links = node.run(&["ip", "-o", "link", "show"]).unwrap();
    assert!(!links.contains(DEFAULT_LINK), "{links}");
}

#[test]
fn a_link_of_another_kind_with_that_name_is_left_alone() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    node.run(&[
        "ip",
        "link",
        "add",
        DEFAULT_LINK,
        "type",
        "veth",
        "peer",
        "name",
        "other0",
    ])
    .unwrap();
    let err = in_ns(&node, || async {
        AddressHolder::connect(DEFAULT_LINK).await.unwrap_err()
    });
    assert!(
        matches!(&err, Error::Config(m) if m.contains("portico0 exists but is not of kind")),
        "{err}"
    );
    let link = link_json(&node, DEFAULT_LINK);
    assert_eq!(link["linkinfo"]["info_kind"], "veth");
}
